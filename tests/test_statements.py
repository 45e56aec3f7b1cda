"""est_app.store.statements binds parameters as SQLAlchemy would (its ``construct_params`` and the column types'
bind processors), for every statement of the enrollment and request path, on SQLite's and PostgreSQL's dialects."""

from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa

from est_app.store import _EnrollmentStatements, _RequestReads
from est_app.store import statements

SAMPLE = {datetime: datetime(2026, 12, 2, 12, 0, 0, 123456), int: 7, str: "NPPBBB4", bytes: b"\x30\x03\x02\x01\x07", bool: True}


@pytest.fixture
def compiled(monkeypatch) -> list[tuple[statements.Compiled, object]]:
    """Each Compiled made below, with what SQLAlchemy compiled for the same statement."""
    made = []
    original = statements.Compiled.__init__

    def recording(self, statement, dialect, column_keys=None):
        original(self, statement, dialect, column_keys)
        made.append((self, statement.compile(dialect=dialect, column_keys=column_keys)))

    monkeypatch.setattr(statements.Compiled, "__init__", recording)
    return made


def reference(sqlalchemy_compiled, params: dict):
    """What SQLAlchemy's own execution would hand the driver for ``params``."""
    values = sqlalchemy_compiled.construct_params(params)
    for name, process in sqlalchemy_compiled._bind_processors.items():
        if name in values:
            values[name] = process(values[name])
    if sqlalchemy_compiled.positional:
        return tuple(values[name] for name in sqlalchemy_compiled.positiontup)
    return values


def plain(parameters):
    """Parameters compared by value (psycopg wraps bytes in a Binary that compares by identity)."""
    items = parameters.items() if isinstance(parameters, dict) else enumerate(parameters)
    return {key: getattr(value, "obj", value) for key, value in items}


@pytest.mark.parametrize("url", ["sqlite://", "postgresql+psycopg://est@db.invalid/est"])
def test_each_hot_statement_binds_what_sqlalchemy_would(compiled, url):
    dialect = sa.create_engine(url).dialect  # nothing connects
    _EnrollmentStatements(dialect)
    _RequestReads(dialect)
    assert len(compiled) >= 10
    for statement, sqlalchemy_compiled in compiled:
        params = {}
        for bind in sqlalchemy_compiled.bind_names:
            if bind.required:
                try:
                    python_type = bind.type.python_type
                except NotImplementedError:
                    python_type = str
                params[bind.key] = SAMPLE.get(python_type, SAMPLE[str])
        assert plain(statement._bound(params)) == plain(reference(sqlalchemy_compiled, params)), statement.sql
        if params:  # a value left out is refused, as SQLAlchemy refuses it
            with pytest.raises(sa.exc.InvalidRequestError):
                statement._bound({})
