"""A TCP proxy a test can cut and restore: the network link between a site node and the central site."""
from __future__ import annotations

import contextlib
import socket
import threading

from tests.pg_harness import free_port


class CuttableLink:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut_off = False
        self.answers_lost = False  # requests still reach the far end; what it answers never comes back
        self.silent = False  # nothing gets through either way, and nothing is closed: a black hole
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # an idle connection stays open, as across a real link
            with self._lock:
                self._sockets += [client, upstream]
            for a, b, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, answers), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if not self.silent and not (answers and self.answers_lost):
                    target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Both ends stay up; nothing gets through, and open connections die."""
        self.cut_off = True
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._sockets.clear()

    def lose_answers(self) -> None:
        """The link fails the worst way: what is sent still arrives and is acted on, but no answer comes back, and no
        connection is closed (the sender learns nothing but a timeout)."""
        self.answers_lost = True

    def black_hole(self) -> None:
        """The link goes dark, as when the far end loses power or a WAN link fails: every byte is dropped, new connections
        are taken and left hanging, and nothing is closed or reset (the sender learns nothing but its timeouts)."""
        self.silent = True

    def restore(self) -> None:
        self.cut_off = False
        self.answers_lost = False
        self.silent = False

    def close(self) -> None:
        self.cut()
        self._server.close()
