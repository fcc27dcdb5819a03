"""A real Redis Cluster for tests: three primaries (and, if asked, a replica each), each a
`redis-server --cluster-enabled yes` process of the test's own on a free port (its cluster
bus on port + 10000), nothing on disk but the nodes' own cluster config files. The slots
are assigned by `redis-cli --cluster create`; the cluster is returned once every node says
cluster_state:ok and agrees on the slots."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis

from tests.servers import RedisServer

PRIMARIES = 3
# Small, so a replica takes over a dead primary within a few seconds.
NODE_TIMEOUT_MS = 1000


@dataclass
class RedisCluster:
    nodes: list[RedisServer]
    log_dir: Path
    replicas: int = 0

    @property
    def addresses(self) -> list[str]:
        """Every node as host:port (what `redis.cluster.nodes` takes)."""
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def primary_ports(self) -> list[int]:
        """The primaries now, as the first answering node sees them."""
        for node in self.nodes:
            if node.popen.poll() is not None:
                continue
            try:
                with redis.Redis(port=node.port, socket_timeout=1.0) as client:
                    text = client.execute_command("CLUSTER", "NODES")
            except redis.RedisError:
                continue
            text = text.decode() if isinstance(text, bytes) else text
            return sorted(
                int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                for line in text.splitlines()
                if "master" in line.split()[2] and "fail" not in line.split()[2]
            )
        raise AssertionError("no cluster node answers")

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def owner_of(self, key: str) -> int:
        """The port of the primary that holds `key`'s slot now."""
        for node in self.nodes:
            if node.popen.poll() is not None:
                continue
            with redis.Redis(port=node.port, socket_timeout=1.0) as client:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return int(primary[1])
        raise AssertionError("no cluster node answers")

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok."""
        live = [node for node in self.nodes if node.popen.poll() is None]
        for node in live:
            _poll(partial(_cluster_ok, node.port), timeout_s, f"{node.name} not ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 >= 65536:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _start_node(log_dir: Path, port: int) -> RedisServer:
    log_path = log_dir / f"redis-cluster-{port}.log"
    args = [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        f"nodes-{port}.conf",
        "--cluster-node-timeout",
        str(NODE_TIMEOUT_MS),
    ]
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT, cwd=log_dir
        )
    node = RedisServer(f"redis-cluster-{port}", popen, log_path, f"redis://127.0.0.1:{port}", port)
    _poll(lambda: _pings(node), 10.0, f"{node.name} not answering")
    return node


def _pings(node: RedisServer) -> bool:
    if node.popen.poll() is not None:
        raise RuntimeError(f"{node.name} exited:\n{node.log()}")
    try:
        with redis.Redis(port=node.port, socket_timeout=1.0) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1.0, decode_responses=True) as client:
            info = client.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False
    text = info if isinstance(info, str) else str(info)
    return "cluster_state:ok" in text and "cluster_slots_assigned:16384" in text


def _poll(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} after {timeout_s}s (last: {result!r})")
        time.sleep(0.05)


def start_cluster(log_dir: Path, *, replicas: int = 0, timeout_s: float = 30.0) -> RedisCluster:
    """Three primaries (and `replicas` replicas each), slots assigned, every node ok and,
    with replicas, each replica in sync with its primary."""
    log_dir = log_dir / "redis-cluster"
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = RedisCluster([], log_dir, replicas)
    try:
        for _ in range(PRIMARIES * (1 + replicas)):
            cluster.nodes.append(_start_node(log_dir, _cluster_port()))
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *cluster.addresses,
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{created.stdout.decode()}"
                f"\n{created.stderr.decode()}"
            )
        cluster.wait_ok(timeout_s)
        if replicas:
            for node in cluster.nodes:
                _poll(partial(_replica_settled, node.port), timeout_s, node.name)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _replica_settled(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1.0) as client:
        replication = client.info("replication")
    if replication.get("role") == "master":
        return True
    return bool(replication.get("master_link_status") == "up")
