"""The gunicorn worker ``est-server`` runs: gevent, with read deadlines and a per-address connection limit.

A gthread worker gives each open connection a thread while it handshakes and
reads a request, so eight idle TLS connections stopped a 2 x 4 server (issue
7). Here each connection is a greenlet, waiting costs no thread, and the app
stays ordinary synchronous WSGI code (gevent patches the standard library).
On top of gunicorn's gevent worker this one bounds what a slow client can hold:

- the TLS handshake and the first request's head must arrive within
  ``server.header_timeout`` of the connection being accepted; a kept-alive
  connection's next head within ``server.keepalive`` (gunicorn's own rule);
- a request body must arrive within ``server.body_timeout`` of its head
  (the app answers 408 and the connection is closed);
- one client address holds at most ``server.max_connections_per_address``
  connections in this worker; further ones are closed before the handshake.

docs/DEPLOYMENT.md ("Slow and idle clients") has the measurements behind the choice.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

import gevent
import gevent.local
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.http.errors import ParseException
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

from .config import ServerSettings

DRAIN_LIMIT = 64 * 1024  # bytes of an unread body worth reading to keep the connection (EST bodies are a few KiB)


class BodyWithDeadline:
    """A request body (gunicorn's ``wsgi.input``) whose reads fail with 408 once ``deadline`` has passed."""

    def __init__(self, body, deadline: float, timeout: int) -> None:
        self.body, self.deadline, self.timeout = body, deadline, timeout

    def _before_deadline(self, read, *args):
        remaining = self.deadline - time.monotonic()
        error = RequestTimeout(f"request body not received within {self.timeout} s (server.body_timeout)")
        if remaining <= 0:
            raise error
        with gevent.Timeout(remaining, error):
            return read(*args)

    @property
    def failed(self) -> bool:
        """gunicorn's flag: reading the body raised, where the next request starts is unknown."""
        return getattr(self.body, "failed", False)

    def read(self, size=None) -> bytes:
        return self._before_deadline(self.body.read, size)

    def readline(self, size=None) -> bytes:
        return self._before_deadline(self.body.readline, size)

    def readlines(self, size=None) -> list[bytes]:
        return self._before_deadline(self.body.readlines, size)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class ESTWorker(GeventWorker):
    """gunicorn's gevent worker with the deadlines and the per-address limit of ``limits``."""

    limits = ServerSettings()

    def init_process(self) -> None:
        self.connections: Counter[str] = Counter()  # open connections by client address
        self.refusing: set[str] = set()  # addresses refused (and logged) since they last held no connection
        self.connection = gevent.local.local()  # per greenlet: the first request's head deadline
        super().init_process()

    def run(self) -> None:
        # GeventWorker.run without its TLS wrapping: here the handshake runs in handle(), after the
        # per-address check and under the head deadline (gevent's StreamServer would run it unbounded).
        self.context = ssl_context(self.cfg) if self.cfg.is_ssl else None
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            server = StreamServer(listener, handle=partial(self.handle, listener), spawn=Pool(self.worker_connections))
            if self.cfg.workers > 1:
                server.max_accept = 1
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

    def handle(self, listener, client, addr) -> None:
        peer = addr[0] if isinstance(addr, tuple) else ""
        limit = self.limits.max_connections_per_address
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
        except StopIteration:
            # Half-close and linger (RFC 9112 9.6), as gthread does: closing with request bytes unread
            # would send a reset that can destroy the answer (a 408 or 413) before the client reads it.
            util.close_graceful(sock)
            raise

    @staticmethod
    def drain(body: BodyWithDeadline) -> None:
        """Read what the app left unread (a 401 or 413 answered before reading), within the deadline and
        up to DRAIN_LIMIT bytes, rather than by gunicorn's parser without either; StopIteration if it cannot
        be read to its end, since where the next request starts is then unknown."""
        drained = 0
        try:
            while not body.failed and drained <= DRAIN_LIMIT:
                chunk = body.read(8192)
                if not chunk:
                    return
                drained += len(chunk)
        except (RequestTimeout, ParseException, OSError):
            pass
        raise StopIteration


def worker_class(server: ServerSettings) -> type[ESTWorker]:
    """The gunicorn ``worker_class`` for ``server``: :class:`ESTWorker` with its deadlines and limit."""
    return type("ESTWorker", (ESTWorker,), {"limits": server})
