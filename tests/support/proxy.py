"""A TCP proxy the test owns, to cut PostgreSQL without touching the machine's shared server.

Modes:
- `forward`: bytes flow both ways;
- `refuse`: the listener is closed and live connections are reset (connection refused);
- `blackhole`: connections are accepted and live ones kept open, but nothing is forwarded either way
  (a silent network partition: no error, no answer).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self._selector = selectors.DefaultSelector()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._listen()
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- control --------------------------------------------------------------------------------------

    def refuse(self) -> None:
        with self._lock:
            self.mode = "refuse"
            self._close_listener()
            self._drop_all()

    def blackhole(self) -> None:
        with self._lock:
            self.mode = "blackhole"

    def forward(self) -> None:
        with self._lock:
            if self.mode == "blackhole":
                self._drop_all()  # half-dead sessions would confuse both ends; make them fail cleanly
            self.mode = "forward"
            if self._listener is None:
                self._listen()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._close_listener()
            self._drop_all()

    # -- internals --------------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, "accept")

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _drop_all(self) -> None:
        for client, server in self._pairs:
            for sock in (client, server):
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()
        for sock in self._held:
            sock.close()
        self._pairs.clear()
        self._held.clear()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                with self._lock:
                    if key.data == "accept":
                        self._accept(key.fileobj)  # type: ignore[arg-type]
                    elif self.mode == "forward":
                        self._pump(key.fileobj, key.data)  # type: ignore[arg-type]
            if self.mode == "blackhole":
                self._stopped.wait(0.05)

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except (BlockingIOError, OSError):
            return
        if self.mode == "blackhole":
            self._held.append(client)  # accepted, never answered
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        client.setblocking(False)
        server.setblocking(False)
        self._pairs.append((client, server))
        self._selector.register(client, selectors.EVENT_READ, server)
        self._selector.register(server, selectors.EVENT_READ, client)

    def _pump(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            data = source.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pair(source, destination)
            return
        try:
            destination.setblocking(True)
            destination.sendall(data)
            destination.setblocking(False)
        except OSError:
            self._close_pair(source, destination)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        for sock in (a, b):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._pairs = [p for p in self._pairs if a not in p]
