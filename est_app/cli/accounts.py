"""``est user`` (HTTP Basic users, EST or admin) and ``est ra`` (registration authorities)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography import x509
from werkzeug.security import generate_password_hash

from ..audit import cli_actor
from ..auth import describe, fingerprint
from ..config import DEFAULT_LABEL
from ..state import state
from ..records import iso
from ..store import AuditEvent, UserExists
from . import est
from .output import json_option, print_list

MIN_PASSWORD_LENGTH = 12


def _audit(event: str, detail: str) -> AuditEvent:
    return AuditEvent(event=event, actor=cli_actor(), detail=detail)


@est.group("user")
def user() -> None:
    """Manage HTTP Basic users: EST users enroll, admins use /api/v1 and /admin."""


@user.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An administrator (admin API and dashboard), not an EST user.")
def user_add(name: str, admin: bool) -> None:
    """Add a user. The password (at least 12 characters) is read from the first line
    of stdin when piped (`printf '%s\\n' "$PW" | est-admin user add NAME`), else prompted for.
    """
    if ":" in name or not name.strip():
        raise click.ClickException("user name may not be empty or contain ':'")
    password = _read_password()
    role = "admin" if admin else "est"
    try:
        state().store.add_user(name, generate_password_hash(password), role, _audit("user-add", f"{name} ({role})"))
    except UserExists:
        raise click.ClickException(f"user {name!r} exists already") from None
    click.echo(f"added {'admin' if admin else 'user'} {name}")


@user.command("passwd")
@click.argument("name")
def user_passwd(name: str) -> None:
    """Set a user's password (stdin when piped, else a prompt); their dashboard sessions end at once."""
    if not state().store.set_password(name, generate_password_hash(_read_password()), _audit("user-passwd", name)):
        raise click.ClickException(f"no user {name!r}")
    click.echo(f"changed the password of {name}; their dashboard sessions have ended")


def _read_password() -> str:
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        line = sys.stdin.readline()
        if not line.strip():
            raise click.ClickException("no password given: pipe it as the first line of stdin, or run the command on a terminal to be asked")
        password = line.rstrip("\r\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise click.ClickException(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


@user.command("list")
@json_option
def user_list(as_json: bool) -> None:
    """List users: name, role (est or admin), when created (UTC)."""
    print_list(
        ({"name": u.name, "role": u.role, "created_at": iso(u.created_at)} for u in state().store.list_users()),
        [("name", "NAME"), ("role", "ROLE"), ("created_at", "CREATED")],
        as_json,
        "No users yet: add one with `est-admin user add NAME` (--admin for the dashboard and API).",
    )


@user.command("remove")
@click.argument("name")
def user_remove(name: str) -> None:
    """Remove a user; their next request is refused in every worker."""
    if not state().store.remove_user(name, _audit("user-remove", name)):
        raise click.ClickException(f"no user {name!r}")
    click.echo(f"removed user {name}")


@est.group("ra")
def ra() -> None:
    """Manage registration authorities (gateways) by their client certificate."""


@ra.command("add")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--label", "labels", multiple=True, required=True,
    help=f"A label the RA may enroll on ('{DEFAULT_LABEL}' is the unlabelled path); repeat for several.",
)
@click.option("--force", is_flag=True, help="Register even on labels whose auth does not accept client certificates.")
def ra_add(certificate: Path, labels: tuple[str, ...], force: bool) -> None:
    """Register (or re-register) the RA whose certificate is in CERTIFICATE (PEM or DER).

    Refused: a certificate that is expired, not yet valid, lacks the clientAuth extended key
    usage or is revoked here; without --force, labels whose auth lacks 'cert'.
    """
    data = certificate.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError:
        raise click.ClickException(f"{certificate} is not a PEM or DER certificate") from None
    app_state = state()
    profiles = {p.name: p for p in app_state.profiles.values()}
    unknown = sorted(set(labels) - set(profiles))
    if unknown:
        raise click.ClickException(f"unknown label(s) {', '.join(unknown)}; configured: {', '.join(sorted(profiles))}")
    problem = app_state.verifier.problem(cert)
    if problem:
        raise click.ClickException(f"certificate {describe(cert)} {problem}; an RA cannot use it")
    password_only = sorted(name for name in set(labels) if "cert" not in profiles[name].auth)
    if password_only:
        keys = ", ".join("auth" if name == DEFAULT_LABEL else f"labels.{name}.auth" for name in password_only)
        fix = f"add cert to {keys} in the configuration and restart"
        if not force:
            raise click.ClickException(
                f"label(s) {', '.join(password_only)} accept only passwords, so this RA would be refused there (401): {fix}, or pass --force"
            )
        click.echo(f"warning: label(s) {', '.join(password_only)} accept only passwords; the RA is refused there until you {fix}", err=True)
    if app_state.verifier.issuer_of(cert) is None:
        click.echo("warning: no configured trust anchor (CA chain or tls.client_ca_file) issued this certificate; it will be refused until one does", err=True)
    subject = cert.subject.rfc4514_string()
    audit = _audit("ra-add", f"{subject} {fingerprint(cert)} labels {' '.join(sorted(labels))}")
    entry = app_state.store.add_ra(fingerprint(cert), subject, list(labels), audit)
    click.echo(f"RA {entry.id}: {entry.subject} (SHA-256 {entry.fingerprint}) on labels: {entry.labels}")


@ra.command("list")
@json_option
def ra_list(as_json: bool) -> None:
    """List registered RAs: number, SHA-256 fingerprint, labels, subject."""
    print_list(
        (
            {"number": r.id, "fingerprint": r.fingerprint, "labels": r.labels, "subject": r.subject, "created_at": iso(r.created_at)}
            for r in state().store.list_ras()
        ),
        [("number", "NUMBER"), ("fingerprint", "SHA-256 FINGERPRINT"), ("labels", "LABELS"), ("subject", "SUBJECT")],
        as_json,
        "No RAs registered: add a gateway's client certificate with `est-admin ra add CERT --label LABEL`.",
    )


@ra.command("remove")
@click.argument("ident")
def ra_remove(ident: str) -> None:
    """Remove an RA by number or SHA-256 fingerprint; its next request is refused."""
    if not state().store.remove_ra(ident, _audit("ra-remove", ident)):
        raise click.ClickException(f"no RA {ident!r}")
    click.echo(f"removed RA {ident}")
