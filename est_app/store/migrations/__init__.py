"""Schema versions by Alembic, driven in-process: which revision a database is at, and upgrading it.

The revisions are in ``versions/`` (``0001``: the schema before migrations, see
:mod:`.baseline`; each later one a file with ``down_revision`` set to the one
before, written by hand). :func:`upgrade` runs them on a connection the store
hands over, inside the store's write transaction (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: also a transaction-scoped advisory lock, with transactional DDL),
so two processes upgrading at once take turns and the second finds nothing to
do. No alembic.ini: the configuration is built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Optional

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from ..records import SchemaOutdated
from . import baseline

UPGRADE_COMMAND = "est-admin db upgrade"
_PG_LOCK = 0x6573745F736368  # pg_advisory_xact_lock key: "est_sch", one per database
_TODO = f"back it up, then run `{UPGRADE_COMMAND}`"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this version of est_app knows."""
    return _scripts().get_current_head()


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands against this version's migrations."""

    current: Optional[str]  # its revision; None before migrations (or empty)
    head: str
    empty: bool  # none of est_app's tables: created at head by whoever opens it first
    problem: Optional[str]  # why est-server refuses it, with what to do; None when it is at head or empty
    upgradable: bool  # `est-admin db upgrade` brings it to head

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def status(conn: Connection) -> SchemaStatus:
    """Read-only: the database's revision against :func:`head`."""
    current = MigrationContext.configure(conn).get_current_revision()
    newest = head()
    if current == newest:
        return SchemaStatus(current, newest, False, None, True)
    if current is not None:
        if current not in {script.revision for script in _scripts().walk_revisions()}:
            problem = f"at schema revision {current}, which this version does not know (a newer est_app upgraded it): run that version"
            return SchemaStatus(current, newest, False, problem, False)
        return SchemaStatus(current, newest, False, f"at schema revision {current}, this version needs {newest}: {_TODO}", True)
    if not set(sa.inspect(conn).get_table_names()) & set(baseline.metadata.tables):
        return SchemaStatus(None, newest, True, None, True)
    refused, _, _ = baseline.gaps(conn)
    if refused:
        return SchemaStatus(None, newest, False, f"{refused[0]}: {baseline.NOT_OURS}", False)
    return SchemaStatus(None, newest, False, f"made before schema migrations: {_TODO}", True)


def upgrade(conn: Connection) -> SchemaStatus:
    """Bring the database to :func:`head` in the caller's transaction; returns where it stood before.

    Raises :class:`SchemaOutdated` (nothing changed) for a database it
    cannot upgrade: one not made by est_app, or one a newer version upgraded.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
    before = status(conn)
    if not before.upgradable:
        raise SchemaOutdated(before.problem)
    if not before.at_head:
        config = _config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return before
