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
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql = str(compiled)
        # What construct_params() would work out for every execution, worked out once: for each parameter of
        # the SQL, in order, the key a caller passes, its name, its bind (a literal's value), its conversion.
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        names = compiled.positiontup if compiled.positional else list(binds)
        self._parameters = [
            (binds[name].key, name, binds[name], binds[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in names
        ]
        self._names = None if compiled.positional else [compiled.escaped_bind_names.get(name, name) for name in names]
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
        """The DBAPI parameters for ``params``, as ``construct_params()`` and the types' bind processors make them."""
        values = []
        for key, name, bind, process in self._parameters:
            if key in params:
                value = params[key]
            elif name in params:
                value = params[name]
            elif bind.required:
                raise sa.exc.InvalidRequestError(f"A value is required for bind parameter {key!r}")
            else:
                value = bind.effective_value
            values.append(value if process is None else process(value))
        return tuple(values) if self._names is None else dict(zip(self._names, values))

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
