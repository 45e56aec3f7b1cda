"""Engines: SQLite tuned for several gunicorn workers on one file; PostgreSQL bounded in time; anything else as given.

A database that is down, restarting or locked must cost a request seconds, not
a hang: PostgreSQL connections give up after ``connect_timeout`` and each
statement (lock waits included) after ``statement_timeout``; SQLite waits at
most ``statement_timeout`` for a lock. Pooled connections are pinged before
use, so a restarted PostgreSQL is used again without restarting est_app.
"""

import sqlite3
import time
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine


def create_engine(url: str, password: Optional[str] = None, connect_timeout: int = 5, statement_timeout: int = 10) -> Engine:
    """An engine for ``url``; ``password`` (PostgreSQL, from ``database.password_file``) is never part of the URL."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        engine = sa.create_engine(parsed)
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine, statement_timeout)
        return engine
    # connect_args win over the URL's query: keep any options it gives (search_path, ...) before ours.
    options = " ".join(filter(None, (parsed.query.get("options"), f"-c statement_timeout={statement_timeout * 1000}")))
    connect_args = {"connect_timeout": connect_timeout, "options": options}
    if password is not None:
        connect_args["password"] = password
    return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)


def _configure_sqlite(engine: Engine, busy_seconds: int) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # Hand transaction control to the "begin" hook below (pysqlite's own is unreliable).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (f"busy_timeout={busy_seconds * 1000}", "synchronous=FULL", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        _use_wal(cursor, busy_seconds)
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Writers take the lock up front, so a read-then-write never deadlocks on upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("est_write") else "BEGIN")


def _use_wal(cursor, busy_seconds: int) -> None:
    """Switch the file to WAL (it stays so), retrying for up to ``busy_seconds``.

    While another connection is switching a new file to WAL, SQLite answers "database
    is locked" at once, without calling the busy handler: workers starting together on
    a fresh database met it (one of four failed to start).
    """
    deadline = time.monotonic() + busy_seconds
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
