"""From a URL (or nothing) to a checked redis-py client.

When no server is named, one order holds everywhere, library and CLI alike:
the ``NEPS_REDIS_URL`` environment variable, else this user's embedded server
if it is running, else ``redis://localhost:6379/0``.

Every client this module makes retries a command whose connection broke,
with jittered exponential backoff, for long enough to outlive a restart of
the server that takes a few seconds. That is safe only because every write
script recognises a replay of itself (see ``lua/includes/replay.lua``).

Passwords never leave this module in clear: use `redact_url` for anything
shown to a person.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from neps_redis import defaults
from neps_redis.errors import InvalidURLError, NePSError, UnsafeServerError
from neps_redis.server import EmbeddedServer
from neps_redis.topology import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    cluster_from_url,
    is_cluster_url,
    is_sentinel_url,
    sentinel_from_url,
)

logger = logging.getLogger(__name__)

URL_ENV = "NEPS_REDIS_URL"
ALLOW_EVICTION_ENV = "NEPS_REDIS_ALLOW_EVICTION"

# What redis-py itself reads; the cluster and Sentinel schemes are topology.py's.
_PLAIN_SCHEMES = ("redis", "rediss", "unix")
# Every scheme a URL may have, in the order an error message lists them.
URL_SCHEMES = (*_PLAIN_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)


_SECRET_PARAMS = ("password", "ssl_password", "ssl_keyfile_password")


def url_secrets(url: str) -> list[str]:
    """Every password a URL carries: in its user info (even with an unquoted
    ``@`` or ``/`` inside, which URL parsers get wrong) and in its query."""
    secrets_: list[str] = []
    _, sep, rest = url.partition("://")
    if sep:
        before_query = rest.split("?", 1)[0]
        userinfo, at, _ = before_query.rpartition("@")
        if at and ":" in userinfo:
            secrets_.append(userinfo.split(":", 1)[1])
    query = url.partition("?")[2]
    for param in query.split("&"):
        name, eq, value = param.partition("=")
        if eq and name.lower() in _SECRET_PARAMS and value:
            secrets_.append(value)
    return [s for s in secrets_ if s]


def redact_text(text: str, url: str | None) -> str:
    """`text` with every password of `url` replaced by ``***``."""
    if not url:
        return text
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***``."""
    return redact_text(url, url)


def resolve_url(url: str | None = None) -> str:
    """The URL to use: `url`, else NEPS_REDIS_URL, else the embedded server,
    else the local default."""
    if url:
        return url
    if env := os.environ.get(URL_ENV):
        return env
    embedded = EmbeddedServer()
    if embedded.is_running():
        return embedded.url
    return defaults.FALLBACK_URL


