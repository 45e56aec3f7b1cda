"""Group commit: the certificate writes of one process (threads, or greenlets on est-server's hub) share one fsync.

Owns the queue of pending certificate writes (:meth:`Store.enroll_device`,
:meth:`Store.replace_certificate`) and the rule that releases them. A commit with
``synchronous=FULL`` (or PostgreSQL's default) waits for the disk, and on SQLite
every process's writers take turns on the one file lock: one fsync per enrollment
capped throughput at a few hundred per second. Here the first writer to arrive
leads: once its write transaction has begun (SQLite: its turn at the file), it
takes every write queued by then, runs each in a SAVEPOINT of that transaction
and commits once; the writes that arrive meanwhile queue for the next leader.
Nothing waits on a timer, so a lone enrollment costs what it did.

- A write that raises (DeviceExists, AlreadyIssued, NotCurrent, an IntegrityError
  on a serial, ...) is rolled back to its savepoint alone; the others go on. When
  that rollback fails (SQLite has rolled the whole transaction back on a full disk,
  or the connection is lost) the batch fails: the writes before it are gone.
- Every caller is released only after the commit of its batch returns: its own
  rows are durable, and so is anything an earlier write of the batch showed it
  (a refusal read under the same locks). A batch whose commit fails raises that
  error to every caller in it: none is told it succeeded.
- Locks are taken as each write takes them (device before certificate, the
  PostgreSQL advisory lock on the device id) and held to the batch's commit,
  which their transaction scope allows. Two hosts' batches can wait on each
  other's devices: PostgreSQL then refuses one write with a deadlock error,
  which the store retries (:func:`is_deadlock`).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any, Callable, Generic, Optional, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import hub
from .statements import run_sql

T = TypeVar("T")

MAX_BATCH = 32  # writes in one transaction: more only lengthens the wait of the first in it


class _Write(Generic[T]):
    """One caller's write, and its outcome once its batch is settled."""

    def __init__(self, write: Callable[[Connection], T]) -> None:
        self.write = write
        self.settled = False
        self.value: Optional[T] = None
        self.error: Optional[BaseException] = None
        self.woken = hub.new_event()  # set when settled, or when its caller is to lead the next batches

    def run(self, conn: Connection, savepoint: Optional[str]) -> None:
        """Run the write, in the SAVEPOINT ``savepoint`` unless it is alone in its transaction (None)."""
        if savepoint is None:  # an error rolls the whole transaction back
            self.value = self.write(conn)
            return
        run_sql(conn, f"SAVEPOINT {savepoint}")
        try:
            self.value = self.write(conn)
        except Exception as exc:
            self.error = exc
            # Raises when the transaction itself is gone (SQLite rolls all of it back on SQLITE_FULL, IOERR,
            # NOMEM; the connection lost): the batch then fails, as nothing of it is left to commit.
            run_sql(conn, f"ROLLBACK TO SAVEPOINT {savepoint}")
        run_sql(conn, f"RELEASE SAVEPOINT {savepoint}")

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class GroupCommit:
    """Runs writes on a connection from ``begin`` (a write transaction), many to a commit.

    Callers may be threads, or greenlets on est-server's hub (est_app/hub.py): each waits on
    an event of its own kind, and the lock below is never held across a wait.
    """

    def __init__(self, begin: Callable[[], AbstractContextManager[Connection]]) -> None:
        self._begin = begin
        self._lock = threading.Lock()
        self._queue: list[_Write[Any]] = []
        self._leading = False

    def run(self, write: Callable[[Connection], T]) -> T:
        """``write(conn)`` committed (its value returned, or its error raised) with whatever else is queued."""
        mine = _Write(write)
        with self._lock:
            self._queue.append(mine)
            follow, self._leading = self._leading, True
        if follow:
            try:
                mine.woken.wait()  # settled by a leader, or handed the lead
            except BaseException:  # a greenlet killed while it waits (the worker stopping)
                self._abandon(mine)
                raise
            if mine.settled:
                return mine.outcome()
        try:
            while not mine.settled:  # ours is queued: at most a few batches ahead of it
                self._commit()
        finally:
            with self._lock:
                self._hand_on()
        return mine.outcome()

    def _hand_on(self) -> None:
        """With the lock held, as a leader stops: the first write still queued leads next, or nobody leads."""
        if self._queue:
            self._queue[0].woken.set()
        else:
            self._leading = False

    def _abandon(self, mine: _Write[Any]) -> None:
        """A follower gone: its write leaves the queue (unless a batch runs it), and a lead it was handed passes on."""
        with self._lock:
            if mine not in self._queue:
                return  # in the batch being committed: it is settled without its caller
            self._queue.remove(mine)
            if mine.woken.is_set():
                self._hand_on()

    def _commit(self) -> None:
        """Commit the writes queued by the time the transaction has begun: those that queued while the
        leader waited for the write lock (another worker committing) go in with it."""
        batch: list[_Write[Any]] = []
        try:
            with self._begin() as conn:
                batch = self._take()
                for number, item in enumerate(batch):
                    item.run(conn, savepoint=f"est_write_{number}" if len(batch) > 1 else None)
        except BaseException as exc:  # not committed: nobody in the batch has anything recorded
            batch = batch or self._take()  # the transaction did not begin: the writes it was for fail
            for item in batch:
                item.value, item.error = None, exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for item in batch:
                item.settled = True
                item.woken.set()

    def _take(self) -> list[_Write[Any]]:
        with self._lock:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        return batch


def is_deadlock(exc: sa.exc.OperationalError) -> bool:
    """PostgreSQL chose this write to break a deadlock (SQLSTATE 40P01): nothing of it was kept, run it again."""
    return getattr(exc.orig, "sqlstate", None) == "40P01"
