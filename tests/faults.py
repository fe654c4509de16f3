"""Fault injection for the tests: a loopback TCP proxy in front of a real server.

:class:`TcpProxy` listens on 127.0.0.1 (ephemeral port) and forwards to an
upstream server (the local PostgreSQL).  Point a shard's URL at
``proxy.port`` and then break it the way a network breaks:

``cut()``
    reset every forwarded connection and refuse new ones (a crashed host,
    a firewall that rejects);
``blackhole()``
    keep every TCP connection open but forward nothing, in either direction,
    and accept new connections without ever answering them (a host that
    vanished behind a router, a half-dead NAT): reads on the client block
    until something on the client's side gives up;
``slow(seconds)``
    delay every forwarded chunk by ``seconds`` (a congested link);
``restore()``
    forward normally again (connections reset by ``cut()`` stay dead).

Everything is bounded: at most ``max_connections`` forwarded pairs, daemon
threads only, and :meth:`close` joins them with a timeout.  The proxy only
ever talks to loopback addresses.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import make_url

__all__ = ["TcpProxy", "proxied_url", "tcp_proxy"]


def _hard_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forward 127.0.0.1:<ephemeral> to ``upstream``; break and mend it on demand."""

    def __init__(self, upstream: tuple[str, int], max_connections: int = 64) -> None:
        if upstream[0] not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the test proxy only forwards to loopback, not {upstream[0]!r}")
        self.upstream = upstream
        self.max_connections = max_connections
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.mode = "forward"  # forward | refuse | blackhole
        self.delay = 0.0
        self.accepted = 0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._spawn(self._accept_loop, "proxy-accept")

    # ------------------------------------------------------------------ plumbing

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._pairs) >= self.max_connections
            if self.mode == "refuse" or full:
                _hard_close(client)
                continue
            if self.mode == "blackhole":
                # accept the TCP connection and never say a word
                with self._lock:
                    self._pairs.append((client, None))
                    self.accepted += 1
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=3)
            except OSError:
                _hard_close(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            self._spawn(self._pump, "proxy-up", client, upstream)
            self._spawn(self._pump, "proxy-down", upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                while self.mode == "blackhole" and not self._stop.is_set():
                    time.sleep(0.01)  # swallow the traffic: hold it until restored or closed
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._pairs = [p for p in self._pairs if src not in p]
            _hard_close(src)
            _hard_close(dst)

    # ------------------------------------------------------------------ faults

    def cut(self) -> None:
        """Reset every forwarded connection and refuse new ones."""
        self.mode = "refuse"
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _hard_close(client)
            if upstream is not None:
                _hard_close(upstream)

    def blackhole(self) -> None:
        """Keep connections open, forward nothing; new connections are accepted and never answered."""
        self.mode = "blackhole"

    def slow(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds``."""
        self.delay = float(seconds)

    def restore(self) -> None:
        """Forward normally again (connections that ``cut()`` reset stay dead)."""
        self.mode = "forward"
        self.delay = 0.0

    def close(self) -> None:
        self._stop.set()
        self.cut()
        _hard_close(self.listener)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=2)


def proxied_url(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@contextlib.contextmanager
def tcp_proxy(url: str) -> Iterator[TcpProxy]:
    """A :class:`TcpProxy` in front of the server of ``url``, closed on exit."""
    parsed = make_url(url)
    proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    try:
        yield proxy
    finally:
        proxy.close()
