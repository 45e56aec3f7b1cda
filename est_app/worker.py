"""The gunicorn worker ``est-server`` runs: connections on greenlets, the app on them or on threads, read deadlines.

A gthread worker gives each open connection a thread while it handshakes and
reads a request, so eight idle TLS connections stopped a 2 x 4 server (issue
7). Here each connection is a greenlet (gevent) until its request has been
read in full; only then is the request computed, on that greenlet or on one of
``server.threads`` app threads (below), so a slow or idle client never holds
one, and the app stays ordinary WSGI code. On top of gunicorn's gevent worker
this one bounds what a client can hold while it is read:

- the TLS handshake and the first request's head must arrive within
  ``server.header_timeout`` of the connection being accepted; a kept-alive
  connection's next head within ``server.keepalive`` (gunicorn's own rule);
- a request body must arrive within ``server.body_timeout`` of its head
  (the app answers 408 and the connection is closed);
- one client address (an IPv6 client by its /64) holds at most
  ``server.max_connections_per_address`` connections in this worker; further
  ones are closed before the handshake. A peer in ``trusted_proxies`` is not
  limited: it carries every client behind it.

A few requests skip the app thread: those whose path the app lists in
``app.extensions["est_inline_paths"]`` (:func:`est_app.inline_paths`: /healthz; /ocsp
and the EST operations where answering never waits on anything but this machine) run
on the connection's greenlet once their body is read. Handing a request to a thread
and its answer back, and the interpreter lock passing between that thread and the
hub, cost more CPU than an OCSP answer and about a third of an enrollment's. What such
a request shares with the app threads waits cooperatively there (est_app/hub.py).

Once answered, a connection waits a turn of the worker's event loop before its next
request is read, so one client sending request after request cannot keep the worker
from the others. With several workers, a worker holding more connections than a
sibling leaves a new one to it (est_app/balance.py).

docs/DEPLOYMENT.md ("Slow and idle clients", "Workers, threads and the cost of a request") has the measurements behind the choices.
"""

from __future__ import annotations

import gc
import io
import time
from collections import Counter
from functools import partial

import gevent
import gevent.local
from gevent import monkey
from gevent import socket as green_socket
from gevent import ssl as gevent_ssl
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.threadpool import ThreadPool
from gunicorn import util
from gunicorn.http.errors import ParseException
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

from . import hub
from .balance import BalancedServer, ConnectionCounts
from .config import ServerSettings, Settings
from .proxy import client_key, in_networks, parse_networks

DRAIN_LIMIT = 64 * 1024  # bytes of an unread body worth reading to keep the connection (EST bodies are a few KiB)
BODY_ERRORS = (RequestTimeout, ParseException, OSError)  # a body that could not be read to its end
# A connection answered waits this long, which is one turn of the hub's loop, before its next request is
# read: gevent.sleep(0) resumes it before the loop polls again (gevent's documentation says so).
NEXT_TURN = 1e-6


class BodyWithDeadline:
    """A request body (gunicorn's ``wsgi.input``) whose reads fail with 408 once ``deadline`` has passed.

    Once read to its end, further reads (gunicorn's and :meth:`ESTWorker.drain`'s, after every
    request) answer ``b""`` at once, without setting a timer.
    """

    def __init__(self, body, deadline: float, timeout: int) -> None:
        self.body, self.deadline, self.timeout = body, deadline, timeout
        self.ended = False

    @property
    def failed(self) -> bool:
        """gunicorn's flag: reading the body raised, where the next request starts is unknown."""
        return getattr(self.body, "failed", False)

    def read(self, size=None) -> bytes:
        if self.ended:
            return b""
        remaining = self.deadline - time.monotonic()
        data = None
        if remaining > 0:
            with gevent.Timeout(remaining, False):
                data = self.body.read(size)
        if data is None:
            raise RequestTimeout(f"request body not received within {self.timeout} s (server.body_timeout)")
        if size is None or size < 0 or len(data) < size:  # gunicorn's Body returns less only at the end
            self.ended = True
        return data