def _incurable(error: Exception) -> bool:
    """Whether no retry can cure `error`: a refused password, or a server
    certificate that does not verify.

    redis-py makes both a ConnectionError, the class retried for a server
    that restarts; retrying them only delays the message by the whole
    backoff. Other TLS errors (a handshake cut by a restart) stay retried.
    """
    if isinstance(error, AuthenticationError):
        return True
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class _Retry(Retry):
    """redis-py's Retry, giving up at once on an incurable error."""

    def call_with_retry(  # type: ignore[override]
        self,
        do: Any,
        fail: Any,
        is_retryable: Any = None,
        with_failure_count: bool = False,
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if _incurable(error):
                return False
            return is_retryable(error) if is_retryable else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def retry_policy(retries: int = defaults.CONNECTION_RETRIES) -> Retry:
    """Retries for a broken connection: 10 tries, 50 ms to 2 s apart.

    Half of each pause is fixed and half random, so that the tries together
    wait at least 6.5 s (a restarted server is back) while workers that lost
    the server at the same moment do not all come back at the same moment.
    A wrong password or certificate fails at once.
    """
    backoff = EqualJitterBackoff(
        base=defaults.CONNECTION_BACKOFF_BASE, cap=defaults.CONNECTION_BACKOFF_CAP
    )
    return _Retry(backoff, retries=retries)


def client_from_url(url: str, **kwargs: Any) -> Any:
    """A client for `url` with the package's retry policy set explicitly: a
    redis.Redis, or a redis.RedisCluster for ``redis+cluster://`` (see
    topology.py)."""
    options: dict[str, Any] = {
        "retry": retry_policy(),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "health_check_interval": 30,
    }
    options.update(kwargs)
    shown = redact_url(url)
    try:
        if is_cluster_url(url):
            return cluster_from_url(url, shown, **options)
        if is_sentinel_url(url):
            return sentinel_from_url(url, shown, **options)
    except NePSError as error:
        # Both parse the URL before they connect, and a failure to connect
        # is a RedisError: every NePSError of theirs is about the URL.
        raise InvalidURLError(str(error)) from None
    scheme = url.partition("://")[0].lower()
    if scheme not in _PLAIN_SCHEMES:
        raise InvalidURLError(
            f"Invalid Redis URL {shown!r}: it must start with one of"
            f" {', '.join(f'{s}://' for s in URL_SCHEMES)}."
        )
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as error:
        reason = str(error).rstrip(".")
        raise InvalidURLError(f"Invalid Redis URL {shown!r}: {reason}.") from None


# Connection settings that belong to one pool and must not be copied into
# another: the new pool makes its own.
_POOL_BOUND = ("maint_notifications_pool_handler",)


def private_client(client: Any, **overrides: Any) -> Any:
    """A client of the same server as `client`, with connections of its own.

    A background thread (a heartbeat) uses one, so that it never waits for a
    connection behind the caller's commands and its own timeouts and retries
    can differ (`overrides` go to each connection). A client whose pool
    cannot be copied (Sentinel, Cluster) is returned as it is: redis-py's
    clients are safe to share between threads, only pipelines are not.
    """
    pool = getattr(client, "connection_pool", None)
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        return client
    kwargs = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if name not in _POOL_BOUND and not name.startswith("orig_")
    }
    kwargs.update(overrides)
    copy = type(pool)(connection_class=pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=copy)


def connect(target: Any = None) -> Any:
    """A client for `target`: a URL, a redis-py client (returned as is), or
    None (see `resolve_url`)."""
    if target is None or isinstance(target, str):
        return client_from_url(resolve_url(target))
    if hasattr(target, "execute_command") and hasattr(target, "register_script"):
        return target
    raise TypeError(
        "redis must be a URL, a redis.Redis or redis.RedisCluster client, or"
        f" None; got {type(target).__name__}."
    )


def tls_failure(error: BaseException, where: str) -> str | None:
    """One readable line for a connection that failed in its TLS handshake,
    or None when `error` has another cause.

    redis-py wraps the `ssl` error in its own ConnectionError, whose text
    is a long line ending in a C source position; a person needs to know
    that the certificate was refused and which setting to look at.
    """
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed for the server at {where}:"
            f" {reason or cause}. Check that ssl_ca_certs in the URL names the CA"
            " that signed the server's certificate, and that the certificate names"
            " the host you connect to."
        )
    return (
        f"The TLS handshake with the server at {where} failed: {reason or cause}."
        " If the server requires client certificates, give ssl_certfile and"
        " ssl_keyfile in the URL."
    )


