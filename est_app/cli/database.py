"""``est db``: the database's schema revision, and upgrading it (Alembic, in-process).

These commands read only the configuration's ``database`` section and never
build the app, which refuses a database that is not at this version's revision.
"""

from __future__ import annotations

import click
import sqlalchemy as sa

from ..config import ConfigError, Settings, database_url, load_config
from ..store import SchemaOutdated, Store
from . import est


def open_store(settings: Settings) -> Store:
    """The configuration's store, opened as est-server opens it (the same file by default, password file, timeouts)."""
    from .. import instance_path  # the package imports the CLI first

    return Store(database_url(settings.database, instance_path()), settings.database)


def upgrade_database(settings: Settings) -> None:
    """Bring the configuration's database to this version's revision (creating it when empty) and say so; one line on refusal."""
    store = open_store(settings)
    shown = store.engine.url.render_as_string(hide_password=True)
    try:
        before = store.upgrade_schema()
    except SchemaOutdated as exc:
        raise click.ClickException(f"database {shown}: {exc}") from None
    except sa.exc.SQLAlchemyError as exc:  # unreachable, or refused (PostgreSQL: no right to create pg_trgm): nothing changed
        raise click.ClickException(f"database {shown}: upgrade failed, nothing changed: {_first_line(exc)}") from None
    finally:
        store.engine.dispose()
    if before.at_head:
        click.echo(f"database {shown} is at schema revision {before.head}, this version's: nothing to do")
    elif before.empty:
        click.echo(f"database {shown} created at schema revision {before.head}")
    else:
        click.echo(f"database {shown} upgraded from schema revision {_revision(before.current)} to {before.head}")


@est.group("db")
def db() -> None:
    """The database schema: which revision it is at, and upgrading it.

    est-server refuses a database that is not at its version's revision and
    never upgrades one itself: after installing a new version, back the
    database up, stop est on every host that shares it, run `est-admin db
    upgrade`, then start est again. An empty database is created at the
    newest revision by whichever comes first (est-server, est-admin init,
    est-admin db upgrade).
    """


@db.command("upgrade", with_appcontext=False)
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Run the schema migrations up to this version's revision (safe to repeat; hosts starting meanwhile wait or refuse)."""
    upgrade_database(_settings(ctx))


@db.command("current", with_appcontext=False)
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the database's schema revision and this version's. Exit status 1 when they differ."""
    store = open_store(_settings(ctx))
    shown = store.engine.url.render_as_string(hide_password=True)
    try:
        found = store.schema_status()
    except sa.exc.SQLAlchemyError as exc:
        raise click.ClickException(f"database {shown} cannot be read: {_first_line(exc)}") from None
    finally:
        store.engine.dispose()
    if found.at_head:
        click.echo(f"database {shown}: schema revision {found.current} (this version's)")
        return
    what = "empty: est-server creates its tables at first start" if found.empty else found.problem
    click.echo(f"database {shown}: schema revision {_revision(found.current)}, this version's is {found.head}; {what}")
    ctx.exit(1)


def _settings(ctx: click.Context) -> Settings:
    from .. import config_path  # the package imports the CLI first

    try:
        return load_config(config_path(ctx.find_root().params.get("config")))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _revision(revision: str | None) -> str:
    return revision or "none (no alembic_version table)"


def _first_line(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's message without SQLAlchemy's SQL echo and the server's hints."""
    return (str(exc.orig or exc).strip().splitlines() or ["(no message)"])[0]
