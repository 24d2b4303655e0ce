"""URLs that name more than one server: a Redis Cluster or a Sentinel set.

``redis+cluster://[user:password@]host:port[,host:port...]/`` gives a
`redis.RedisCluster` that learns the whole cluster from any of the nodes
named. ``rediss+cluster://`` is the same over TLS. A cluster has no
databases, so the path must be empty or ``/``.

``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``
asks the Sentinels named for the primary of `service` and gives a client
that follows it through failovers (`redis.sentinel.Sentinel.master_for`):
a command that meets a demoted or vanished primary fails with a connection
error, which the package's retry policy retries against the new one. The
password is the data servers'; the Sentinels are asked without one.

Every key of a run shares the run's hash tag, so a run lives in one slot of
one primary; nothing here needs to know that, but it is why every script
and pipeline of the package works on a cluster unchanged.

This module only builds clients; it never sends a command.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from neps_redis.errors import NePSError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

# How often a connection behind Sentinel asks the Sentinels whether its
# server is still the primary: the longest a worker goes on with a replaced
# primary once the Sentinels name the new one. Each check is one small
# request to a Sentinel.
SENTINEL_CHECK_SECONDS = 0.5

# Connection options a RedisCluster passes on to the client of each node;
# anything else in the package's defaults would be refused by it.
_NODE_OPTIONS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def _addresses(text: str, shown: str) -> list[tuple[str, int]]:
    return [(n.host, n.port) for n in _hosts(text, shown)]


def _hosts(text: str, shown: str) -> list[ClusterNode]:
    nodes = []
    for part in text.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise NePSError(
                f"Invalid cluster URL {shown!r}: each node must be host:port,"
                f" got {part!r}."
            )
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return nodes


class _Cluster(redis.RedisCluster):
    """A RedisCluster whose commands outlive the restart of a primary.

    redis-py retries a command that met a connection error at once, as many
    times as its retry policy says, refreshing the slot map in between but
    never waiting: against a primary that takes a second to come back, every
    try fails within milliseconds. Here the retry policy's backoff spaces
    whole attempts instead, as it does for a client of one server.
    """

    def __init__(self, *args: Any, patience: Retry, **kwargs: Any) -> None:
        # Set first: redis-py's constructor already sends commands.
        self._patience = patience
        super().__init__(*args, **kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # Re-sending a write is safe for the same reason as on one server:
        # every write script recognises a replay of itself.
        return self._patience.call_with_retry(
            lambda: super(_Cluster, self).execute_command(*args, **kwargs),
            lambda error: None,
        )


def cluster_from_url(url: str, shown: str, **options: Any) -> redis.RedisCluster:
    """A RedisCluster client for a ``redis+cluster://`` URL.

    `shown` is the URL without its password, for messages; `options` are the
    package's client defaults (retry policy, timeouts).
    """
    scheme, _, rest = url.partition("://")
    location, _, query = rest.partition("?")
    if query:
        raise NePSError(
            f"Invalid cluster URL {shown!r}: query options are not supported."
        )
    userinfo, at, hosts_and_path = location.rpartition("@")
    hosts, _, path = hosts_and_path.partition("/")
    if path:
        raise NePSError(
            f"Invalid cluster URL {shown!r}: a cluster has only database 0,"
            " so the URL must end in '/' or after the last port."
        )

    kwargs: dict[str, Any] = {
        name: options[name] for name in _NODE_OPTIONS if name in options
    }
    patience = options.get("retry") or Retry(NoBackoff(), 0)
    if "retry" in options:
        kwargs["retry"] = options["retry"]
    if at:
        username, _, password = userinfo.partition(":")
        if username:
            kwargs["username"] = unquote(username)
        if password:
            kwargs["password"] = unquote(password)
    if scheme.lower() == "rediss+cluster":
        kwargs["ssl"] = True
    return _Cluster(startup_nodes=_hosts(hosts, shown), patience=patience, **kwargs)


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the server the Sentinels name as primary, and no other.

    A failover offers three ways to reach the wrong server, and each has its
    own guard:

    - A reconnect to the old address. redis-py asks the Sentinels only in
      `connect`; the reconnects it makes inside a command (a retry, a
      connection closed by a failed check) open a socket to the address the
      connection had, which after a failover is the replaced primary. So
      every socket asks the Sentinels first (`_connect`).
    - A replica. A Sentinel that missed the failover still names the old
      primary after its demotion, and a demoted server answers reads from a
      data set that a full resync may have just emptied: a worker that read
      an empty run there would think the run had no trials. So a new
      connection asks the server its role and leaves a replica at once
      (`on_connect_check_health`). A connection that was open when its
      server was demoted is closed by the Sentinels (CLIENT KILL), and a
      write that still reaches one is answered READONLY, which redis-py
      turns into a connection error; both are retried here.
    - A replaced primary that still answers as one. Sentinel demotes the old
      primary only when it next polls it (about ten seconds after the
      failover), and until then it takes reads and writes that the new
      primary never sees. So before a command, at most once a
      SENTINEL_CHECK_SECONDS, the connection asks the Sentinels whether its
      server is still the one they name (`check_health`).

    Every refusal is a connection error, which the package's retry policy
    retries: on a new socket, to the server the Sentinels name by then.
    """

    _confirmed_at = 0.0

    def _connect(self) -> Any:
        self.host, self.port = self.connection_pool.get_master_address()
        self._confirmed_at = time.monotonic()
        return super()._connect()

    def on_connect_check_health(self, check_health: bool = True) -> None:
        # redis-py 6 and later call this on every new socket, directly or
        # through `on_connect`.
        super().on_connect_check_health(check_health)
        self._require_primary()

    def on_connect(self) -> None:
        super().on_connect()
        if not hasattr(SentinelManagedConnection, "on_connect_check_health"):
            self._require_primary()  # redis-py 5

    def _require_primary(self) -> None:
        # INFO rather than ROLE: every ACL user of the package may send INFO
        # (see acl.py), while ROLE is an admin command.
        self.send_command("INFO", "replication", check_health=False)
        reply = self.read_response()
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        fields = dict(line.partition(":")[::2] for line in text.splitlines())
        role = fields.get("role", "").strip() or "server of unknown role"
        if role != "master":
            self.disconnect()
            raise RedisConnectionError(
                f"{self.host}:{self.port} is a {role}, not the primary (yet)."
            )

    def check_health(self) -> None:
        # redis-py's own health check would not do: it runs only on a
        # connection idle for its whole interval, and a busy worker's never
        # is.
        super().check_health()
        now = time.monotonic()
        if self._sock is None or now - self._confirmed_at < SENTINEL_CHECK_SECONDS:
            return
        self._confirmed_at = now
        primary = tuple(self.connection_pool.get_master_address())
        if primary != (self.host, self.port):
            self.disconnect()
            raise RedisConnectionError(
                f"{self.host}:{self.port} is no longer the primary; the"
                f" Sentinels name {primary[0]}:{primary[1]}."
            )


