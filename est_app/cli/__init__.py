"""The ``est`` command group: ``flask est ...`` and, identically, ``est-admin ...``.

``init`` needs no configuration (it writes one); every other command runs
inside the app built from ``--config``, ``$EST_CONFIG`` or the instance folder.
That app loads the CA key only when a command signs (:func:`require_ca_key`),
so store-only commands work without the passphrase. Each subgroup lives in its
own module; every list prints through :mod:`.output`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import click
from flask.cli import AppGroup, ScriptInfo

if TYPE_CHECKING:
    from ..ca import CertificateAuthority


class ConfigOption(click.Option):
    """``--config``, whose help names the instance folder this install falls back to."""

    def get_help_record(self, ctx: click.Context):
        from .. import instance_path

        self.help = (
            "YAML configuration. Default: $EST_CONFIG, else "
            f"{instance_path() / 'config.yaml'} (the instance folder, where `est-admin init` writes). "
            "A production server's is usually /etc/est/config.yaml."
        )
        return super().get_help_record(ctx)


class ESTGroup(AppGroup):
    """The ``est`` group: a database that is down or unreachable is one line naming the fix, not a traceback."""

    def invoke(self, ctx: click.Context):
        from sqlalchemy.exc import OperationalError

        try:
            return super().invoke(ctx)
        except OperationalError as exc:
            reason = " ".join(str(exc.orig or exc).split())[:300]
            raise click.ClickException(f"the database is unavailable ({reason}): start it, or fix database.url; est-admin doctor checks it") from None


@click.group("est", cls=ESTGroup)
@click.option("--config", cls=ConfigOption, type=click.Path(dir_okay=False, path_type=Path))
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
        return create_app(config, defer_ca_key=True)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def require_ca_key(purpose: str, authorities: Iterable["CertificateAuthority"]) -> None:
    """Load the keys of the CAs that will sign, before a command changes anything; a clear
    one-line error if one cannot be loaded."""
    from ..config import ConfigError

    for authority in authorities:
        try:
            authority.signer
        except ConfigError as exc:
            raise click.ClickException(f"cannot {purpose} without the CA key: {exc}") from None


from . import accounts, ca, database, initialise, registry, requests  # noqa: E402  (they attach their commands to ``est``)
from . import doctor  # noqa: E402,F401

__all__ = ["est", "main", "require_ca_key", "accounts", "ca", "database", "initialise", "registry", "requests"]
