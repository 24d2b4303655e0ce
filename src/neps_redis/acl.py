"""Least-privilege ACL users for one run: a worker, a monitor, an exporter.

Each role gets the commands its code sends and nothing else, and only the
keys of its run (``~neps:{R}:*``). The lists were taken from the code and
checked by running every operation of the role as such a user (see
``tests/test_acl.py``); a command added to the code or to a Lua script must
be added here too, or that test fails with NOPERM.

Commands a script calls count as well: Redis checks ``redis.call`` against
the caller's ACL, so a worker, which only runs scripts to write, still needs
HSET, XADD and the others on its run's keys.

CONFIG GET is left out on purpose: it would let the user read every server
setting, ``requirepass`` and ``masterauth`` included. Without it the library
cannot verify the eviction policy and warns once per client; the server's
administrator checks ``maxmemory-policy noeviction`` instead.

This module never sees a password: the lines carry a placeholder.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from neps_redis.errors import NePSError
from neps_redis.keys import RunKeys

PASSWORD_PLACEHOLDER = "CHANGE-ME"

ROLES = ("worker", "monitor", "exporter")

# What every client of the package sends on connecting: redis-py's HELLO,
# SELECT for a database other than 0, and the server checks (INFO, PING).
_CONNECTION = ("hello", "select", "ping", "info")

# Called from inside the Lua transitions (lua/*.lua) on the run's keys.
_IN_SCRIPTS = (
    "del",
    "exists",
    "get",
    "hdel",
    "hget",
    "hgetall",
    "hincrby",
    "hmget",
    "hset",
    "rpush",
    "set",
    "time",
    "xadd",
    "xdel",
    "xrange",
    "xrevrange",
    "zadd",
    "zcard",
    "zrange",
    "zrangebyscore",
    "zrem",
    "zscore",
)

_ROLE_COMMANDS: dict[str, tuple[str, ...]] = {
    # EVALSHA runs a transition; SCRIPT LOAD is redis-py's answer to NOSCRIPT
    # after a restart emptied the script cache (EVAL is never sent). SET NX
    # takes the optimizer lease and the sweep lock, BLPOP waits for the
    # lease to be given up; the reads serve NePS's state API and the sweep
    # for expired leases.
    "worker": (
        "evalsha",
        "script|load",
        *_IN_SCRIPTS,
        "xlen",
        "blpop",
    ),
    # `status`, `check` (one MULTI/EXEC snapshot) and following the event
    # stream (XREAD, XREVRANGE for the newest entry).
    "monitor": (
        "exists",
        "get",
        "hget",
        "hgetall",
        "hmget",
        "zcard",
        "zrange",
        "zrangebyscore",
        "zscore",
        "xlen",
        "xrange",
        "xrevrange",
        "xread",
        "time",
        "multi",
        "exec",
    ),
    # `export`: a MULTI/EXEC snapshot of the run, then its trials in chunks;
    # GET reads the stored pipeline space when pickles are allowed.
    "exporter": (
        "exists",
        "get",
        "hget",
        "hgetall",
        "hmget",
        "zrange",
        "xrange",
        "xrevrange",
        "time",
        "multi",
        "exec",
    ),
}

_PLAIN = re.compile(r"[A-Za-z0-9_.:+~%|<>*{}\[\]@=/-]+")

# A run name that is a user name as it is, and what is replaced in others.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9_.-]+")
# How much of a replaced name a user name keeps, and of its hash: 12 hex
# digits (48 bits) make two run names sharing a user practically never.
_PLAIN_PART = 40
_HASH_CHARS = 12


def _supports(server: Any, *, redis: tuple[int, ...], valkey: tuple[int, ...]) -> bool:
    if server is None:
        return False
    least = valkey if server.name == "valkey" else redis
    return tuple(server.version) >= least


def commands(role: str, server: Any = None) -> list[str]:
    """The commands (``name`` or ``name|subcommand``) role `role` needs.

    Without `server` (a `connection.ServerDescription`) the list is the one
    every supported server accepts. With it, commands that server knows are
    added: CLIENT SETINFO (redis-py sends it and ignores a refusal, which
    the server would still log in its ACL LOG) and, for a worker, WAITAOF
    (reports that wait for the AOF, see `connection.supports_waitaof`).
    """
    if role not in _ROLE_COMMANDS:
        raise NePSError(f"Unknown role {role!r}; choose one of {', '.join(ROLES)}.")
    names = [*_CONNECTION, *_ROLE_COMMANDS[role]]
    if _supports(server, redis=(7, 2), valkey=(7, 2)):
        names.append("client|setinfo")
    if role == "worker" and _supports(server, redis=(7, 2), valkey=(8,)):
        names.append("waitaof")
    return sorted(set(names))


def default_user(run: str, role: str) -> str:
    """``neps-<role>-<run>`` when the run's name is plain (letters, digits,
    ``_.-``), else ``neps-<role>-<the name made plain>-<hash of the name>``.

    The hash keeps the users of two runs apart whose names differ only in
    characters that were replaced (``a b`` and ``a:b``), so that one run's
    ``ACL SETUSER ... reset`` never rewrites another run's user.
    """
    if _PLAIN_NAME.fullmatch(run):
        return f"neps-{role}-{run}"
    plain = _NOT_PLAIN.sub("_", run)[:_PLAIN_PART].strip("_.-")
    digest = hashlib.sha256(run.encode()).hexdigest()[:_HASH_CHARS]
    return f"neps-{role}-{plain}-{digest}" if plain else f"neps-{role}-{digest}"


def acl_rules(run: str, role: str, *, server: Any = None) -> list[str]:
    """The ACL SETUSER rules of role `role` on run `run`, one word each.

    The user may reach only the run's keys and no pub/sub channel; the
    password is left to the caller (see `acl_line`).
    """
    keys = RunKeys(run)
    return [
        "on",
        "resetkeys",
        f"~{keys.pattern}",
        "resetchannels",
        "-@all",
        *(f"+{name}" for name in commands(role, server)),
    ]


def _quoted(word: str) -> str:
    """`word` as redis-cli reads it back: bare when plain, else quoted."""
    if _PLAIN.fullmatch(word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def acl_line(
    run: str, role: str, *, user: str | None = None, server: Any = None
) -> str:
    """One ``ACL SETUSER`` command for redis-cli, with a password placeholder."""
    name = user or default_user(run, role)
    rules = acl_rules(run, role, server=server)
    words = ["ACL", "SETUSER", name, "reset", *rules[:1]]
    words += [f">{PASSWORD_PLACEHOLDER}", *rules[1:]]
    return " ".join(_quoted(w) for w in words)
