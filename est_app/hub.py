"""Waiting on est-server's gevent hub: what shared code does when it runs on a connection's greenlet.

est-server (est_app/worker.py) answers some requests on the greenlet that read them,
in the thread that runs the worker's gevent hub, instead of handing them to an app
thread. There, blocking the thread stops every connection of the worker, and a
real lock held by a greenlet that is waiting cooperatively can never be released if
another greenlet blocks the thread on it. So code shared by both paths asks
:func:`on_hub` and, there:

- waits for another writer with a gevent Event (:func:`new_event`) or by polling a
  lock between cooperative sleeps (:class:`Lock`, :func:`sleep`), so the hub keeps serving;
  and for one of a few shared connections with a gevent semaphore (:func:`new_semaphore`);
- runs what takes long without needing the interpreter (a password hash, a key
  generation) on the hub's thread pool (:func:`off_hub`);
- waits for PostgreSQL's answers cooperatively, and natively everywhere else
  (:func:`psycopg_waits_by_thread`), and for a connection from its pool by polling
  (est_app/store/engine.py, ``HubPool``).

Everywhere else (app threads, the CLI, the Flask test client) these are the
ordinary threading calls. The worker calls :func:`run_greenlets_here` once, on its
hub's thread; gevent is imported only then.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

_hub_thread: Optional[int] = None


def run_greenlets_here() -> None:
    """est-server's worker: requests may run on greenlets in this thread (its gevent hub's)."""
    global _hub_thread
    _hub_thread = threading.get_ident()


def on_hub() -> bool:
    """Whether the caller runs on a greenlet in the hub's thread, where blocking stops every connection."""
    return _hub_thread is not None and threading.get_ident() == _hub_thread


def new_event() -> Any:
    """An Event for the caller to wait on: gevent's on the hub (the wait lets other greenlets run), else threading's.

    Either may be set from any thread."""
    if on_hub():
        from gevent.event import Event

        return Event()
    return threading.Event()


def new_semaphore(value: int) -> Any:
    """A semaphore of ``value`` for the caller to wait on: gevent's on the hub (the wait lets other greenlets run), else threading's.

    Only greenlets of the hub's thread may take gevent's."""
    if on_hub():
        from gevent.lock import BoundedSemaphore

        return BoundedSemaphore(value)
    return threading.BoundedSemaphore(value)


class Lock:
    """A lock shared by threads and the hub's greenlets. On the hub it is taken by polling between
    cooperative sleeps, since its holder may be a greenlet of this very thread waiting for its turn
    at something; elsewhere, as ``threading.Lock``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not on_hub():
            self._lock.acquire()
            return
        pause = 0.0001
        while not self._lock.acquire(blocking=False):
            sleep(pause)
            pause = min(pause * 2, 0.001)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()


def off_hub(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, on the hub's thread pool when called on the hub: other connections go on meanwhile."""
    if not on_hub():
        return function(*args)
    import gevent

    return gevent.get_hub().threadpool.apply(function, args)


def sleep(seconds: float) -> None:
    """A pause; on the hub, one that lets its other greenlets run."""
    if not on_hub():
        time.sleep(seconds)
        return
    import gevent

    gevent.sleep(seconds)


def psycopg_waits_by_thread() -> None:
    """psycopg waits for its socket through gevent on the hub, and through its own C wait on every other thread.

    psycopg picks one wait when it is imported, and in a gevent-patched process that is the
    patched ``select.poll``, in every thread: an app thread (where PostgreSQL's requests ran
    then) ran a gevent loop of its own for each round trip to the database: 13% of an
    enrollment's CPU in the worker on PostgreSQL (bench_enroll's load). The C wait releases
    the interpreter lock while it waits, as a thread should; on the hub, blocking would stop
    every connection of the worker, so the cooperative wait stays there. Without psycopg's C
    extension, or where nothing is patched, psycopg's choice stands.
    """
    from psycopg import waiting

    native, cooperative = getattr(waiting, "wait_c", None), waiting.wait
    if native is None or cooperative is native or getattr(cooperative, "by_thread", False):
        return

    def wait(gen: Any, fileno: int, interval: float = 0.0, timeout: Optional[float] = None) -> Any:
        return (cooperative if on_hub() else native)(gen, fileno, interval, timeout)

    wait.by_thread = True  # type: ignore[attr-defined]
    waiting.wait = wait
