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
from redis.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.sentinel import Sentinel, SentinelManagedConnection

from neps_redis.errors import NePSError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

# How often a connection behind Sentinel checks that its server is still
# the primary: the longest a worker writes to a replaced primary.
SENTINEL_CHECK_SECONDS = 1.0

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
    return redis.RedisCluster(startup_nodes=_hosts(hosts, shown), **kwargs)


class _PrimaryConnection(SentinelManagedConnection):
    """A connection that refuses to talk to a server that is not a primary.

    During a failover the Sentinels may still name the old primary for a
    moment, and a demoted primary answers reads (not writes) from a data
    set that a full resync may have just emptied: a worker that read an
    empty run there would think the run had no trials. Checking ROLE on
    connect turns that into a connection error, which the retry policy
    retries after asking the Sentinels again.
    """

    _primary_checked = 0.0

    def check_health(self) -> None:
        # A primary that Sentinel replaced keeps answering as a primary
        # until the Sentinels demote it (about ten seconds: their INFO
        # period), and every write it takes meanwhile is lost. So before a
        # command, at most once a SENTINEL_CHECK_SECONDS, the connection
        # asks whether its server is still the one the Sentinels name, and
        # leaves it at once if not. (redis-py's own health check would not
        # do: it runs only on a connection idle for its whole interval.)
        super().check_health()
        now = time.monotonic()
        if self._sock is None or now - self._primary_checked < SENTINEL_CHECK_SECONDS:
            return
        self._primary_checked = now
        primary = tuple(self.connection_pool.get_master_address())
        if primary != (self.host, self.port):
            self.disconnect()
            raise RedisConnectionError(
                f"{self.host}:{self.port} is no longer the primary; the"
                f" Sentinels name {primary[0]}:{primary[1]}."
            )

    def on_connect(self) -> None:
        super().on_connect()
        self.send_command("ROLE")
        role = self.read_response()
        name = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if name != "master":
            self.disconnect()
            raise RedisConnectionError(
                f"{self.host}:{self.port} is a {name}, not the primary (yet)."
            )


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
    if scheme.lower() == "rediss+sentinel":
        kwargs["ssl"] = True
    else:
        kwargs["connection_class"] = _PrimaryConnection
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
