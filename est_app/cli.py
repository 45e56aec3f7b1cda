"""The ``est`` command group: ``flask est ...`` and, identically, ``est-admin ...``.

``init`` needs no configuration (it writes one); every other command runs
inside the app built from ``--config``, ``$EST_CONFIG`` or the instance folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask.cli import AppGroup, ScriptInfo
from werkzeug.security import generate_password_hash

from .ca.development import create_root_ca, create_tls_certificate, write_certificate, write_private_key
from .auth import fingerprint
from .config import DEFAULT_LABEL, load_config
from .state import state
from .store import Store, UserExists

MIN_PASSWORD_LENGTH = 12

CONFIG_TEMPLATE = """\
# est_app configuration written by `est init`. Reference: docs/CONFIGURATION.md.
# Paths are absolute; relative paths would be taken from this file's folder.

# How EST responses are encoded: base64 (RFC 7030; most clients) or der (raw binary).
response_format: base64
# Columns per base64 line: 64 suits libest and openssl; 0 (one line) suits strongSwan pki.
base64_line_length: 64

server:
  bind: {bind}
  workers: 2

tls:
  cert_file: {tls_cert}
  key_file: {tls_key}
  min_version: "1.2"

ca:
  cert_file: {ca_cert}
  key_file: {ca_key}
  # An encrypted CA key takes its passphrase from key_passphrase_env or key_passphrase_file.
  cert_validity_days: 365
  digest: sha256
  extended_key_usage: [clientAuth]

database:
  url: {database}

rate_limit:
  enabled: true
  limit: "20 per second"

