"""A loopback TCP proxy in front of a test server that can lose replies.

Armed with a command name, it forwards the next command of that name to the
server, swallows the server's reply and closes the client's connection, as a
network fault after the server acted would. redis-py then reconnects and
sends the command again: exactly the replay every write must survive.

It can also cut the network: `blackhole` stops forwarding in both
directions (connections stay open, new ones are accepted, nothing passes),
as a partition between a worker and its server would, until `heal`.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class ReplyDroppingProxy:
    """Forwards 127.0.0.1:<port> to a server; loses chosen replies."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._armed: list[bytes] = []
        self._lock = threading.Lock()
        self.dropped = 0
        self._closing = False
        self._blackholed = False
        # Sockets open while the network was cut; `heal` closes them.
        self._cut: list[socket.socket] = []
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_next_reply(self, command: str, times: int = 1) -> None:
        """Lose the reply of the next `times` commands named `command`."""
        with self._lock:
            self._armed += [command.upper().encode()] * times

    def blackhole(self) -> None:
        """Cut the network: from now on no byte passes, either way."""
        with self._lock:
            self._blackholed = True
            self._cut += self._open

    def heal(self) -> None:
        """Forward again. Connections that lived through the cut are closed,
        as their ends would have given up on them; clients reconnect."""
        with self._lock:
            self._blackholed = False
            cut, self._cut = self._cut, []
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._open = [s for s in self._open if s.fileno() != -1]
                self._open += [client, upstream]
                if self._blackholed:
                    self._cut += [client, upstream]
            drop = threading.Event()
            threading.Thread(
                target=self._to_server, args=(client, upstream, drop), daemon=True
            ).start()
            threading.Thread(
                target=self._to_client, args=(upstream, client, drop), daemon=True
            ).start()

    def _to_server(self, client: socket.socket, upstream: socket.socket, drop) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self._blackholed:
                    continue
                with self._lock:
                    for command in self._armed:
                        if f"\r\n{command.decode()}\r\n".encode() in data.upper():
                            self._armed.remove(command)
                            drop.set()
                            break
                upstream.sendall(data)

    def _to_client(self, upstream: socket.socket, client: socket.socket, drop) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if self._blackholed:
                    continue
                if drop.is_set():
                    # The server acted; its reply is lost with the connection.
                    self.dropped += 1
                    for sock in (client, upstream):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                    return
                client.sendall(data)