class _PrimarySSLConnection(_PrimaryConnection, SSLConnection):
    """`_PrimaryConnection` over TLS."""


def sentinel_from_url(url: str, shown: str, **options: Any) -> redis.Redis:
    """A client of the current primary of a ``redis+sentinel://`` URL's
    service, which finds the new primary after a failover."""
    scheme, _, rest = url.partition("://")
    location, _, query = rest.partition("?")
    if query:
        raise NePSError(
            f"Invalid Sentinel URL {shown!r}: query options are not supported."
        )
    userinfo, at, hosts_and_path = location.rpartition("@")
    hosts, _, path = hosts_and_path.partition("/")
    service, _, db = path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise NePSError(
            f"Invalid Sentinel URL {shown!r}: expected"
            " redis+sentinel://host:port[,host:port...]/service_name[/db]."
        )

    kwargs: dict[str, Any] = dict(options)
    kwargs["db"] = int(db or 0)
    if at:
        username, _, password = userinfo.partition(":")
        if username:
            kwargs["username"] = unquote(username)
        if password:
            kwargs["password"] = unquote(password)
    tls = scheme.lower() == "rediss+sentinel"
    kwargs["connection_class"] = _PrimarySSLConnection if tls else _PrimaryConnection
    # The Sentinels themselves get only the timeouts: their own answers are
    # small, and the data servers' password is not theirs.
    sentinel_kwargs = {
        name: options[name]
        for name in ("socket_timeout", "socket_connect_timeout")
        if name in options
    }
    sentinel = Sentinel(
        _addresses(hosts, shown), sentinel_kwargs=sentinel_kwargs, **sentinel_kwargs
    )
    return sentinel.master_for(service, **kwargs)
