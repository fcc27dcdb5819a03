"""A real Redis Sentinel deployment for tests: a primary, one replica and three sentinels,
each a `redis-server` process of the test's own on a free port, nothing on disk but the
sentinels' config files (a sentinel rewrites its own as it learns)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis

from tests.servers import Process, RedisServer, free_port, start_redis

SERVICE = "mymaster"
# Small, so a failover takes a second or two: down after 500 ms, then the election.
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000


@dataclass
class SentinelDeployment:
    primary: RedisServer
    replica: Process
    replica_port: int
    sentinels: list[Process]
    sentinel_ports: list[int]
    service: str = SERVICE

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def primary_port(self) -> int:
        """The port the first answering sentinel names as the primary now."""
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1.0) as client:
                    _host, primary = client.sentinel_get_master_addr_by_name(self.service)
                    return int(primary)
            except redis.RedisError:
                continue
        raise AssertionError("no sentinel answers")

    def stop(self) -> None:
        for process in [*self.sentinels, self.replica, self.primary]:
            process.stop()


def _start_redis_server(name: str, args: list[str], log_dir: Path, port: int) -> Process:
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT, cwd=log_dir
        )
    process = Process(name, popen, log_path, f"redis://127.0.0.1:{port}")
    _poll(lambda: _pings(port, process), 10.0, f"{name} not answering")
    return process


def _pings(port: int, process: Process) -> bool:
    if process.popen.poll() is not None:
        raise RuntimeError(f"{process.name} exited:\n{process.log()}")
    try:
        with redis.Redis(port=port, socket_timeout=1.0) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _poll(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} after {timeout_s}s (last: {result!r})")
        time.sleep(0.05)


def start_sentinel_deployment(log_dir: Path, timeout_s: float = 30.0) -> SentinelDeployment:
    """Started and settled: the replica in sync and every sentinel knowing the replica and
    the two other sentinels, so a failover can happen at once when the primary dies."""
    primary = start_redis(log_dir)
    replica_port = free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    replica = _start_redis_server(
        f"redis-replica-{replica_port}",
        ["--port", str(replica_port), *common, "--replicaof", "127.0.0.1", str(primary.port)],
        log_dir,
        replica_port,
    )
    sentinels: list[Process] = []
    ports: list[int] = []
    deployment = SentinelDeployment(primary, replica, replica_port, sentinels, ports)
    try:
        for _ in range(3):
            port = free_port()
            conf = log_dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            ports.append(port)
            sentinels.append(
                _start_redis_server(f"sentinel-{port}", [str(conf), "--sentinel"], log_dir, port)
            )
        _poll(lambda: _replica_in_sync(replica_port), timeout_s, "replica not in sync")
        for port in ports:
            _poll(partial(_sentinel_settled, port), timeout_s, f"sentinel {port}")
    except BaseException:
        deployment.stop()
        raise
    return deployment


def _replica_in_sync(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1.0) as client:
        return bool(client.info("replication").get("master_link_status") == "up")


def _sentinel_settled(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1.0, decode_responses=True) as client:
        state = client.sentinel_master(SERVICE)
    return int(state["num-slaves"]) == 1 and int(state["num-other-sentinels"]) == 2
