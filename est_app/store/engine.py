"""Engines: SQLite tuned for several gunicorn workers on one file; PostgreSQL bounded in time; anything else as given.

A database that is down, restarting or locked must cost a request seconds, not
a hang: PostgreSQL connections give up after ``connect_timeout`` and each
statement (lock waits included) after ``statement_timeout``; SQLite waits at
most ``statement_timeout`` for a lock. Pooled connections are pinged before
use, and the connections each thread keeps for the reads every request makes
(est_app/store/connections.py) are replaced by the read that finds them lost,
so a restarted PostgreSQL is used again without restarting est_app. On
est-server's hub PostgreSQL's pool waits for a connection cooperatively
(:class:`HubPool`). On SQLite the processes sharing a file also take turns at
writing through a lock file beside it (:class:`WriterTurn`), and the
write-ahead log is copied into the file on a thread of each writing process
(:class:`Checkpointer`), not in the commit of whichever write filled it. A
forked child leaves its parent's pooled connections to the parent.
"""

import fcntl
import logging
import os
import sqlite3
import threading
import time
import weakref
from contextlib import nullcontext
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import hub

log = logging.getLogger(__name__)


def create_engine(url: str, password: Optional[str] = None, connect_timeout: int = 5, statement_timeout: int = 10) -> Engine:
    """An engine for ``url``; ``password`` (PostgreSQL, from ``database.password_file``) is never part of the URL."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        engine = sa.create_engine(parsed)
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine, statement_timeout, checkpoint_apart=sqlite_file(engine) is not None)
        _engines.add(engine)
        return engine
    # connect_args win over the URL's query: keep any options it gives (search_path, ...) before ours.
    options = " ".join(filter(None, (parsed.query.get("options"), f"-c statement_timeout={statement_timeout * 1000}")))
    connect_args = {"connect_timeout": connect_timeout, "options": options}
    if password is not None:
        connect_args["password"] = password
    engine = sa.create_engine(parsed, poolclass=HubPool, pool_pre_ping=True, connect_args=connect_args)
    hub.psycopg_waits_by_thread()
    _engines.add(engine)
    return engine


def sqlite_file(engine: Engine) -> Optional[str]:
    """The path of a SQLite engine's database file; None for another database, or SQLite in memory or by URI."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database


