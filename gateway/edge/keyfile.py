"""The keys file on disk: adding an entry to it safely, and noticing when it changes.

`add_key` appends one entry as text, so the file's comments and layout stay as they were,
checks that the result parses to exactly the old entries plus the new one (else it writes
the whole file out again, keeping every entry but not the comments), validates it as the
gateway would, and replaces the file atomically: a temporary file in the same directory,
fsynced, then renamed over it. Writers are serialized by a lock on the directory, so two
`vgate keys create` at once never lose an entry. A running gateway never sees half a file.

`KeyFileWatcher` polls the file's mtime, size and inode, and reloads the gateway's keys when
they change; an invalid file is logged as an error, once, and the keys in force stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.config import KeysConfig
from gateway.edge.auth import KeyRing, parse_keys
from gateway.errors import ConfigError
from policies.background import stop_task

logger = logging.getLogger("vgate.keys")

_KEYS_LINE = re.compile(r"^keys:[ \t]*(?:\[[ \t]*\]|~|null)?[ \t]*(#.*)?$", re.MULTILINE)
_ITEM = re.compile(r"^([ \t]*)- ", re.MULTILINE)


def add_key(path: Path, entry: dict[str, Any]) -> bool:
    """Add `entry` to the keys file at `path` (created if absent), atomically.

    Returns whether the file's existing text (comments, layout) was kept as it was. Raises
    `ConfigError` when the file, or the file with the entry, is not a valid keys file.
    """
    real = Path(os.path.realpath(path))  # through a symlink: replace the file, keep the link
    with _locked(real.parent):
        try:
            old_text = real.read_text(encoding="utf-8")
            exists = True
        except FileNotFoundError:
            old_text, exists = "", False
        except OSError as exc:
            raise ConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
        try:
            old = yaml.safe_load(old_text)
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), "", f"not valid YAML: {exc}") from None
        parse_keys(old, str(path))  # never build on an invalid file
        old = old or {}
        expected = {**old, "keys": [*(old.get("keys") or []), entry]}
        text = _appended(old_text, old, entry)
        kept = text is not None and _loads(text) == expected
        if text is None or not kept:
            text = "keys:\n" + "".join(_item(key, "  ") for key in expected["keys"])
        parse_keys(yaml.safe_load(text), str(path))
        mode = real.stat().st_mode & 0o7777 if exists else _default_mode()
        _replace(real, text, mode)
        return kept or not exists


def _loads(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _appended(old_text: str, old: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """The old text with `entry` appended as one more item of `keys:`, or None."""
    text = old_text
    if text and not text.endswith("\n"):
        text += "\n"
    if not old.get("keys"):
        # No items yet: `keys:`, `keys: []` or no such line at all.
        match = _KEYS_LINE.search(text)
        if match is None:
            if "keys" in old:
                return None
            text += "keys:\n"
        else:
            comment = f"  {match.group(1)}" if match.group(1) else ""
            text = text[: match.start()] + "keys:" + comment + text[match.end() :]
            if not text.endswith("\n"):
                text += "\n"
        indent = "  "
    else:
        keys_line = re.search(r"^keys:", text, re.MULTILINE)
        first = _ITEM.search(text, keys_line.end() if keys_line else 0)
        if first is None:
            return None
        indent = first.group(1)
    return text + _item(entry, indent)


def _item(entry: Any, indent: str) -> str:
    """One item of `keys:` in block style, its lists and mappings in flow style."""
    if not isinstance(entry, dict) or not entry:
        return f"{indent}- {_flow(entry)}\n"
    return "".join(
        f"{indent}{'- ' if index == 0 else '  '}{_flow(field)}: {_flow(value)}\n"
        for index, (field, value) in enumerate(entry.items())
    )


def _flow(value: Any) -> str:
    """`value` as one line of YAML (in a list, so that a scalar needs no document marker)."""
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 30).strip()[1:-1]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock: writers are not serialized
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace(path: Path, text: str, mode: int) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable, where the OS allows it
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class KeyFileWatcher:
    """Reloads `keys` whenever its file changes on disk, checking every `interval_s`."""

    @classmethod
    def from_config(cls, keys: KeyRing, settings: KeysConfig) -> KeyFileWatcher:
        return cls(keys, settings.reload_interval_s)

    def __init__(self, keys: KeyRing, interval_s: float) -> None:
        self.keys = keys
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None and self.interval_s > 0 and self.keys.path is not None:
            self._task = asyncio.create_task(self._run(), name="vgate-keys-watch")

    async def aclose(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def check(self) -> None:
        """Reload if the file changed; log what happened either way. Never raises."""
        keys = self.keys
        try:
            if not keys.changed_on_disk():
                return
            counts = await keys.reload()
        except ConfigError as error:
            logger.error(
                "keys file changed but is invalid; the %d keys loaded before stay in force: %s",
                keys.counts()["keys"],
                error,
            )
        except Exception:
            logger.exception("reloading the keys file %s failed", keys.source)
        else:
            logger.info(
                "keys file %s reloaded: %d keys (%d enabled, %d disabled)",
                keys.source,
                counts["keys"],
                counts["enabled"],
                counts["disabled"],
            )
