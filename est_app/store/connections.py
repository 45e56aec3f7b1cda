"""The connections a process keeps open instead of taking one from the pool each time.

A check-out from SQLAlchemy's pool and the reset on its return cost more than the few
small statements an EST request or an OCSP answer runs: on SQLite a process's write
transactions share one connection (:class:`WriteConnection`, within the writer's turn),
and on SQLite and PostgreSQL each thread reads through one of its own
(:class:`ReadConnections`). Both are renewed by ``engine.dispose()`` and left to the
parent in a forked child (est_app/store/engine.py disposes the child's pool).
"""

import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import hub
from .engine import sqlite_file


class WriteConnection:
    """SQLite: the one connection a process's write transactions run on, one after another.

    They take turns anyway (:class:`.engine.WriterTurn`), so a connection from the pool for each
    cost only its check-out and the rollback that resets it on return: about 3% of an
    enrollment's instructions (``tests/benchmarks/bench_instructions.py``). A transaction
    that raised gives its connection back and the next one connects afresh, so a failure
    leaves no state behind; so does a forked child, and ``engine.dispose()`` renews it
    with the pool's. Use it only within the turn.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Optional[Connection] = None
        self._parents: Optional[Connection] = None
        self._pid = 0
        self._disposed = False
        sa.event.listen(engine, "engine_disposed", self._dispose)

    def _dispose(self, _engine: Engine) -> None:
        self._disposed = True  # given back at the next transaction: a write may be using it now

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction on the shared connection, as ``engine.begin()``'s."""
        if self._pid != os.getpid():
            # The first, or the first in a forked child, where the connection is the parent's: left untouched, as
            # closing it would drop this process's locks on the file (sqlite.org/howtocorrupt.html, 2.6).
            self._parents, self._connection, self._pid = self._connection, None, os.getpid()
        if self._disposed:
            self._disposed = False
            self._give_back()
        if self._connection is None:
            self._connection = self._engine.connect().execution_options(est_write=True)
        try:
            with self._connection.begin():
                yield self._connection
        except BaseException:
            self._give_back()
            raise

    def _give_back(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class ReadConnections:
    """The connections a request's lone SELECTs run on (:meth:`est_app.store.statements.Compiled.read`).

    On a SQLite file and on PostgreSQL each thread keeps one open, in autocommit: each SELECT is
    its own snapshot, so a commit is seen by the next read. A check-out from the pool for each
    read cost more than the statement: on SQLite the reset on return, about a tenth of an OCSP
    answer's server CPU (bench_operations); on PostgreSQL three more round trips (the pool's
    ping, the driver's BEGIN, the reset's ROLLBACK). They are the pool's connections, detached
    from it, so its connect hook set them up (on PostgreSQL one more per thread, beside the
    pool: docs/HIGH_AVAILABILITY.md). On est-server's hub, whose greenlets would share the
    thread's connection while a read waits, PostgreSQL's reads take one of ``HUB_READERS``
    connections kept in common, one greenlet at a time each (more wait for one, cooperatively).
    A connection whose read raised is closed; when it had been lost (PostgreSQL restarted) the
    read is tried once more on a new one, as the pool's ping would have. ``engine.dispose()``
    renews them all, each at its next read; a forked child opens its own, leaving the parent's
    untouched, as :class:`WriteConnection` does. SQLite in memory (one connection for all)
    reads through the pool.
    """

    HUB_READERS = 2  # a read takes a fraction of a millisecond: two serve a worker's reads at thousands a second

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._postgresql = engine.dialect.name == "postgresql"
        self._pinned = sqlite_file(engine) is not None or self._postgresql
        self._local = threading.local()
        self._hub_idle: list[tuple] = []  # (pid, generation, connection) not reading now
        self._hub_readers: Optional[Any] = None  # the hub's semaphore, made there at its first read
        self._generation = 0
        self._parents: list = []
        self._error = engine.dialect.loaded_dbapi.Error
        sa.event.listen(engine, "engine_disposed", self._dispose)

    def _dispose(self, _engine: Engine) -> None:
        self._generation += 1

    def fetchall(self, sql: str, parameters) -> list:
        """The rows of ``sql``; a DBAPI error is raised as the driver's."""
        if not self._pinned:
            connection = self._engine.raw_connection()
            try:
                return _fetchall(connection, sql, parameters)
            except self._error:
                connection.invalidate()  # a connection that failed is not handed out again
                raise
            finally:
                connection.close()  # back to the pool, which ends any transaction the driver began
        if self._postgresql and hub.on_hub():
            if self._hub_readers is None:
                self._hub_readers = hub.new_semaphore(self.HUB_READERS)
            with self._hub_readers:
                return self._read(sql, parameters, self._hub_take(), self._hub_idle.append)
        held = getattr(self._local, "held", None)
        self._local.held = None  # given back below once its read has succeeded
        return self._read(sql, parameters, held if self._current(held) else self._renew(held), self._keep_for_thread)

    def _read(self, sql: str, parameters, held: tuple, keep: Callable[[tuple], None]) -> list:
        """``sql`` on ``held``, which ``keep`` gets back after a read that succeeded; a lost one is replaced once."""
        retried = False
        while True:
            try:
                rows = _fetchall(held[2], sql, parameters)
            except self._error as exc:
                lost = self._engine.dialect.is_disconnect(exc, held[2], None)
                held[2].close()
                if retried or not lost:
                    raise
                retried, held = True, self._renew(None)
                continue
            except BaseException:  # a greenlet killed while its read waits: the statement may be unfinished
                held[2].close()
                raise
            keep(held)
            return rows

    def _keep_for_thread(self, held: tuple) -> None:
        self._local.held = held

    def _hub_take(self) -> tuple:
        while self._hub_idle:
            held = self._hub_idle.pop()
            if self._current(held):
                return held
            self._retire(held)
        return self._renew(None)

    def _current(self, held: Optional[tuple]) -> bool:
        return held is not None and held[0] == os.getpid() and held[1] == self._generation

    def _renew(self, held: Optional[tuple]) -> tuple:
        """A new connection, in place of ``held`` (retired) when there is one."""
        if held is not None:
            self._retire(held)
        pooled = self._engine.raw_connection()
        pooled.detach()
        connection = pooled.dbapi_connection
        if self._postgresql:
            connection.autocommit = True  # SQLite's are already (the connect hook)
        return os.getpid(), self._generation, connection

    def _retire(self, held: tuple) -> None:
        if held[0] != os.getpid():
            self._parents.append(held[2])  # never closed here (sqlite.org/howtocorrupt.html, 2.6)
        else:
            held[2].close()


def _fetchall(connection, sql: str, parameters) -> list:
    cursor = connection.cursor()
    try:
        cursor.execute(sql, parameters)
        return cursor.fetchall()
    finally:
        cursor.close()
