"""`vgate keys create` and `vgate keys list`: issuing keys and showing them, never their secrets.

`create` prints the new secret alone on standard output (so `KEY=$(vgate keys create ...)`
works) and what it did on standard error; the secret is stored nowhere, only its hash. A
running gateway picks the new key up by itself within `keys.reload_interval_s`.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway.config import load_config
from gateway.edge.auth import hash_key, new_secret, read_keys_file
from gateway.edge.keyfile import add_key
from gateway.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="keys_verb", required=True)

    create = verbs.add_parser("create", help="issue a new key: prints its secret, once")
    create.add_argument("--name", required=True, help="the user or team the key belongs to")
    create.add_argument("--id", dest="key_id", help="unique id (default: key-<name>-<random>)")
    create.add_argument("--tier", choices=["interactive", "batch"], default="interactive")
    create.add_argument(
        "--models",
        action="append",
        metavar="NAME[,NAME...]",
        help="models (names or aliases) the key may use; repeatable (default: all)",
    )
    for flag, text in (
        ("--rpm", "requests per minute"),
        ("--tpm", "tokens per minute"),
        ("--tokens-per-day", "tokens per UTC day"),
        ("--max-concurrent", "requests in flight at once"),
        ("--max-tokens", "guardrail: the most max_tokens a request may ask for"),
        ("--max-input-bytes", "guardrail: the most bytes of prompt text per request"),
        ("--max-n", "guardrail: the most choices (n) a request may ask for"),
    ):
        create.add_argument(flag, type=_positive, help=text)
    _file_arguments(create)

    listing = verbs.add_parser("list", help="show the keys file's keys, without secrets")
    listing.add_argument("--json", action="store_true", help="one JSON document")
    _file_arguments(listing)


def _file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", help="the keys file (default: the config's keys.file)")
    parser.add_argument(
        "--config",
        help="the gateway config whose keys file to use, and to check --models against "
        "(default: the embedded one, for the file only)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        path, models = _target(args)
        if args.keys_verb == "create":
            return _create(args, path, models)
        return _list(args, path)
    except ConfigError as exc:
        print(f"vgate: invalid keys file: {exc}", file=sys.stderr)
        return 2


def _target(args: argparse.Namespace) -> tuple[Path, frozenset[str] | None]:
    """The keys file, and the model names and aliases keys may name (when a config was given)."""
    if args.file is not None and args.config is None:
        return Path(args.file), None
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vgate: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    models = None
    if args.config is not None:
        models = frozenset(name for m in config.models for name in (m.name, *m.aliases))
    return (Path(args.file) if args.file else config.keys.file), models


def _create(args: argparse.Namespace, path: Path, known: frozenset[str] | None) -> int:
    names = [n.strip() for value in args.models or () for n in value.split(",") if n.strip()]
    if known is not None:
        unknown = [name for name in names if name not in known]
        if unknown:
            print(
                f"vgate: no model or alias is named {unknown[0]!r} "
                f"(models: {', '.join(sorted(known))})",
                file=sys.stderr,
            )
            return 2
    existing = {entry.id for entry in read_keys_file(path)} if path.exists() else set()
    key_id = args.key_id or _new_id(args.name, existing)
    if key_id in existing:
        print(f"vgate: {path}: a key with id {key_id!r} exists already", file=sys.stderr)
        return 2
    secret = new_secret()
    entry: dict[str, Any] = {"id": key_id, "name": args.name, "sha256": hash_key(secret)}
    if args.tier != "interactive":
        entry["tier"] = args.tier
    if names:
        entry["models"] = list(dict.fromkeys(names))
    limits = {
        name: getattr(args, name)
        for name in ("rpm", "tpm", "tokens_per_day", "max_concurrent")
        if getattr(args, name) is not None
    }
    if limits:
        entry["limits"] = limits
    rails = {
        name: getattr(args, name)
        for name in ("max_tokens", "max_input_bytes", "max_n")
        if getattr(args, name) is not None
    }
    if rails:
        entry["guardrails"] = rails
    kept = add_key(path, entry)
    print(
        f"vgate: created key {key_id} ({args.name}) in {path}. Its secret follows, shown "
        "this once: only its hash is stored.",
        file=sys.stderr,
    )
    if not kept:
        print(f"vgate: note: {path} was rewritten; its comments could not be kept", file=sys.stderr)
    print(secret, flush=True)
    return 0


def _list(args: argparse.Namespace, path: Path) -> int:
    keys = [entry.describe() for entry in read_keys_file(path)]
    if args.json:
        sys.stdout.write(orjson.dumps({"source": str(path), "keys": keys}).decode() + "\n")
        return 0
    rows = [("ID", "NAME", "TIER", "MODELS", "LIMITS", "GUARDRAILS", "DISABLED")]
    for key in keys:
        rows.append(
            (
                key["id"],
                key["name"],
                key["tier"],
                ",".join(key["models"] or ["*"]),
                _pairs(key["limits"]),
                _pairs(key["guardrails"]),
                "yes" if key["disabled"] else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _pairs(values: dict[str, int | None]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items() if v is not None) or "-"


def _new_id(name: str, existing: set[str]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "key"
    while True:
        key_id = f"key-{slug}-{secrets.token_hex(3)}"
        if key_id not in existing:
            return key_id


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1")
    return value
