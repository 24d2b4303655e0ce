"""Helpers that tests import: what a server holds, and which servers to test.

`dump_keys` reads every key with its value, so that a test can prove that
an operation wrote nothing by comparing a dump taken before with one taken
after. `select_binaries` applies ``NEPS_REDIS_TEST_SERVERS``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis

from neps_redis.server import ServerBinary


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_value(client: redis.Redis, key: Any) -> dict[str, Any]:
    # Entries alone would miss XDEL's trace and the groups' positions, which
    # a reader changes without adding an entry; idle times are left out
    # because they change by themselves.
    info = client.xinfo_stream(key)
    ids = {
        name: info[name]
        for name in ("last-generated-id", "max-deleted-entry-id", "entries-added")
        if name in info
    }
    groups = {
        _text(group["name"]): {
            "last-delivered-id": group["last-delivered-id"],
            "consumers": group["consumers"],
            "pending": client.xpending(key, group["name"]),
        }
        for group in client.xinfo_groups(key)
    }
    return {"entries": client.xrange(key), "ids": ids, "groups": groups}


def dump_keys(client: redis.Redis, pattern: str = "*") -> dict[Any, tuple[str, Any]]:
    """Return ``{key: (type, value)}`` for every key matching `pattern`.

    Values are plain Python: bytes for a string, a dict for a hash, a list
    for a list, a set for a set, ``[(member, score), ...]`` for a sorted set,
    and for a stream its entries, last ids and consumer groups. Keys of other
    types (from modules) hold their DUMP serialization. TTLs are not read.
    """
    dump: dict[Any, tuple[str, Any]] = {}
    for key in client.scan_iter(match=pattern, count=1000):
        kind = _text(client.type(key))
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = _stream_value(client, key)
        elif kind == "none":
            # Deleted (or expired) between SCAN and TYPE.
            continue
        else:
            value = client.dump(key)
        dump[key] = (kind, value)
    return dump


def _matches(binary: ServerBinary, wanted: str) -> bool:
    # "redis-6.2" selects redis-6.2.14 but not redis-6.20.0.
    return wanted in (binary.name, binary.id) or binary.id.startswith(wanted + ".")


def select_binaries(
    binaries: Sequence[ServerBinary], spec: str
) -> tuple[list[ServerBinary], list[str]]:
    """Keep the binaries that a comma-separated list of ids or names selects.

    Returns the kept binaries and the entries of `spec` that matched none.
    An empty `spec` keeps them all.
    """
    wanted = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not wanted:
        return list(binaries), []

    kept = [b for b in binaries if any(_matches(b, entry) for entry in wanted)]
    unmatched = [e for e in wanted if not any(_matches(b, e) for b in binaries)]
    return kept, unmatched


def newest(binaries: Iterable[ServerBinary]) -> ServerBinary:
    """The newest release; on a tie of versions, Valkey."""
    return max(binaries, key=lambda b: (b.version, b.name == "valkey"))
