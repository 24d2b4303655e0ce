"""Loads the Lua transitions and runs them; the only module that runs Lua.

Each file in ``lua/`` is one transition. Before it goes to the server it is
prefixed with the shared error-code table (from `errors.ERROR_CODES`) and the
helpers in ``lua/includes/``. Scripts run with EVALSHA and fall back to EVAL
when the server's script cache was emptied (restart, failover, SCRIPT FLUSH);
redis-py's `Script` object does exactly that.

An error reply whose first word is a known code becomes that code's
exception; any other server error is left as redis-py raised it.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from neps_redis.errors import ERROR_CODES, TrialAlreadyExistsError

logger = logging.getLogger(__name__)

# Helpers in the order they must be defined (later ones call earlier ones).
INCLUDES = (
    "fail",
    "now_ms",
    "replay",
    "emit",
    "index",
    "args",
    "rewrite",
    "handoff",
)

TRANSITIONS = (
    "create_run",
    "register_worker",
    "store_trials",
    "claim",
    "report",
    "put_trial",
    "reset_trial",
    "remove_trial",
    "release_lease",
    "heartbeat",
    "requeue_expired",
    "import_run",
    "delete_run",
)


def lua_dir() -> Path:
    """Where the Lua files are: inside the installed package, else the checkout."""
    packaged = resources.files("neps_redis") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "lua"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"The Lua scripts were found neither in the package ({packaged}) nor in"
        f" a checkout ({checkout}); the installation is incomplete."
    )


def _error_table() -> str:
    entries = ", ".join(f"{code}='{code}'" for code in ERROR_CODES)
    return f"local E = {{{entries}}}\n"


@cache
def source(name: str) -> str:
    """The full text sent to the server for transition `name`."""
    folder = lua_dir()
    parts = [_error_table()]
    parts += [(folder / "includes" / f"{inc}.lua").read_text() for inc in INCLUDES]
    parts.append((folder / f"{name}.lua").read_text())
    return "\n".join(parts)


def raise_for_error(error: ResponseError) -> None:
    """Raise the package's exception for a script's coded error reply."""
    message = str(error)
    code, _, detail = message.partition(" ")
    if code not in ERROR_CODES:
        raise error
    cls, _meaning = ERROR_CODES[code]
    if cls is TrialAlreadyExistsError:
        raise TrialAlreadyExistsError(detail) from None
    raise cls(_describe(code, detail)) from None


def _describe(code: str, detail: str) -> str:
    if code == "NEPS_TRIAL_NOT_FOUND":
        return f"Trial '{detail}' not found."
    if code == "NEPS_LEASE_LOST":
        return (
            f"The lease on '{detail}' is no longer this worker's: it expired or"
            " another worker took it over. The result was recorded as an event"
            " and not stored."
            if detail != "the optimizer lease expired or was taken"
            else "The optimizer lease expired or was taken by another worker;"
            " nothing was stored."
        )
    return detail


class Scripts:
    """The transitions, registered on one client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._scripts = {
            name: client.register_script(source(name)) for name in TRANSITIONS
        }

    def run(
        self,
        name: str,
        keys: list[str],
        args: list[Any],
        *,
        wait_aof_ms: int | None = None,
    ) -> Any:
        """Run transition `name`; coded errors become exceptions.

        With `wait_aof_ms`, the reply comes once the write is in the
        server's AOF on disk (WAITAOF), or after that many milliseconds.
        """
        try:
            if wait_aof_ms is not None:
                return self._run_then_wait_aof(name, keys, args, wait_aof_ms)
            return self._scripts[name](keys=keys, args=args, client=self._client)
        except ResponseError as error:
            raise_for_error(error)
            raise  # raise_for_error always raises; this keeps type checkers calm

    def _run_then_wait_aof(
        self, name: str, keys: list[str], args: list[Any], timeout_ms: int
    ) -> Any:
        # WAITAOF waits for the last write of the connection it is sent on,
        # so it must follow the script on the same connection. A pipeline
        # without MULTI holds one connection for both and costs one round
        # trip. It cannot use redis-py's NOSCRIPT fallback (a pipeline would
        # send SCRIPT EXISTS first, one more command for the ACL), so this
        # loads the script itself when the cache was emptied and sends the
        # pair again: the script did not run, and had it run, its request
        # key would answer the second copy with the first reply. A pipeline
        # broken by a lost connection is re-sent by redis-py's retry, which
        # the request key makes safe in the same way.
        script = self._scripts[name]
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAITAOF", 1, 0, timeout_ms)
            reply, synced = pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 1:
                self._client.script_load(script.script)
                continue
            break
        if isinstance(reply, Exception):
            raise reply
        if isinstance(synced, Exception):
            raise synced
        if int(synced[0]) < 1:
            logger.error(
                "The %s write is not in the server's AOF on disk after %d ms;"
                " it is applied, but a crash of the machine now could lose it."
                " Check the server's disk.",
                name,
                timeout_ms,
            )
        return reply
