"""A loopback TCP proxy in front of the real Redis that can lose one reply.

Everything is forwarded byte for byte, both ways, on a connection of its own to
Redis per client connection. After ``drop_reply_to(marker)``, the next command
whose bytes contain ``marker`` is delivered to Redis, which runs it; its reply is
then thrown away and the client's connection closed, as a network that fails at
that moment would: the client cannot know whether its command ran.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class RedisProxy:
    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 6379) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._marker: bytes | None = None
        self._drop_pending = False
        self._lock = threading.Lock()
        self.seen = 0  # commands that carried the marker
        self.dropped = 0  # replies thrown away
        self._closed = False
        threading.Thread(target=self._accept, name="redis-proxy", daemon=True).start()

    def url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self._listener.getsockname()[1]}/{database}"

    def drop_reply_to(self, marker: bytes) -> None:
        """Lose the reply to the next command carrying ``marker``; count every one that does."""
        with self._lock:
            self._marker, self._drop_pending = marker, True

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            dropping = threading.Event()
            threading.Thread(target=self._upstream, args=(client, server, dropping), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, dropping), daemon=True).start()

    def _marked(self, data: bytes) -> bool:
        """Whether ``data``'s reply is to be lost (the first command carrying the marker)."""
        with self._lock:
            if self._marker is None or self._marker not in data:
                return False
            self.seen += 1
            if not self._drop_pending:
                return False
            self._drop_pending = False
            self.dropped += 1
            return True

    def _upstream(self, client: socket.socket, server: socket.socket, dropping: threading.Event) -> None:
        """Client to Redis: a command carrying the marker is the one whose reply is lost."""
        try:
            while data := client.recv(65536):
                marked = self._marked(data)
                if marked:
                    dropping.set()  # before Redis can answer: nothing more goes back
                server.sendall(data)
                if marked:
                    time.sleep(0.2)  # Redis runs it meanwhile
                    break
        except OSError:
            pass
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _downstream(self, server: socket.socket, client: socket.socket, dropping: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if dropping.is_set():
                    return
                client.sendall(data)
        except OSError:
            pass
