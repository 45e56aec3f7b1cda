"""CA rollover (RFC 7030 4.1.3): a new root key and certificate beside the old ones, and the two link certificates.

:func:`roll_over` makes, for a self-signed root CA: a new key of the same type,
a new self-signed certificate with the same subject, NewWithOld (the new key
certified by the old) and OldWithNew (the old key certified by the new). A key
file's successor is a file (0600, encrypted with the old key's passphrase when
the old one is encrypted); a PKCS#11 key's is generated in the same token
(``est-admin init``'s key generation) under the label ``<old label>-<n>``, and
every signature is the token's. Files are created next to the old certificate
under fresh names (``<stem>-<n>.pem``, ``.key``, ``-links.pem``); nothing
existing, in a folder or a token, is overwritten. An intermediate CA is refused:
its new certificate comes from its parent (docs/CA_ROLLOVER.md says how).
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
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes, PrivateKeyTypes

from ..config import CASettings, ConfigError, read_secret_file
from .authority import BACKDATE, DIGESTS, issuer_id, load_ca_chain, load_ca_signer
from .signers import FileSigner, Signer


@dataclass(frozen=True)
class RolloverFiles:
    """What a rollover wrote: the new CA's certificate, its key (a file, or ``key_uri`` in the token), and the two link certificates (one PEM file)."""

    cert_file: Path
    key_file: Optional[Path]
    link_certificates_file: Path
    certificate: x509.Certificate
    new_with_old: x509.Certificate
    old_with_new: x509.Certificate
    key_uri: Optional[str] = None


def roll_over(settings: CASettings, where: str = "ca", now: Optional[datetime] = None) -> RolloverFiles:
    """Make the new CA key, certificate and link certificates of the root CA a ``ca`` section names (ConfigError if it cannot)."""
    chain = load_ca_chain(settings, where)
    if len(chain) > 1:
        raise ConfigError(
            f"{where}.cert_file is an intermediate CA: ca rollover makes new root CAs only; "
            "follow 'Rolling over an intermediate CA' in docs/CA_ROLLOVER.md"
        )
    old = chain[0]
    old_signer = load_ca_signer(settings, old, where)
    stem, folder = _stem(settings.cert_file.stem), settings.cert_file.parent
    number = 2
    while True:
        cert_file, key_file, links_file = (folder / f"{stem}-{number}{suffix}" for suffix in (".pem", ".key", "-links.pem"))
        if not any(path.exists() for path in (cert_file, key_file, links_file)):
            new_key = _TokenKey.generate(settings, old.public_key(), number, where) if settings.key else _FileKey.generate(settings, old_signer)
            if new_key is not None:
                break
        number += 1
    now = now or datetime.now(timezone.utc)
    algorithm = None if isinstance(old.public_key(), (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) else DIGESTS[settings.digest]()
    not_before = now - BACKDATE
    lifetime = old.not_valid_after_utc - old.not_valid_before_utc
    public_key, new_signer = new_key.signer.public_key, new_key.signer
    new = new_signer.sign_certificate(_ca_certificate(old, public_key, old.subject, not_before, not_before + lifetime), algorithm)
    # The links are valid while both keys are: the old certificate's remaining life.
    new_with_old = old_signer.sign_certificate(
        _ca_certificate(old, public_key, old.subject, not_before, old.not_valid_after_utc, issuer=old), algorithm
    )
    old_with_new = new_signer.sign_certificate(
        _ca_certificate(old, old.public_key(), old.subject, not_before, old.not_valid_after_utc, issuer=new), algorithm
    )
    if isinstance(new_key, _FileKey):
        _create(key_file, new_key.private_bytes(), 0o600)
    _create(cert_file, new.public_bytes(serialization.Encoding.PEM), 0o644)
    links = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (new_with_old, old_with_new))
    _create(links_file, links, 0o644)
    if isinstance(new_key, _TokenKey):
        return RolloverFiles(cert_file, None, links_file, new, new_with_old, old_with_new, new_key.uri)
    return RolloverFiles(cert_file, key_file, links_file, new, new_with_old, old_with_new)


@dataclass(frozen=True)
class _FileKey:
    """A new CA key in memory, to be written as a PEM file: of the old key's type, encrypted like it."""

    signer: FileSigner
    passphrase: Optional[bytes]

    @classmethod
    def generate(cls, settings: CASettings, old_signer: Signer) -> "_FileKey":
        assert isinstance(old_signer, FileSigner)  # a section without ``key`` has a key_file
        return cls(FileSigner(_key_like(old_signer.private_key)), _passphrase(settings))

    def private_bytes(self) -> bytes:
        encryption = serialization.BestAvailableEncryption(self.passphrase) if self.passphrase else serialization.NoEncryption()
        return self.signer.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@dataclass(frozen=True)
class _TokenKey:
    """A new CA key generated in the old key's token (sensitive, never extractable), under a label of its own."""

    signer: Signer
    uri: str

    @classmethod
    def generate(cls, settings: CASettings, old_public_key: CertificatePublicKeyTypes, number: int, where: str) -> Optional["_TokenKey"]:
        """The key labelled ``<old label>-<number>``; None when the token holds that label already (the old key is never touched)."""
        from .pkcs11 import KeyLabelTaken, PKCS11Signer, PKCS11URI, generate_key_in_token, key_uri, token_key_type

        old_uri = PKCS11URI.parse(settings.key, f"{where}.key")
        label = f"{_stem(old_uri.object or 'issuing-ca')}-{number}"
        key_type = token_key_type(old_public_key, f"{where}.key")
        pin = read_secret_file(settings.pin_file, f"{where}.pin_file")
        try:
            public_key = generate_key_in_token(settings.pkcs11_module, old_uri.token, pin, label, key_type)
        except KeyLabelTaken:
            return None
        uri = key_uri(old_uri.token, label, old_uri.serial)
        signer = PKCS11Signer(uri, settings.pkcs11_module, settings.pin_file, public_key, where)
        signer.check()
        return cls(signer, uri)


def rolled_over_section(section: dict[str, Any], files: RolloverFiles, base_dir: Path) -> dict[str, Any]:
    """The YAML ``ca`` section after a rollover: the new CA issues, the old one (with its own settings) heads ``previous``."""
    retired = {k: v for k, v in section.items() if k not in ("previous", "link_certificates_file")}
    rolled = dict(section)
    rolled.pop("chain_file", None)  # the new root is self-signed
    rolled.update(
        cert_file=_relative(files.cert_file, base_dir),
        link_certificates_file=_relative(files.link_certificates_file, base_dir),
        previous=[retired, *section.get("previous", [])],
    )
    if files.key_uri:  # the same token, module and PIN file; another key in it
        rolled["key"] = files.key_uri
    else:
        rolled["key_file"] = _relative(files.key_file, base_dir)
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


def _stem(name: str) -> str:
    """``ca`` for ca and for ca-2 alike, so rollovers number ca-2, ca-3... (files, and key labels in a token)."""
    stem, _, number = name.rpartition("-")
    return stem if stem and number.isdigit() else name


def _create(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _relative(path: Path, base_dir: Path) -> str:
    try:
        return str(path.relative_to(base_dir))
    except ValueError:
        return str(path)