def _configure_sqlite(engine: Engine, busy_seconds: int, checkpoint_apart: bool) -> None:
    pragmas = [f"busy_timeout={busy_seconds * 1000}", "synchronous=FULL", "foreign_keys=ON"]
    if checkpoint_apart:
        pragmas.append("wal_autocheckpoint=0")  # the Checkpointer's thread does it

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # Hand transaction control to the "begin" hook below (pysqlite's own is unreliable).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        _use_wal(cursor, busy_seconds)
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Writers take the lock up front, so a read-then-write never deadlocks on upgrade.
        if not conn.get_execution_options().get("est_write"):
            conn.exec_driver_sql("BEGIN")
        elif hub.on_hub():
            _begin_immediate_cooperatively(conn.connection.dbapi_connection, busy_seconds)
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _begin_immediate_cooperatively(dbapi_connection, busy_seconds: int) -> None:
    """BEGIN IMMEDIATE on est-server's hub: SQLite's busy handler would sleep with the thread, stopping every
    connection of the worker while another program (the sqlite3 shell) holds the lock; here the greenlet
    polls between cooperative sleeps instead, for as long as the busy timeout."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    try:
        _execute_while_locked(cursor, "BEGIN IMMEDIATE", busy_seconds, pause=0.001)
    except sqlite3.OperationalError as exc:
        raise sa.exc.OperationalError("BEGIN IMMEDIATE", None, exc) from None
    finally:
        cursor.execute(f"PRAGMA busy_timeout={busy_seconds * 1000}")
        cursor.close()


def _use_wal(cursor, busy_seconds: int) -> None:
    """Switch the file to WAL (it stays so), retrying for up to ``busy_seconds``.

    While another connection is switching a new file to WAL, SQLite answers "database
    is locked" at once, without calling the busy handler: workers starting together on
    a fresh database met it (one of four failed to start).
    """
    _execute_while_locked(cursor, "PRAGMA journal_mode=WAL", busy_seconds, pause=0.01)


def _execute_while_locked(cursor, sql: str, seconds: float, pause: float) -> None:
    """``sql``, run again every ``pause`` (cooperatively on est-server's hub) while SQLite answers that the
    database is locked, for up to ``seconds``; then its error."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            cursor.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            hub.sleep(pause)


class WriterTurn:
    """SQLite: the processes writing one database file take turns through an ``flock`` on ``<file>-writer``.

    SQLite's own wait for its write lock sleeps 1, 2, 5, 10 ... 100 ms between tries, so a worker
    whose write arrived while another worker committed slept far longer than the commit took:
    with two workers, enrollments waited up to 100 ms each for a lock held 3 ms. Here the waiting
    worker tries again every millisecond at most and writes as soon as the other has committed;
    SQLite's lock still guards the file against any other writer (the sqlite3 shell, a backup).
    A lock file that cannot be opened (a read-only folder) leaves SQLite's wait alone in charge.
    Threads of one process (and greenlets on est-server's hub) queue on a :class:`est_app.hub.Lock`
    before this: an ``flock`` is per open file. A turn's end tells the :class:`Checkpointer`.
    """

    def __init__(self, database: str, timeout: float, engine: Optional[Engine] = None) -> None:
        self.path = f"{database}-writer"
        self.timeout = timeout
        self._thread_lock = hub.Lock()
        self._descriptor: Optional[int] = None
        self._pid = 0
        # The writes through ``engine`` (a Store's) have their log checkpointed on a thread.
        self.checkpointer = Checkpointer(engine, self) if engine is not None else None
        _turns.add(self)

    def forked(self) -> None:
        """In a child just forked: the parent's checkpoint thread may have held the lock, which no thread
        here would ever release; the flock's descriptor is opened anew at the next turn (see _open)."""
        self._thread_lock = hub.Lock()
        if self.checkpointer is not None:
            self.checkpointer.forked()

    def __enter__(self) -> None:
        self.take()

    def __exit__(self, *_exc) -> None:
        self.release()
        if self.checkpointer is not None:
            self.checkpointer.written()

    def take(self) -> None:
        """This process's turn at writing, waited for up to ``timeout`` (then "database is locked")."""
        self._thread_lock.acquire()  # on the hub, cooperatively: its holder may be a greenlet waiting in _take
        try:
            descriptor = self._open()
            if descriptor is not None:
                self._take(descriptor)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        try:
            if self._descriptor is not None and self._pid == os.getpid():
                fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _open(self) -> Optional[int]:
        if self._pid != os.getpid():  # a forked worker opens its own: a descriptor shared across fork shares its lock
            self._pid = os.getpid()
            try:  # read-only is enough for flock, so a file another user created still serves
                self._descriptor = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                self._descriptor = None
        return self._descriptor

    def _take(self, descriptor: int) -> None:
        deadline, pause = time.monotonic() + self.timeout, 0.0001
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise sa.exc.OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")) from None
                hub.sleep(pause)
                pause = min(pause * 2, 0.001)


class Checkpointer:
    """Copies a SQLite file's write-ahead log into it from a thread of this process, at most every ``INTERVAL``.

    By default SQLite does this in the commit that takes the log past 1,000 pages: every
    few seconds under load that commit, and with it every connection of an est-server
    worker, waited 70-110 ms (the copy and its fsync), the other worker waiting for the
    turn meanwhile: bench_enroll's slowest enrollments. Here the serving connections never
    checkpoint (``wal_autocheckpoint=0``); after a write, this thread takes the writer's
    turn and checkpoints while the hub goes on computing. The turn matters: beside writers
    that kept appending, every checkpoint copied all it found, yet the log never started
    afresh (the next writer restarts it only when it finds it all copied) and grew to 90 MB
    in a 5 s run. The thread ends after ``IDLE`` seconds without a write; the next write
    starts another. A checkpoint that fails (a full disk) leaves the log growing: the first
    failure is logged as a warning, and so is the first success after it.
    """

    INTERVAL = 0.5  # seconds between checkpoints: a few thousand pages at most under full load
    IDLE = 10.0

    def __init__(self, engine: Engine, turn: WriterTurn) -> None:
        # Weakly: a store dropped closes its connections as before, and its log is left alone.
        self._engine, self._turn = weakref.ref(engine), turn
        self.forked()

    def forked(self) -> None:
        """Fresh state, at creation and in a child just forked: the parent's thread is not there."""
        self._condition = threading.Condition()
        self._due = self._running = self._failing = False

    def written(self) -> None:
        """A write was committed: checkpoint within ``INTERVAL``."""
        with self._condition:
            self._due = True
            if self._running:
                self._condition.notify()
                return
            self._running = True
        threading.Thread(target=self._run, name=f"checkpoint {self._turn.path}", daemon=True).start()

    def _run(self) -> None:
        pause = threading.Event()  # never set: a real sleep (est-server's workers make time.sleep the hub's)
        while True:
            with self._condition:
                if not self._condition.wait_for(lambda: self._due, timeout=self.IDLE):
                    self._running = False
                    return
                self._due = False
            self.checkpoint()
            pause.wait(self.INTERVAL)

    def checkpoint(self) -> None:
        """One checkpoint in the writer's turn, on a connection from the store's pool; a failure is left to the next.

        A connection of its own, closed after, would delete the log and its index whenever it was
        the last one open (SQLite does on the last close), while another program might be copying them.
        """
        engine = self._engine()
        if engine is None:
            return
        try:
            self._turn.take()
        except sa.exc.OperationalError:
            return  # writers held the turn for the whole timeout
        try:
            connection = engine.raw_connection()
            try:
                cursor = connection.cursor()
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                cursor.close()
            finally:
                connection.close()  # back to the pool
        except (sqlite3.Error, sa.exc.DBAPIError) as exc:
            if not self._failing:
                log.warning("cannot checkpoint %s: %s; its write-ahead log grows until a checkpoint succeeds", engine.url.database, exc)
            self._failing = True
        else:
            if self._failing:
                log.warning("checkpoints of %s succeed again", engine.url.database)
            self._failing = False
        finally:
            self._turn.release()


_turns: "weakref.WeakSet[WriterTurn]" = weakref.WeakSet()
_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's pooled connections are left to it, unclosed (SQLAlchemy's recipe for os.fork()): the
    # child's pool, and so its write and read connections (connections.py), connect afresh.
    for engine in list(_engines):
        engine.dispose(close=False)
    for turn in list(_turns):
        turn.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class HubPool(sa.pool.QueuePool):
    """PostgreSQL's pool: SQLAlchemy's QueuePool, whose waits on est-server's hub let the hub's other greenlets run.

    QueuePool waits for a connection on a real lock. On the hub, the connections it waits for
    may be held by greenlets of the same thread, each waiting cooperatively for PostgreSQL's
    answer: blocking the thread would stop them, and the worker, until the pool's timeout. There
    a check-out polls between cooperative sleeps instead, for as long as that timeout. A pool's
    first connection is made by one greenlet at a time: SQLAlchemy sets the dialect up on it,
    under a real lock, with queries of its own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first_connect = hub.Lock()
        self._connected = False

    def _do_get(self) -> Any:
        if not hub.on_hub():
            return super()._do_get()
        deadline, pause = time.monotonic() + self._timeout, 0.0001
        while True:
            try:
                return self._pool.get(False)
            except sa.util.queue.Empty:
                pass
            if self._inc_overflow():  # room for another connection
                try:
                    return self._connect_on_hub()
                except BaseException:
                    self._dec_overflow()
                    raise
            if time.monotonic() >= deadline:
                raise sa.exc.TimeoutError(f"QueuePool limit of size {self.size()} overflow {self._max_overflow} reached, timeout {self._timeout:g} s")
            hub.sleep(pause)
            pause = min(pause * 2, 0.001)

    def _connect_on_hub(self) -> Any:
        if self._connected:
            return self._create_connection()
        with self._first_connect:
            entry = self._create_connection()
            self._connected = True
            return entry


def writer_turn(engine: Engine, timeout: float):
    """What a write transaction on ``engine`` enters first: a :class:`WriterTurn` for a SQLite file, else nothing."""
    database = sqlite_file(engine)
    if database is None:
        return hub.Lock() if engine.dialect.name == "sqlite" else nullcontext()
    return WriterTurn(database, timeout, engine)