# Labels serve /.well-known/est/<label>/<op> with their own profile, e.g.:
# labels:
#   pumps:
#     response_format: der
#     cert_validity_days: 365
"""


@click.group("est", cls=AppGroup)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="YAML configuration (default: $EST_CONFIG).")
@click.pass_context
def est(ctx: click.Context, config: Path | None) -> None:
    """Administer the EST server."""
    if config is not None:
        from . import create_app

        ctx.ensure_object(ScriptInfo).create_app = lambda: create_app(config)


def main() -> None:
    """Console entry point ``est-admin``."""
    from . import create_app

    est.main(obj=ScriptInfo(create_app=create_app))


@est.command("init", with_appcontext=False)
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help="Where to create everything (default: the instance folder).")
@click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1", "::1"), show_default=True, help="Names for the TLS certificate; repeat for several.")
@click.option("--bind", default="127.0.0.1:8445", show_default=True)
def init_command(directory: Path | None, hosts: tuple[str, ...], bind: str) -> None:
    """Create a development CA, a TLS certificate, the database and config.yaml.

    Idempotent: what exists already is kept, never overwritten.
    """
    if directory is None:
        from . import instance_path

        directory = instance_path()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("ca.pem", "ca.key", "tls.pem", "tls.key", "config.yaml", "est.db")}

    ca_key, ca_cert = _existing_pair(paths["ca.key"], paths["ca.pem"])
    if ca_cert is None:
        ca_key, ca_cert = create_root_ca("est_app development CA")
        write_private_key(paths["ca.key"], ca_key)
        write_certificate(paths["ca.pem"], ca_cert)
        click.echo(f"created development CA {paths['ca.pem']}")
    if _existing_pair(paths["tls.key"], paths["tls.pem"])[1] is None:
        tls_key, tls_cert = create_tls_certificate(ca_key, ca_cert, list(hosts))
        write_private_key(paths["tls.key"], tls_key)
        write_certificate(paths["tls.pem"], tls_cert)
        click.echo(f"created TLS certificate {paths['tls.pem']} for {', '.join(hosts)}")
    if not paths["config.yaml"].exists():
        paths["config.yaml"].write_text(
            CONFIG_TEMPLATE.format(
                # JSON strings are YAML strings: safe quoting for any path.
                bind=json.dumps(bind),
                tls_cert=json.dumps(str(paths["tls.pem"])),
                tls_key=json.dumps(str(paths["tls.key"])),
                ca_cert=json.dumps(str(paths["ca.pem"])),
                ca_key=json.dumps(str(paths["ca.key"])),
                database=json.dumps(f"sqlite:///{paths['est.db']}"),
            )
        )
        click.echo(f"created configuration {paths['config.yaml']}")
    settings = load_config(paths["config.yaml"])
    Store(settings.database.url or f"sqlite:///{paths['est.db']}").create_schema()
    click.echo(f"ready: est-server --config {paths['config.yaml']}")


def _existing_pair(key_path: Path, cert_path: Path):
    """Load a key and certificate that both exist; (None, None) when neither does."""
    if key_path.exists() != cert_path.exists():
        raise click.ClickException(f"{key_path} and {cert_path} must both exist or neither; move the odd one away")
    if not key_path.exists():
        return None, None
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


@est.group("user")
def user() -> None:
    """Manage HTTP Basic users allowed to enroll."""


@user.command("add")
@click.argument("name")
def user_add(name: str) -> None:
    """Add a user; the password comes from stdin when piped, else a prompt."""
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise click.ClickException(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if ":" in name or not name.strip():
        raise click.ClickException("user name may not be empty or contain ':'")
    try:
        state().store.add_user(name, generate_password_hash(password))
    except UserExists:
        raise click.ClickException(f"user {name!r} exists already") from None
    click.echo(f"added user {name}")


@user.command("list")
def user_list() -> None:
    """List users."""
    for u in state().store.list_users():
        click.echo(f"{u.name}\tcreated {u.created_at:%Y-%m-%d %H:%M} UTC")


@user.command("remove")
@click.argument("name")
def user_remove(name: str) -> None:
    """Remove a user; their next request is refused in every worker."""
    if not state().store.remove_user(name):
        raise click.ClickException(f"no user {name!r}")
    click.echo(f"removed user {name}")


@est.group("ra")
def ra() -> None:
    """Manage registration authorities (gateways) by their client certificate."""


@ra.command("add")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--label", "labels", multiple=True, required=True, help=f"A label the RA may enroll on ('{DEFAULT_LABEL}' is the unlabelled path); repeat for several.")
def ra_add(certificate: Path, labels: tuple[str, ...]) -> None:
    """Register (or re-register) the RA whose certificate is in CERTIFICATE (PEM or DER)."""
    data = certificate.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError:
        raise click.ClickException(f"{certificate} is not a PEM or DER certificate") from None
    app_state = state()
    unknown = sorted(set(labels) - {p.name for p in app_state.profiles.values()})
    if unknown:
        raise click.ClickException(f"unknown label(s) {', '.join(unknown)}; configured: {', '.join(sorted(p.name for p in app_state.profiles.values()))}")
    if app_state.verifier.issuer_of(cert) is None:
        click.echo("warning: no configured trust anchor (CA chain or tls.client_ca_file) issued this certificate; it will be refused until one does", err=True)
    entry = app_state.store.add_ra(fingerprint(cert), cert.subject.rfc4514_string(), list(labels))
    click.echo(f"RA {entry.id}: {entry.subject} (SHA-256 {entry.fingerprint}) on labels: {entry.labels}")


@ra.command("list")
def ra_list() -> None:
    """List registered RAs."""
    for entry in state().store.list_ras():
        click.echo(f"{entry.id}\t{entry.fingerprint}\t{entry.labels}\t{entry.subject}")


@ra.command("remove")
@click.argument("ident")
def ra_remove(ident: str) -> None:
    """Remove an RA by id or SHA-256 fingerprint; its next request is refused."""
    if not state().store.remove_ra(ident):
        raise click.ClickException(f"no RA {ident!r}")
    click.echo(f"removed RA {ident}")


@est.group("device")
def device() -> None:
    """The device registry."""


@device.command("list")
@click.option("--label", help="Only this label.")
@click.option("--search", help="Device ids containing this text.")
def device_list(label: str | None, search: str | None) -> None:
    """List devices: id, label, device id, current serial, last enrollment."""
    for d in state().store.find_devices(label=label, search=search):
        click.echo(f"{d.id}\t{d.label}\t{d.device_key}\t{d.current_serial}\t{d.last_enrolled:%Y-%m-%d %H:%M}")


@device.command("show")
@click.argument("device_id", type=int)
def device_show(device_id: int) -> None:
    """One device and its certificate history."""
    store = state().store
    d = store.get_device(device_id)
    if d is None:
        raise click.ClickException(f"no device {device_id}")
    click.echo(
        f"device {d.id}: {d.device_key} on label {d.label}\n"
        f"first enrolled {d.first_enrolled:%Y-%m-%d %H:%M:%S} UTC, last {d.last_enrolled:%Y-%m-%d %H:%M:%S} UTC\n"
        f"requester {d.requester} from {d.client_address}\ncertificates:"
    )
    for c in store.device_certificates(d.id):
        current = " (current)" if c.serial == d.current_serial else ""
        click.echo(f"  {c.serial}\t{c.status}{current}\t{c.operation}\tvalid until {c.not_after:%Y-%m-%d}\t{c.subject}")


@device.command("delete")
@click.argument("device_id", type=int)
def device_delete(device_id: int) -> None:
    """Forget a device so its id can enroll again (its certificates stay on record and valid)."""
    if not state().store.delete_device(device_id):
        raise click.ClickException(f"no device {device_id}")
    click.echo(f"deleted device {device_id}; it may enroll again")
