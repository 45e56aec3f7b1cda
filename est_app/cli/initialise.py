"""``est init``: a development CA, a TLS certificate, the database and a ready config.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..ca.development import create_root_ca, create_tls_certificate, write_certificate, write_private_key
from ..config import load_config
from . import est
from .database import upgrade_database

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
#     ca:                      # its own issuing CA (the keys of ca: above), e.g. for a pump-only SSID
#       cert_file: /etc/est/pump-ca.pem
#       key_file: /etc/est/pump-ca.key
#       crl_url: "https://est.hospital.example:8445/crl/pumps"
"""


@est.command("init", with_appcontext=False)
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help="Where to create everything (default: the instance folder).")
@click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1", "::1"), show_default=True, help="Names for the TLS certificate; repeat for several.")
@click.option("--bind", default="127.0.0.1:8445", show_default=True)
def init_command(directory: Path | None, hosts: tuple[str, ...], bind: str) -> None:
    """Create a development CA, a TLS certificate, the database and config.yaml.

    Idempotent: what exists already is kept, never overwritten.
    """
    if directory is None:
        from .. import instance_path

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
    else:
        click.echo(f"kept the existing CA {paths['ca.pem']}")
    if _existing_pair(paths["tls.key"], paths["tls.pem"])[1] is None:
        tls_key, tls_cert = create_tls_certificate(ca_key, ca_cert, list(hosts))
        write_private_key(paths["tls.key"], tls_key)
        write_certificate(paths["tls.pem"], tls_cert)
        click.echo(f"created TLS certificate {paths['tls.pem']} for {', '.join(hosts)}")
    else:
        click.echo(f"kept the existing TLS certificate {paths['tls.pem']} (--host applies to a new one only: move tls.pem and tls.key away to make one)")
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
    else:
        click.echo(f"kept the existing configuration {paths['config.yaml']}")
    if not paths["est.db"].exists():  # it holds password hashes: owner only, like the keys
        os.close(os.open(paths["est.db"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    settings = load_config(paths["config.yaml"])
    upgrade_database(settings)  # a new one at head; an older one upgraded
    click.echo(f"ready: est-server --config {paths['config.yaml']}")


def _existing_pair(key_path: Path, cert_path: Path):
    """Load a key and certificate that both exist; (None, None) when neither does."""
    if key_path.exists() != cert_path.exists():
        raise click.ClickException(f"{key_path} and {cert_path} must both exist or neither; move the odd one away")
    if not key_path.exists():
        return None, None
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


