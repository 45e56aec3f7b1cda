"""The ``est`` command group: ``flask est ...`` and, identically, ``est-admin ...``.

``init`` needs no configuration (it writes one); every other command runs
inside the app built from ``--config``, ``$EST_CONFIG`` or the instance folder.
Each subgroup lives in its own module.
"""

from __future__ import annotations

from pathlib import Path

import click
from flask.cli import AppGroup, ScriptInfo


@click.group("est", cls=AppGroup)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="YAML configuration (default: $EST_CONFIG).")
@click.pass_context
def est(ctx: click.Context, config: Path | None) -> None:
    """Administer the EST server."""
    if config is not None:
        ctx.ensure_object(ScriptInfo).create_app = lambda: _create_app(config)


def main() -> None:
    """Console entry point ``est-admin``."""
    est.main(obj=ScriptInfo(create_app=_create_app))


def _create_app(config: Path | None = None):
    """The app for a command; a configuration problem is one line, not a traceback."""
    from .. import create_app
    from ..config import ConfigError

    try:
        return create_app(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


from . import accounts, initialise, registry  # noqa: E402  (they attach their commands to ``est``)
from . import doctor  # noqa: E402,F401

__all__ = ["est", "main", "accounts", "initialise", "registry"]
