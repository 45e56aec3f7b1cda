"""``est init``: a development CA, a TLS certificate, the database and a ready config.yaml.

With ``--pkcs11-module`` and ``--token`` the CA key is generated inside the token
(sensitive, never extractable) and only the CA certificate is written. There is
deliberately no command to import an existing key into a token: a key that ever
lived in a file is not an HSM key.
"""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Optional

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..ca.development import create_root_ca, create_tls_certificate, root_ca_certificate, write_certificate, write_private_key
from ..ca.signers import FileSigner, Signer
from ..config import ConfigError, KeygenKeyType, load_config, read_secret_file
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
{ca_key_lines}  cert_validity_days: 365
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


FILE_KEY_LINES = """\
  key_file: {ca_key}
  # An encrypted CA key takes its passphrase from key_passphrase_env or key_passphrase_file.
"""
TOKEN_KEY_LINES = """\
  # The CA key lives in a PKCS#11 token; the user PIN is read from pin_file (under systemd: a credential).
  key: {uri}
  pkcs11_module: {module}
  pin_file: {pin_file}
"""


@est.command("init", with_appcontext=False)
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help="Where to create everything (default: the instance folder).")
@click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1", "::1"), show_default=True, help="Names for the TLS certificate; repeat for several.")
@click.option("--bind", default="127.0.0.1:8445", show_default=True)
@click.option("--pkcs11-module", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Generate the CA key in a PKCS#11 token through this module (e.g. /usr/lib/softhsm/libsofthsm2.so).")
@click.option("--token", help="The token's label (with --pkcs11-module).")
@click.option("--pin-file", type=click.Path(dir_okay=False, path_type=Path), help="File holding the token's user PIN; config.yaml names the file, never the PIN.")
@click.option("--object", "object_label", default="issuing-ca", show_default=True, help="Label of the CA key in the token.")
@click.option("--key-type", type=click.Choice(typing.get_args(KeygenKeyType)), default="ec-p256", show_default=True, help="The CA key generated in the token.")
def init_command(
    directory: Path | None, hosts: tuple[str, ...], bind: str, pkcs11_module: Optional[Path], token: Optional[str],
    pin_file: Optional[Path], object_label: str, key_type: str,
) -> None:
    """Create a development CA, a TLS certificate, the database and config.yaml.

    With --pkcs11-module, --token and --pin-file the CA key is generated inside the token
    (sensitive, not extractable) and no CA key file is written. Idempotent: what exists
    already is kept, never overwritten.
    """
    if directory is None:
        from .. import instance_path

        directory = instance_path()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("ca.pem", "ca.key", "tls.pem", "tls.key", "config.yaml", "est.db")}

    if pkcs11_module or token or pin_file:
        if not (pkcs11_module and token and pin_file):
            raise click.UsageError("--pkcs11-module, --token and --pin-file go together")
        ca_signer, ca_cert, key_lines = _token_ca(paths, pkcs11_module.absolute(), token, pin_file.absolute(), object_label, key_type)
    else:
        ca_signer, ca_cert = _file_ca(paths)
        key_lines = FILE_KEY_LINES.format(ca_key=json.dumps(str(paths["ca.key"])))
    if _existing_pair(paths["tls.key"], paths["tls.pem"])[1] is None:
        tls_key, tls_cert = create_tls_certificate(ca_signer, ca_cert, list(hosts))
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
                ca_key_lines=key_lines,
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


def _file_ca(paths: dict[str, Path]) -> tuple[Signer, x509.Certificate]:
    ca_key, ca_cert = _existing_pair(paths["ca.key"], paths["ca.pem"])
    if ca_cert is None:
        ca_key, ca_cert = create_root_ca("est_app development CA")
        write_private_key(paths["ca.key"], ca_key)
        write_certificate(paths["ca.pem"], ca_cert)
        click.echo(f"created development CA {paths['ca.pem']}")
    else:
        click.echo(f"kept the existing CA {paths['ca.pem']}")
    return FileSigner(ca_key), ca_cert


def _token_ca(
    paths: dict[str, Path], module: Path, token: str, pin_file: Path, object_label: str, key_type: str
) -> tuple[Signer, x509.Certificate, str]:
    """The CA of a key generated in the token (or the existing ca.pem's), and config.yaml's lines for it."""
    from ..ca.pkcs11 import PKCS11Signer, generate_key_in_token, key_uri  # python-pkcs11: only where a token is used

    if paths["ca.key"].exists():
        raise click.ClickException(f"{paths['ca.key']} exists: this folder's CA key is a file; use another --dir for a CA in a token")
    uri = key_uri(token, object_label)
    try:
        if paths["ca.pem"].exists():
            ca_cert = x509.load_pem_x509_certificate(paths["ca.pem"].read_bytes())
            click.echo(f"kept the existing CA {paths['ca.pem']} (its key in token {token!r})")
            signer = PKCS11Signer(uri, module, pin_file, ca_cert.public_key())
            signer.check()
        else:
            public_key = generate_key_in_token(module, token, read_secret_file(pin_file, "--pin-file"), object_label, key_type)
            signer = PKCS11Signer(uri, module, pin_file, public_key)
            ca_cert = root_ca_certificate("est_app development CA", public_key, signer)
            write_certificate(paths["ca.pem"], ca_cert)
            click.echo(f"created CA {paths['ca.pem']}; its {key_type} key was generated in token {token!r} as {object_label!r} and cannot leave it")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    lines = TOKEN_KEY_LINES.format(uri=json.dumps(uri), module=json.dumps(str(module)), pin_file=json.dumps(str(pin_file)))
    return signer, ca_cert, lines


def _existing_pair(key_path: Path, cert_path: Path):
    """Load a key and certificate that both exist; (None, None) when neither does."""
    if key_path.exists() != cert_path.exists():
        raise click.ClickException(f"{key_path} and {cert_path} must both exist or neither; move the odd one away")
    if not key_path.exists():
        return None, None
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