class UnreadableBody(io.RawIOBase):
    """``wsgi.input`` for the app when reading the body failed: every read raises what reading raised."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise self.error


class ESTWorker(GeventWorker):
    """gunicorn's gevent worker with app threads, the deadlines and the per-address limit of ``limits``."""

    limits = ServerSettings()
    max_body_bytes = Settings.max_body_bytes  # the default; worker_class() binds the configured one
    trusted_proxies: tuple = ()  # networks; worker_class() binds the configured ones

    tls_context = None  # made in the master at the first spawn; every worker it forks inherits it
    connection_counts: ConnectionCounts | None = None  # likewise: every worker's open connections (est_app/balance.py)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # This runs in the master, before the fork. One TLS context for all workers means one set of
        # session-ticket keys (OpenSSL makes them with the context): a gateway reconnecting with its
        # ticket resumes whichever worker accepts it, as under nginx without ssl_session_ticket_key.
        # A reload (HUP) makes a new worker class, so a new context: renewed files, new ticket keys.
        if self.cfg.is_ssl and type(self).tls_context is None:
            type(self).tls_context = ssl_context(self.cfg)
        if type(self).connection_counts is None:
            type(self).connection_counts = ConnectionCounts()
        self.slot = self.connection_counts.reserve()

    def patch(self) -> None:
        # Everything but threading: the app threads need real locks, thread-locals and queues.
        monkey.patch_all(thread=False)
        self.sockets = [green_socket.socket(s.FAMILY, green_socket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets]

    def init_process(self) -> None:
        self.connections: Counter[str] = Counter()  # open connections by client address
        self.refusing: set[str] = set()  # addresses refused (and logged) since they last held no connection
        self.connection = gevent.local.local()  # per greenlet: the first request's head deadline
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.flask_app, self.wsgi = self.wsgi, self.call_app_in_thread  # self.app is gunicorn's
        self.inline_paths = tuple(getattr(self.flask_app, "extensions", {}).get("est_inline_paths", ()))

    def run(self) -> None:
        # GeventWorker.run without its TLS wrapping: here the handshake runs in handle(), after the
        # per-address check and under the head deadline (gevent's StreamServer would run it unbounded).
        self.context = self.tls_context if self.cfg.is_ssl else None
        if self.context is not None:
            # Made in the master before gevent patched ssl: gevent's SSLContext (the same C type
            # underneath, its OpenSSL context and ticket keys kept) wraps sockets cooperatively.
            self.context.__class__ = gevent_ssl.SSLContext
        self.app_threads = ThreadPool(self.limits.threads)
        self.connection_counts.take(self.slot)  # siblings leave connections to this worker from now on
        hub.run_greenlets_here()
        # The app, its imports and what it built live as long as the worker: out of the collector's sight,
        # a full collection scans only what requests leave behind, 1-2 ms instead of 70-80 ms during which
        # every connection of the worker waited (bench_enroll's slowest 1% in its first runs).
        gc.freeze()
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            handle, spawn = partial(self.handle, listener), Pool(self.worker_connections)
            if self.cfg.workers > 1:
                server = BalancedServer(listener, self.connection_counts, self.slot, handle=handle, spawn=spawn)
                server.max_accept = 1
            else:
                server = StreamServer(listener, handle=handle, spawn=spawn)
            server.start()
            servers.append(server)

        while self.alive:
            self.notify()
            gevent.sleep(1.0)

        for server in servers:
            server.close()
        stop_by = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < stop_by and any(s.pool.free_count() != s.pool.size for s in servers):
            self.notify()
            gevent.sleep(1.0)
        for server in servers:
            server.stop(timeout=1)
        self.app_threads.kill()
        self.connection_counts.release(self.slot)

    def handle(self, listener, client, addr) -> None:
        address = addr[0] if isinstance(addr, tuple) else ""
        # An IPv6 host counts by its /64; a trusted proxy, which carries every client, is not limited.
        peer = client_key(address)
        limit = 0 if in_networks(address, self.trusted_proxies) else self.limits.max_connections_per_address
        if limit and self.connections[peer] >= limit:
            if peer not in self.refusing:  # once per episode, not once per connection of a flood
                self.refusing.add(peer)
                self.log.warning("closing connections from %s: it holds %d (server.max_connections_per_address)", peer, limit)
            client.close()
            return
        self.connections[peer] += 1
        try:
            self.connection.head_deadline = time.monotonic() + self.limits.header_timeout
            if self.context is not None:
                client = self.context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
                handshaken = False
                with gevent.Timeout(self.limits.header_timeout, False):
                    client.do_handshake()
                    handshaken = True
                if not handshaken:
                    self.log.debug("closed %s: no TLS handshake within %d s", peer, self.limits.header_timeout)
                    client.close()
                    return
            super().handle(listener, client, addr)
        except OSError as exc:  # a handshake the client broke off; gunicorn handles the rest
            self.log.debug("TLS handshake with %s failed: %s", peer, exc)
            client.close()
        finally:
            self.connections[peer] -= 1
            if not self.connections[peer]:
                del self.connections[peer]
                self.refusing.discard(peer)

    def timeout_ctx(self) -> gevent.Timeout:
        """How long the next request's head may take: the rest of header_timeout for the first, keepalive after."""
        deadline = getattr(self.connection, "head_deadline", None)
        self.connection.head_deadline = None
        if deadline is None:
            return gevent.Timeout(self.cfg.keepalive, False)
        return gevent.Timeout(max(deadline - time.monotonic(), 0.001), False)

    def handle_request(self, listener_name, req, sock, addr) -> None:
        timeout = self.limits.body_timeout
        req.body = BodyWithDeadline(req.body, time.monotonic() + timeout, timeout)
        try:
            super().handle_request(listener_name, req, sock, addr)  # StopIteration: the answer said "close"
            self.drain(req.body)
            # The worker's other connections go first. A client whose next request is already buffered would
            # otherwise be answered again and again while theirs wait: OCSP p99 40-46 ms against 7-9.5 ms
            # (bench_operations, docs/DEPLOYMENT.md).
            gevent.sleep(NEXT_TURN)
        except StopIteration:
            # Half-close and linger (RFC 9112 9.6), as gthread does: closing with request bytes unread
            # would send a reset that can destroy the answer (a 408 or 413) before the client reads it.
            util.close_graceful(sock)
            raise

    def call_app_in_thread(self, environ, start_response):
        """WSGI: read the body here, on the connection's greenlet, then run the app to completion on an app thread."""
        try:
            environ["wsgi.input"] = io.BytesIO(self.read_body(environ))
        except BODY_ERRORS as exc:
            environ["wsgi.input"] = io.BufferedReader(UnreadableBody(exc))  # the app answers it (408, 400)

        def run() -> tuple[list, bytes]:
            response, written = [], []

            def capture(status, headers, exc_info=None):
                response[:] = [status, headers, exc_info]
                return written.append

            result = self.flask_app(environ, capture)
            try:
                written.extend(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            return response, b"".join(written)

        if self.runs_inline(environ.get("PATH_INFO", "")):
            (status, headers, exc_info), body = run()
        else:
            (status, headers, exc_info), body = self.app_threads.apply(run)
        start_response(status, headers, exc_info)
        return [body]

    def runs_inline(self, path: str) -> bool:
        """Whether a request for ``path`` runs on the connection's greenlet: one of the app's inline paths, or below one."""
        return any(path == inline or path.startswith(inline + "/") for inline in self.inline_paths)

    def read_body(self, environ) -> bytes:
        """The body, or nothing when its Content-Length already exceeds the limit (the app refuses it unread)."""
        length = environ.get("CONTENT_LENGTH")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            return b""
        # Without a Content-Length (chunked), one byte over the limit tells the app "too large".
        return environ["wsgi.input"].read(self.max_body_bytes + 1)

    @staticmethod
    def drain(body: BodyWithDeadline) -> None:
        """Read what is left of the body (the app refused it by its length), within the deadline and up to
        DRAIN_LIMIT bytes; StopIteration if it cannot be read to its end, since where the next request
        starts is then unknown."""
        drained = 0
        try:
            while not body.failed and drained <= DRAIN_LIMIT:
                chunk = body.read(8192)
                if not chunk:
                    return
                drained += len(chunk)
        except BODY_ERRORS:
            pass
        raise StopIteration


def worker_class(settings: Settings) -> type[ESTWorker]:
    """The gunicorn ``worker_class`` for ``settings``: :class:`ESTWorker` with its threads, deadlines and limits."""
    attributes = {"limits": settings.server, "max_body_bytes": settings.max_body_bytes, "trusted_proxies": parse_networks(settings.trusted_proxies)}
    return type("ESTWorker", (ESTWorker,), attributes)
