"""``est doctor``: why a gateway or a pump cannot enroll, one finding per line.

This module owns the click command, which checks run for which options, and how
the report prints. The checks live beside it:

- ``inside``: the configuration, file modes and owners, the database, who may enroll;
- ``certificates``: each CA (the top-level ``ca`` and each label's own), its key,
  chain and newest CRL, and the TLS certificate with the names clients dial;
- ``outside``: a real TLS connection to the bind address, each label's ``cacerts``
  and enrollment answer as each known client reads them (``bodies``: how a body is
  written and which client reads it);
- ``request``: ``--request FILE``, a captured request body and the label's verdict;
- ``report``: findings and the text helpers they share.

Each finding prints as ``OK|WARN|FAIL subject: what — what to do``. The exit
status is 1 when any finding is FAIL; WARN alone exits 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import click

from ...config import DEFAULT_LABEL, Settings
from ...profiles import EnrollmentProfile, build_profiles
from .. import est
from .bodies import CLIENTS
from .certificates import check_cas, check_crl, check_tls, issuing_ca
from .inside import check_access, check_config, check_database, check_secret_files
from .outside import check_cacerts, check_enrollment_answer, connect_to_server, pump_keys, stand_in_for
from .report import Report
from .request import check_request


@est.command("doctor", with_appcontext=False)
@click.option("--label", "label_name", help="Check only this label ('default': the unlabelled path).")
@click.option("--host", "hosts", multiple=True, help="A name or address gateways dial; the TLS certificate must hold it. Repeat for several.")
@click.option("--client", "clients", multiple=True, type=click.Choice(sorted(CLIENTS)), help="A client that must read the answers: FAIL where it cannot. Repeat for several.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="The root clients trust for the server's TLS certificate (default: the CA chain).")
@click.option("--request", "request_file", type=click.Path(dir_okay=False, path_type=Path), help="Explain this captured request body instead, and give the label's verdict.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.pass_context
def doctor_command(
    ctx: click.Context,
    label_name: str | None,
    hosts: tuple[str, ...],
    clients: tuple[str, ...],
    tls_ca: Path | None,
    request_file: Path | None,
    as_json: bool,
) -> None:
    """Check this deployment and say, one line per finding, what to do.

    Run it as the service user (runuser -u est --), like every est-admin command.
    Exit status 1 when anything is FAIL; WARN alone exits 0.
    """
    report = Report()
    settings, absent_credentials = check_config(report, _config_path(ctx))
    if settings is not None:
        profiles = build_profiles(settings)
        wanted = None if label_name in (None, DEFAULT_LABEL) else label_name
        if wanted not in profiles:
            report.fail(f"label {label_name}", "not in the configuration", f"labels: {', '.join(p.name for p in profiles.values())}")
        elif request_file is not None:
            check_request(report, settings, profiles[wanted], request_file)
        else:
            selected = [profiles[wanted]] if label_name else list(profiles.values())
            _check_deployment(report, settings, absent_credentials, selected, hosts, clients, tls_ca)
    if as_json:
        click.echo(json.dumps({"failed": report.failed, "findings": [asdict(f) for f in report.findings]}, indent=2))
    else:
        for finding in report.findings:
            click.echo(finding.line())
    ctx.exit(1 if report.failed else 0)


def _config_path(ctx: click.Context) -> Path:
    from ... import config_path  # the package imports this module first

    return config_path((ctx.parent.params.get("config") if ctx.parent else None) or None)


def _check_deployment(
    report: Report,
    settings: Settings,
    absent_credentials: dict[str, str],
    profiles: list[EnrollmentProfile],
    hosts: tuple[str, ...],
    clients: tuple[str, ...],
    tls_ca: Optional[Path],
) -> None:
    """Every CA (the server loads them all), the TLS files, the database; then, for each selected label, from the outside."""
    cas = check_cas(report, settings, absent_credentials)
    tls_certificate = check_tls(report, settings, hosts)
    store = check_database(report, settings)
    check_secret_files(report, settings)
    if store is not None:
        for ca in cas.values():
            check_crl(report, store, ca)
    issuers = [issuing_ca(cas, settings, profile.label) for profile in profiles]
    stand_ins = {ca.settings: stand_in_for(ca) for ca in issuers}
    keys = pump_keys() if any(stand_ins.values()) else {}
    connection = connect_to_server(report, settings, tls_certificate, tls_ca)
    for profile, ca in zip(profiles, issuers):
        if connection is not None:
            check_cacerts(report, connection, profile, ca, clients)
        stand_in = stand_ins[ca.settings]
        if stand_in is not None:
            check_enrollment_answer(report, stand_in, keys, profile, clients)
        if store is not None:
            check_access(report, store, profile)
