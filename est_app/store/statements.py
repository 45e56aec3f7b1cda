"""Statements compiled once for a dialect and run on a DBAPI cursor: the enrollment hot path and per-request reads.

An enrollment's transaction runs five or six small statements. SQLAlchemy's work around each
one (cache key, execution context, result set-up: about a tenth of a millisecond of CPU) costs
more than SQLite spends executing it. A :class:`Compiled` statement keeps the SQL the dialect
compiled and the column types' own conversions (SQLite keeps datetimes as text), binds and runs
on the DBAPI connection of a SQLAlchemy transaction (commit and pooling stay SQLAlchemy's), and
raises a DBAPI error as SQLAlchemy's (``IntegrityError``, ``OperationalError``), as
``Connection.execute`` would; :func:`run_sql` does the same for a statement without parameters
(the group commit's savepoints, which SQLAlchemy would compile anew each time). :meth:`Compiled.read` runs a lone
SELECT without a transaction of SQLAlchemy's, on one of the store's :class:`ReadConnections`:
the reads every request makes (the user, the back-off counts, a certificate's status for OCSP).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from .connections import ReadConnections


class Compiled:
    """``statement`` compiled for ``dialect``; ``column_keys``: the columns an INSERT or UPDATE without values sets."""

    def __init__(self, statement: sa.sql.Executable, dialect: Dialect, column_keys: Optional[Sequence[str]] = None) -> None:
        self._compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql = str(self._compiled)
        self._order = self._compiled.positiontup if self._compiled.positional else None
        self._binds = [
            (name, bind.type.dialect_impl(dialect).bind_processor(dialect)) for name, bind in self._compiled.binds.items()
        ]
        selected = statement.selected_columns if isinstance(statement, sa.sql.Select) else getattr(statement, "_returning", ())
        self._columns = [(column.key, column.type.dialect_impl(dialect).result_processor(dialect, None)) for column in selected]
        self._error = dialect.loaded_dbapi.Error
        self._dialect = dialect

    def execute(self, conn: Connection, **params: Any) -> int:
        """Run it; the number of rows it changed."""
        cursor = self._run(conn, params)
        try:
            return cursor.rowcount
        finally:
            cursor.close()

    def rows(self, conn: Connection, **params: Any) -> list[dict[str, Any]]:
        """Run it; the rows it selected or returned, as column key -> value."""
        cursor = self._run(conn, params)
        try:
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        return self._mapped(fetched)

    def read(self, connections: ReadConnections, **params: Any) -> list[dict[str, Any]]:
        """Run this SELECT alone on one of ``connections`` (one statement: its own snapshot); the rows, as :meth:`rows`."""
        bound = self._bound(params)
        try:
            fetched = connections.fetchall(self.sql, bound)
        except self._error as exc:  # a failed connect too: the pool hands it over unwrapped
            raise sa.exc.DBAPIError.instance(self.sql, bound, exc, self._error, dialect=self._dialect) from exc
        return self._mapped(fetched)

    def _run(self, conn: Connection, params: dict[str, Any]):
        return self._cursor(conn.connection.dbapi_connection, params)

    def _cursor(self, dbapi_connection, params: dict[str, Any]):
        bound = self._bound(params)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.sql, bound)
        except self._error as exc:
            cursor.close()
            raise sa.exc.DBAPIError.instance(self.sql, bound, exc, self._error, dialect=self._dialect) from exc
        return cursor

    def _bound(self, params: dict[str, Any]):
        values = self._compiled.construct_params(params)
        for name, process in self._binds:
            if process is not None:
                values[name] = process(values[name])
        return tuple(values[name] for name in self._order) if self._order is not None else values

    def _mapped(self, fetched) -> list[dict[str, Any]]:
        return [{key: convert(value) if convert else value for (key, convert), value in zip(self._columns, row)} for row in fetched]


def run_sql(conn: Connection, sql: str) -> None:
    """``sql``, without parameters, on the transaction's DBAPI connection; its error raised as SQLAlchemy's."""
    error = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    except error as exc:
        raise sa.exc.DBAPIError.instance(sql, (), exc, error, dialect=conn.dialect) from exc
    finally:
        cursor.close()
