"""CA rollover (RFC 7030 4.1.3): a new root key and certificate beside the old ones, and the two link certificates.

:func:`roll_over` makes, for a self-signed root CA whose key is a file: a new key
of the same type (0600, encrypted with the old key's passphrase when the old one
is encrypted), a new self-signed certificate with the same subject, NewWithOld
(the new key certified by the old) and OldWithNew (the old key certified by the
new). Files are created next to the old certificate under fresh names
(``<stem>-<n>.pem``, ``.key``, ``-links.pem``); nothing existing is overwritten.
:func:`rolled_over_section` is the configuration section that makes the new CA
issue and keeps the old one (``previous``) signing CRLs and OCSP answers; the new
CA's ``crl_url`` moves to ``/crl/issuer/<its issuer id>``, the old address stays the old CA's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes

from ..config import CASettings, ConfigError
from .authority import BACKDATE, DIGESTS, issuer_id, load_ca_chain, load_ca_key


@dataclass(frozen=True)
class RolloverFiles:
    """What a rollover wrote: the new CA's certificate and key, and the two link certificates (one PEM file)."""

    cert_file: Path
    key_file: Path
    link_certificates_file: Path
    certificate: x509.Certificate
    new_with_old: x509.Certificate
    old_with_new: x509.Certificate


def roll_over(settings: CASettings, where: str = "ca", now: Optional[datetime] = None) -> RolloverFiles:
    """Make the new CA key, certificate and link certificates of the root CA a ``ca`` section names (ConfigError if it cannot)."""
    if settings.key is not None:
        raise ConfigError(f"{where}.key is in a PKCS#11 token: ca rollover supports file keys only (key_file) for now")
    chain = load_ca_chain(settings, where)
    if len(chain) > 1:
        raise ConfigError(f"{where}.cert_file is an intermediate CA: its new certificate comes from its parent, not from ca rollover")
    old = chain[0]
    old_key = load_ca_key(settings, old, where)
    passphrase = _passphrase(settings)
    now = now or datetime.now(timezone.utc)
    new_key = _key_like(old_key)
    algorithm = None if isinstance(new_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else DIGESTS[settings.digest]()
    not_before = now - BACKDATE
    lifetime = old.not_valid_after_utc - old.not_valid_before_utc
    new = _ca_certificate(old, new_key.public_key(), old.subject, not_before, not_before + lifetime).sign(new_key, algorithm)
    # The links are valid while both keys are: the old certificate's remaining life.
    new_with_old = _ca_certificate(old, new_key.public_key(), old.subject, not_before, old.not_valid_after_utc, issuer=old).sign(old_key, algorithm)
    old_with_new = _ca_certificate(old, old.public_key(), old.subject, not_before, old.not_valid_after_utc, issuer=new).sign(new_key, algorithm)

    stem, folder = _stem(settings.cert_file), settings.cert_file.parent
    number = 2
    while any((folder / f"{stem}-{number}{suffix}").exists() for suffix in (".pem", ".key", "-links.pem")):
        number += 1
    cert_file, key_file, links_file = (folder / f"{stem}-{number}{suffix}" for suffix in (".pem", ".key", "-links.pem"))
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    _create(key_file, new_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption), 0o600)
    _create(cert_file, new.public_bytes(serialization.Encoding.PEM), 0o644)
    links = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (new_with_old, old_with_new))
    _create(links_file, links, 0o644)
    return RolloverFiles(cert_file, key_file, links_file, new, new_with_old, old_with_new)


def rolled_over_section(section: dict[str, Any], files: RolloverFiles, base_dir: Path) -> dict[str, Any]:
    """The YAML ``ca`` section after a rollover: the new CA issues, the old one (with its own settings) heads ``previous``."""
    retired = {k: v for k, v in section.items() if k not in ("previous", "link_certificates_file")}
    rolled = dict(section)
    rolled.pop("chain_file", None)  # the new root is self-signed
    rolled.update(
        cert_file=_relative(files.cert_file, base_dir),
        key_file=_relative(files.key_file, base_dir),
        link_certificates_file=_relative(files.link_certificates_file, base_dir),
        previous=[retired, *section.get("previous", [])],
    )
    if section.get("crl_url"):
        # The old CA's certificates keep naming the old address, which now serves its CRL (est_app/revocation/views.py).
        address = urlsplit(section["crl_url"])._replace(path=f"/crl/issuer/{issuer_id(files.certificate)}")
        rolled["crl_url"] = urlunsplit(address)
    return rolled


def _ca_certificate(
    template: x509.Certificate,
    public_key,
    subject: x509.Name,
    not_before: datetime,
    not_after: datetime,
    issuer: Optional[x509.Certificate] = None,
) -> x509.CertificateBuilder:
    """A CA certificate like ``template`` (its constraints and key usage) for ``public_key``; self-signed without ``issuer``."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    issuer_key = issuer.public_key() if issuer else public_key
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
    for extension_type in (x509.BasicConstraints, x509.KeyUsage):
        try:
            extension = template.extensions.get_extension_for_class(extension_type)
        except x509.ExtensionNotFound:
            continue
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder


def _key_like(key: PrivateKeyTypes) -> CertificateIssuerPrivateKeyTypes:
    if isinstance(key, rsa.RSAPrivateKey):
        return rsa.generate_private_key(65537, key.key_size)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(key.curve)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ed25519.Ed25519PrivateKey.generate()
    if isinstance(key, ed448.Ed448PrivateKey):
        return ed448.Ed448PrivateKey.generate()
    raise ConfigError(f"ca rollover: unsupported CA key type {type(key).__name__}")


def _passphrase(settings: CASettings) -> Optional[bytes]:
    """The old key's passphrase when its file is encrypted (the new key gets the same)."""
    if b"ENCRYPTED" not in settings.key_file.read_bytes():
        return None
    if settings.key_passphrase_env:
        return os.environ[settings.key_passphrase_env].encode()  # load_ca_key has checked it is set
    return settings.key_passphrase_file.read_bytes().rstrip(b"\r\n")


def _stem(path: Path) -> str:
    """``ca`` for ca.pem and for ca-2.pem alike, so rollovers number ca-2, ca-3..."""
    stem, _, number = path.stem.rpartition("-")
    return stem if stem and number.isdigit() else path.stem


def _create(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _relative(path: Path, base_dir: Path) -> str:
    try:
        return str(path.relative_to(base_dir))
    except ValueError:
        return str(path)
