"""``est ca``: roll a CA over (RFC 7030 4.1.3) and show every CA's state through the overlap.

``ca rollover`` writes a root CA's new key (a file, or a new key in the old key's
PKCS#11 token), certificate and link certificates beside the old ones (never over
them); an intermediate CA's in two steps, ``--request`` (the new key and its CSR for
the parent CA) then ``--certificate`` (what the parent signed, checked and written).
Then it rewrites the configuration's ``ca`` section (or a label's), keeping the
old section as ``previous``; the file as
it was is kept as ``<config>.before-rollover-<n>`` to undo it. The running
server picks the new CA up at its next restart.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import click
import yaml

from ..ca.rollover import install_rollover_certificate, request_rollover, roll_over, rolled_over_section
from ..config import ConfigError, load_config
from . import est
from .output import json_option, print_list


@est.group("ca")
def ca() -> None:
    """The certificate authorities: rollover and status."""


@ca.command("rollover")
@click.option("--label", help="Roll over this label's own CA (labels.<label>.ca) instead of the top-level ca.")
@click.option("--request", "request_file", type=click.Path(dir_okay=False, path_type=Path),
              help="An intermediate CA, step one: make the new key and write its CSR here, for the parent CA's operator.")
@click.option("--certificate", "certificate_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="An intermediate CA, step two: check and install the certificate the parent CA signed for that CSR.")
def rollover(label: Optional[str], request_file: Optional[Path], certificate_file: Optional[Path]) -> None:
    """Make a new CA key and certificate (same subject): a root with the NewWithOld/OldWithNew link
    certificates in one step; an intermediate CA in two (--request, then --certificate)."""
    from .. import config_path

    if request_file and certificate_file:
        raise click.UsageError("--request and --certificate are the two steps of an intermediate CA's rollover: one at a time")
    path = config_path(click.get_current_context().find_root().params.get("config"))
    settings = load_config(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    where = f"labels.{label}.ca" if label else "ca"
    holder = data.get("labels", {}).get(label) if label else data
    if not isinstance(holder, dict) or not isinstance(holder.get("ca"), dict):
        raise click.ClickException(f"{where}: no such section in {path}")
    section = settings.labels[label].ca if label else settings.ca
    try:
        if request_file:
            requested = request_rollover(section, request_file, where)
            click.echo(f"new CA key:         {_key_name(requested.key_uri, requested.key_file)}")
            click.echo(f"request:            {requested.request_file} ({requested.request.subject.rfc4514_string()})")
            click.echo("have the parent CA sign it as a CA certificate, then: est-admin ca rollover --certificate FILE; see docs/CA_ROLLOVER.md")
            return
        files = install_rollover_certificate(section, certificate_file, where) if certificate_file else roll_over(section, where)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    number = 1
    while (backup := path.with_name(f"{path.name}.before-rollover-{number}")).exists():
        number += 1
    shutil.copy2(path, backup)
    holder["ca"] = rolled_over_section(holder["ca"], files, path.resolve().parent)
    # The rewritten config must load before it replaces the old one (a refused config would stop the
    # server at its next start); it is then written in place, keeping the file's owner, group and mode.
    text = yaml.safe_dump(data, sort_keys=False)
    draft = path.with_name(f".{path.name}.rollover")
    draft.write_text(text, encoding="utf-8")
    try:
        load_config(draft)
    except ConfigError as exc:
        raise click.ClickException(f"the rewritten configuration would not load ({exc}); {path} is unchanged") from None
    finally:
        draft.unlink()
    path.write_text(text, encoding="utf-8")
    click.echo(f"new CA certificate: {files.cert_file} (expires {files.certificate.not_valid_after_utc:%Y-%m-%d})")
    click.echo(f"new CA key:         {_key_name(files.key_uri, files.key_file)}")
    if files.link_certificates_file:
        click.echo(f"link certificates:  {files.link_certificates_file} (NewWithOld, OldWithNew)")
    click.echo(f"{path} rewritten ({where}.previous keeps the old CA); the old file is {backup}")
    click.echo("restart the server (systemctl restart est) to issue from the new CA; see docs/CA_ROLLOVER.md")


def _key_name(uri: Optional[str], key_file: Optional[Path]) -> str:
    return f"{uri} (in the token, never extractable)" if uri else str(key_file)


@ca.command("status")
@json_option
def status(as_json: bool) -> None:
    """Every CA, issuing and retired: expiry, valid certificates left, and a warning when new certificates would be cut short."""
    from ..health import authority_status
    from ..state import state

    statuses = authority_status(state())
    records = [{**dataclasses.asdict(s), "not_after": f"{s.not_after:%Y-%m-%d %H:%M}", "last_expiry": _date(s.last_expiry)} for s in statuses]
    columns = [("name", "CA"), ("role", "ROLE"), ("not_after", "EXPIRES"), ("valid_certificates", "VALID"), ("last_expiry", "LAST CERTIFICATE EXPIRES"), ("issuer_id", "ISSUER ID")]
    print_list(records, columns, as_json, "no CA is configured")
    for s in statuses:
        if s.warning:
            click.echo(f"warning: {s.warning}", err=True)


def _date(value) -> Optional[str]:
    return f"{value:%Y-%m-%d %H:%M}" if value else None
