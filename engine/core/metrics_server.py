"""The /metrics HTTP server: Prometheus' WSGI app behind an accept loop that serves scrapes first.

prometheus_client.start_http_server keeps one thread per connection for as long as the client keeps it
open. Capping those threads (the first fix) made 40 idle connections enough to fill the cap, so every
scrape was refused (0 of 14). Here a connection gets no thread until its request head has arrived: the
accept loop reads heads itself (non-blocking, at most HEAD_MAX_BYTES), so idle or trickling connections
cost a selector entry, not a slot; a connection whose head is not complete `timeout` seconds after it
was accepted is closed; past `max_pending` waiting connections the oldest is closed. A complete request
(a scrape sends its head at once) goes to a thread, at most `max_connections` at a time, and each read
and write there times out too.
"""
from __future__ import annotations

import io
import selectors
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

HEAD_MAX_BYTES = 8 << 10
_TICK_S = 0.1


class _QuietHandler(WSGIRequestHandler):
    """Reads the head the accept loop already read; logs nothing."""

    server: BoundedMetricsServer  # the server this handler serves (socketserver sets it)

    def setup(self):
        super().setup()
        self.rfile = io.BytesIO(self.server.take_head(self.connection))

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


class BoundedMetricsServer(ThreadingMixIn, WSGIServer):
    """WSGI server whose connections wait for their request head in one selector, not in threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections: int, timeout: float, max_pending: int = 256):
        self.max_connections = max_connections
        self.connection_timeout = timeout
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float] = {}  # served connections → deadline
        self._pending: dict[socket.socket, tuple[float, bytearray]] = {}  # insertion order = age
        self._heads: dict[socket.socket, bytes] = {}
        self.refused_total = 0
        self._stop = threading.Event()
        self._stopped = threading.Event()
        super().__init__(address, handler)

    # -- the accept loop ----------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = _TICK_S) -> None:
        sel = selectors.DefaultSelector()
        self.socket.setblocking(False)
        sel.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=poll_interval):
                    if key.fileobj is self.socket:
                        self._accept(sel)
                    else:
                        self._read_head(sel, key.fileobj)
                self._expire(sel, time.monotonic())
        finally:
            for conn in list(self._pending):
                self._drop(sel, conn)
            sel.close()
            self._stopped.set()

    def _accept(self, sel) -> None:
        for _ in range(self.request_queue_size):  # everything queued now, bounded
            try:
                conn, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            if len(self._pending) >= self.max_pending:
                self._drop(sel, next(iter(self._pending)))  # the oldest waiter: scrapes send at once
            self._pending[conn] = (time.monotonic() + self.connection_timeout, bytearray())
            sel.register(conn, selectors.EVENT_READ)

    def _read_head(self, sel, conn: socket.socket) -> None:
        deadline, head = self._pending[conn]
        try:
            data = conn.recv(HEAD_MAX_BYTES + 1 - len(head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or len(head) + len(data) > HEAD_MAX_BYTES:
            self._drop(sel, conn)
            return
        head += data
        if b"\r\n\r\n" not in head and b"\n\n" not in head:
            return
        sel.unregister(conn)
        del self._pending[conn]
        with self._lock:
            full = len(self._open) >= self.max_connections
            if full:
                self.refused_total += 1
            else:
                self._open[conn] = time.monotonic() + self.connection_timeout
                self._heads[conn] = bytes(head)
        if full:
            self.shutdown_request(conn)
            return
        conn.setblocking(True)
        conn.settimeout(self.connection_timeout)
        try:
            self.process_request(conn, conn.getpeername() if conn.family != socket.AF_UNIX else "")
        except OSError:
            with self._lock:
                self._open.pop(conn, None)
                self._heads.pop(conn, None)
            self.shutdown_request(conn)

    def _drop(self, sel, conn: socket.socket) -> None:
        self._pending.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _expire(self, sel, now: float) -> None:
        for conn, (deadline, _) in list(self._pending.items()):
            if deadline >= now:
                break  # in order of acceptance: the rest are younger
            self._drop(sel, conn)
        self._end_connections(now)

    # -- served connections -------------------------------------------------------------------
    def take_head(self, conn) -> bytes:
        with self._lock:
            return self._heads.pop(conn, b"")

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(request, None)
                self._heads.pop(request, None)

    def _end_connections(self, now: float) -> None:
        with self._lock:
            late = [conn for conn, deadline in self._open.items() if deadline < now]
        for conn in late:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # its thread's blocked read or write returns at once
            except OSError:
                pass

    def handle_error(self, request, client_address):
        pass  # a client that timed out or went away is not worth a traceback on stderr

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open) + len(self._pending)

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait(5)

    def close(self) -> None:
        """Stop accepting, close the listening socket and end the connections still open."""
        self.shutdown()
        self.server_close()
        self._end_connections(float("inf"))


def start_metrics_server(app, host: str, port: int, max_connections: int, timeout: float) -> BoundedMetricsServer:
    """Serve WSGI `app` on host:port from a daemon thread; `.server_port` is the bound port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class _Server(BoundedMetricsServer):
        address_family = family

    httpd = _Server((host, port), _QuietHandler, max_connections, timeout)
    httpd.set_app(app)
    threading.Thread(target=httpd.serve_forever, name="moelink-metrics", daemon=True).start()
    return httpd