def describe_client(client: Any) -> str:
    """Where a client points, password-free, for messages and equality."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        nodes = getattr(client, "startup_nodes", None) or []
        return "cluster:" + ",".join(sorted(n.name for n in nodes))
    kw = pool.connection_kwargs
    if service := getattr(pool, "service_name", None):
        return f"sentinel:{service}/{kw.get('db', 0)}"
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if "SSL" in pool.connection_class.__name__ else "redis"
    return f"{scheme}://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


@dataclass(frozen=True)
class ServerDescription:
    """What a server says it is."""

    name: str  # "redis" or "valkey"
    version: tuple[int, ...]
    maxmemory_policy: str | None  # None when the check was not permitted

    @property
    def label(self) -> str:
        return f"{self.name} {'.'.join(map(str, self.version))}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def describe_server(client: Any) -> ServerDescription:
    """The server's kind and version (Valkey reports a Redis version of its
    own, so its own fields are read first) and its eviction policy."""
    info = client.info("server")
    if info and all(isinstance(v, dict) for v in info.values()):
        info = next(iter(info.values()))  # a cluster answers per node
    name = str(info.get("server_name") or "redis").lower()
    raw = info.get("valkey_version") if name == "valkey" else None
    version = _version(str(raw or info.get("redis_version", "0")))
    try:
        reply = client.config_get("maxmemory-policy")
    except ResponseError as error:
        logger.debug("CONFIG GET refused: %s", error)
        policy = None
    else:
        if reply and all(isinstance(v, dict) for v in reply.values()):
            reply = next(iter(reply.values()))
        value = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")
        policy = value.decode() if isinstance(value, bytes) else value
    return ServerDescription(name=name, version=version, maxmemory_policy=policy)


_checked: weakref.WeakKeyDictionary[Any, ServerDescription] = (
    weakref.WeakKeyDictionary()
)


def check_server(client: Any) -> ServerDescription:
    """Refuse a server that may evict keys; warn when that cannot be checked.

    Eviction would silently delete trials and leases. Setting
    NEPS_REDIS_ALLOW_EVICTION=1 turns the refusal into a warning. The result
    is remembered per client.
    """
    if (known := _checked.get(client)) is not None:
        return known
    where = redact_url(describe_client(client))
    try:
        server = describe_server(client)
    except RedisConnectionError as error:
        if (message := tls_failure(error, where)) is None:
            raise
        raise NePSError(message) from None
    if server.maxmemory_policy is None:
        warnings.warn(
            f"Could not verify the eviction policy of the server at {where}"
            " (CONFIG GET is not permitted). If its maxmemory-policy is not"
            " 'noeviction', Redis may silently delete trials.",
            stacklevel=3,
        )
    elif server.maxmemory_policy != "noeviction":
        message = (
            f"The server at {where} has maxmemory-policy"
            f" '{server.maxmemory_policy}': when it runs out of memory it may"
            " silently delete trials and leases. Set it to 'noeviction'"
            " (CONFIG SET maxmemory-policy noeviction)"
        )
        if not defaults.env_flag(ALLOW_EVICTION_ENV):
            raise UnsafeServerError(
                f"{message}, or set {ALLOW_EVICTION_ENV}=1 to accept the risk."
            )
        warnings.warn(message + ".", stacklevel=3)
    # A client that cannot be weakly referenced is simply checked each time.
    with contextlib.suppress(TypeError):
        _checked[client] = server
    return server


WAIT_AOF_ENV = "NEPS_REDIS_WAIT_AOF"

# How long a report waits for the local fsync. An AOF that is not on disk
# after this long means a stalled disk, which the log then reports.
WAIT_AOF_TIMEOUT_MS = 10_000


def supports_waitaof(server: ServerDescription) -> bool:
    """Whether the server has WAITAOF (Redis 7.2, and Valkey, which forked
    from Redis 7.2.4, from its first release)."""
    return server.name == "valkey" or server.version >= (7, 2)


def aof_wait_ms(
    client: Any, server: ServerDescription, wanted: bool | None
) -> int | None:
    """The WAITAOF timeout for reports, or None when reports do not wait.

    `wanted` None means NEPS_REDIS_WAIT_AOF. Asking for the wait where it
    cannot be had is refused rather than ignored: a caller who asked for it
    counts on it.

    Raises:
        NePSError: The server lacks WAITAOF or has no AOF, or `client` is a
            Cluster client (a keyless WAITAOF could reach another node than
            the write).
    """
    if wanted is None:
        wanted = defaults.env_flag(WAIT_AOF_ENV)
    if not wanted:
        return None

    where = redact_url(describe_client(client))
    if getattr(client, "connection_pool", None) is None:
        raise NePSError(
            f"Waiting for the AOF ({WAIT_AOF_ENV}, wait_aof) is not supported on"
            f" Redis Cluster ({where})."
        )
    if not supports_waitaof(server):
        raise NePSError(
            f"Waiting for the AOF ({WAIT_AOF_ENV}, wait_aof) needs WAITAOF, which"
            f" the server at {where} ({server.label}) does not have: it came with"
            " Redis 7.2 and Valkey. Unset it, or use a newer server."
        )
    persistence = client.info("persistence")
    if not int(persistence.get("aof_enabled", 0)):
        raise NePSError(
            f"Waiting for the AOF ({WAIT_AOF_ENV}, wait_aof) needs the server at"
            f" {where} to write one: set 'appendonly yes' there."
        )
    return WAIT_AOF_TIMEOUT_MS
