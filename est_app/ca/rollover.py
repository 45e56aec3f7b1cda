"""CA rollover (RFC 7030 4.1.3): a new CA key and certificate beside the old ones (and for a root, the two link certificates).

:func:`roll_over` makes, for a self-signed root CA: a new key of the same type,
a new self-signed certificate with the same subject, NewWithOld (the new key
certified by the old) and OldWithNew (the old key certified by the new). A key
file's successor is a file (0600, encrypted with the old key's passphrase when
the old one is encrypted); a PKCS#11 key's is generated in the same token
(``est-admin init``'s key generation) under the label ``<old label>-<n>``, and
every signature is the token's. Files are created next to the old certificate
under fresh names (``<stem>-<n>.pem``, ``.key``, ``-links.pem``); nothing
existing, in a folder or a token, is overwritten. An intermediate CA's new
certificate comes from its parent, so its rollover has two steps:
:func:`request_rollover` (the new key, made the same way, and its CSR) and
:func:`install_rollover_certificate` (the parent's certificate, checked).
:func:`rolled_over_section` is the configuration section that makes the new CA
issue and keeps the old one (``previous``) signing CRLs and OCSP answers; the new
CA's ``crl_url`` moves to ``/crl/issuer/<its issuer id>``, the old address stays the old CA's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes, PrivateKeyTypes

from ..config import CASettings, ConfigError, read_secret_file
from .authority import BACKDATE, DIGESTS, issuer_id, load_ca_chain, load_ca_key, load_ca_signer, load_certificates
from .signers import FileSigner, Signer


SUFFIXES = (".pem", ".key", "-links.pem", ".csr")  # a rollover's files: <stem>-<n> and these


@dataclass(frozen=True)
class RolloverFiles:
    """What a rollover wrote: the new CA's certificate, its key (a file, or ``key_uri`` in the token), and for a root
    the two link certificates (one PEM file); an intermediate CA's rollover has none (its root stays the anchor)."""

    cert_file: Path
    key_file: Optional[Path]
    link_certificates_file: Optional[Path]
    certificate: x509.Certificate
    new_with_old: Optional[x509.Certificate] = None
    old_with_new: Optional[x509.Certificate] = None
    key_uri: Optional[str] = None


@dataclass(frozen=True)
class RolloverRequest:
    """The first step of an intermediate CA's rollover: the new key, and its CSR for the parent CA's operator."""

    request_file: Path
    key_file: Optional[Path]
    key_uri: Optional[str]
    request: x509.CertificateSigningRequest


def roll_over(settings: CASettings, where: str = "ca", now: Optional[datetime] = None) -> RolloverFiles:
    """Make the new CA key, certificate and link certificates of the root CA a ``ca`` section names (ConfigError if it cannot)."""
    chain = load_ca_chain(settings, where)
    if len(chain) > 1:
        raise ConfigError(
            f"{where} is an intermediate CA (issued by {chain[1].subject.rfc4514_string()}): its new certificate comes from that CA; "
            "start with ca rollover --request FILE (docs/CA_ROLLOVER.md)"
        )
    old = chain[0]
    old_signer = load_ca_signer(settings, old, where)
    number, new_key = _new_key(settings, old, old_signer, where)
    cert_file, key_file, links_file, _ = _numbered(settings, number)
    now = now or datetime.now(timezone.utc)
    algorithm = _algorithm(settings, old)
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


def request_rollover(settings: CASettings, request_file: Path, where: str = "ca") -> RolloverRequest:
    """Step one for an intermediate CA: a new key (beside the old, or in its token) and a CSR for it with the CA's subject.

    The CSR is written to ``request_file`` for the parent CA's operator, and kept as ``<stem>-<n>.csr``
    beside the CA's files, which is how :func:`install_rollover_certificate` finds the new key again.
    """
    chain = _intermediate_chain(settings, where, "--request")
    old = chain[0]
    old_signer = load_ca_signer(settings, old, where)
    if request_file.exists() or not request_file.parent.is_dir():
        raise ConfigError(f"{request_file}: name a new file in an existing folder for the request")
    number, new_key = _new_key(settings, old, old_signer, where)
    _, key_file, _, kept_request = _numbered(settings, number)
    builder = x509.CertificateSigningRequestBuilder().subject_name(old.subject)
    for extension_type in (x509.BasicConstraints, x509.KeyUsage):  # what the parent is asked to certify; it decides
        try:
            extension = old.extensions.get_extension_for_class(extension_type)
            builder = builder.add_extension(extension.value, critical=extension.critical)
        except x509.ExtensionNotFound:
            pass
    request = _signed_request(new_key.signer, builder, _algorithm(settings, old))
    if isinstance(new_key, _FileKey):
        _create(key_file, new_key.private_bytes(), 0o600)
    encoded = request.public_bytes(serialization.Encoding.PEM)
    _create(kept_request, encoded, 0o644)
    _create(request_file, encoded, 0o644)
    if isinstance(new_key, _TokenKey):
        return RolloverRequest(request_file, None, new_key.uri, request)
    return RolloverRequest(request_file, key_file, None, request)


def install_rollover_certificate(
    settings: CASettings, certificate_file: Path, where: str = "ca", now: Optional[datetime] = None
) -> RolloverFiles:
    """Step two for an intermediate CA: check the parent's certificate for the new key and write it as ``<stem>-<n>.pem``.

    Refused (ConfigError, one line) unless it certifies the key of a request :func:`request_rollover`
    made, has the CA's subject, is a CA certificate (its key usage, if any, with keyCertSign and
    cRLSign), is issued by the CA's parent (so it chains to the same root) and is valid now.
    """
    chain = _intermediate_chain(settings, where, "--certificate")
    old, parent = chain[0], chain[1]
    certificate = load_certificates(certificate_file, "--certificate")[0]
    folder, stem = settings.cert_file.parent, _stem(settings.cert_file.stem)
    numbers = [int(p.stem.rpartition("-")[2]) for p in folder.glob(f"{stem}-*.csr") if p.stem.rpartition("-")[2].isdigit()]
    number = next((n for n in numbers if x509.load_pem_x509_csr(_numbered(settings, n)[3].read_bytes()).public_key() == certificate.public_key()), None)
    if number is None:
        raise ConfigError(f"{certificate_file}: certifies no key of a rollover request of {where} ({stem}-<n>.csr in {folder}); was it signed from another CSR?")
    cert_file, key_file, _, _ = _numbered(settings, number)
    now = now or datetime.now(timezone.utc)
    if cert_file.exists():
        raise ConfigError(f"{certificate_file}: the certificate of this request is installed already ({cert_file})")
    if certificate.subject != old.subject:
        raise ConfigError(f"{certificate_file}: its subject {certificate.subject.rfc4514_string()} is not the CA's ({old.subject.rfc4514_string()})")
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{certificate_file}: not a CA certificate (basicConstraints CA:TRUE missing); ask for one with CA:TRUE")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        # Verifiers refuse what a CA signs outside its key usage: every certificate it would issue, and its CRLs.
        lacking = [name for name, allowed in (("keyCertSign", usage.key_cert_sign), ("cRLSign", usage.crl_sign)) if not allowed]
    except x509.ExtensionNotFound:
        lacking = []
    if lacking:
        raise ConfigError(f"{certificate_file}: its key usage lacks {', '.join(lacking)}: ask for one with keyCertSign and cRLSign")
    try:
        certificate.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{certificate_file}: not issued by {parent.subject.rfc4514_string()}, the current CA's parent: it would not chain to the same root"
        ) from None
    if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
        raise ConfigError(f"{certificate_file}: not valid now ({certificate.not_valid_before_utc:%Y-%m-%d} to {certificate.not_valid_after_utc:%Y-%m-%d})")
    if settings.key:
        uri = _token_key_uri(settings, number, where)
        from .pkcs11 import PKCS11Signer

        PKCS11Signer(uri, settings.pkcs11_module, settings.pin_file, certificate.public_key(), where).check()
        files = RolloverFiles(cert_file, None, None, certificate, key_uri=uri)
    else:
        load_ca_key(replace(settings, key_file=key_file), certificate, where)  # it is there, opens and is this certificate's
        files = RolloverFiles(cert_file, key_file, None, certificate)
    _create(cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _intermediate_chain(settings: CASettings, where: str, option: str) -> tuple[x509.Certificate, ...]:
    chain = load_ca_chain(settings, where)
    if len(chain) == 1:
        raise ConfigError(f"{where} is a root CA: roll it over in one step, ca rollover without {option}")
    return chain


def _new_key(settings: CASettings, old: x509.Certificate, old_signer: Signer, where: str) -> tuple[int, Union["_FileKey", "_TokenKey"]]:
    """The first free rollover number (no file of that number beside the CA's, no token key of that label) and the new key."""
    number = 2
    while True:
        if not any(path.exists() for path in _numbered(settings, number)):
            new_key = _TokenKey.generate(settings, old.public_key(), number, where) if settings.key else _FileKey.generate(settings, old_signer)
            if new_key is not None:
                return number, new_key
        number += 1


def _numbered(settings: CASettings, number: int) -> tuple[Path, ...]:
    """A rollover's files: certificate, key, link certificates, request (``ca-2.pem``, ``ca-2.key``...)."""
    stem = _stem(settings.cert_file.stem)
    return tuple(settings.cert_file.parent / f"{stem}-{number}{suffix}" for suffix in SUFFIXES)


def _algorithm(settings: CASettings, old: x509.Certificate) -> Optional[hashes.HashAlgorithm]:
    return None if isinstance(old.public_key(), (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) else DIGESTS[settings.digest]()


def _signed_request(signer: Signer, builder: x509.CertificateSigningRequestBuilder, algorithm) -> x509.CertificateSigningRequest:
    if isinstance(signer, FileSigner):
        return builder.sign(signer.private_key, algorithm)
    return signer.sign_request(builder, algorithm)


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
        from .pkcs11 import KeyLabelTaken, PKCS11Signer, PKCS11URI, generate_key_in_token, token_key_type

        uri = _token_key_uri(settings, number, where)
        new_uri = PKCS11URI.parse(uri)
        key_type = token_key_type(old_public_key, f"{where}.key")
        pin = read_secret_file(settings.pin_file, f"{where}.pin_file")
        try:
            public_key = generate_key_in_token(settings.pkcs11_module, new_uri.token, pin, new_uri.object, key_type)
        except KeyLabelTaken:
            return None
        signer = PKCS11Signer(uri, settings.pkcs11_module, settings.pin_file, public_key, where)
        signer.check()
        return cls(signer, uri)


def _token_key_uri(settings: CASettings, number: int, where: str) -> str:
    """The URI of rollover ``number``'s key: the old key's token, the label ``<old label>-<number>``."""
    from .pkcs11 import PKCS11URI, key_uri

    old_uri = PKCS11URI.parse(settings.key, f"{where}.key")
    return key_uri(old_uri.token, f"{_stem(old_uri.object or 'issuing-ca')}-{number}", old_uri.serial)


def rolled_over_section(section: dict[str, Any], files: RolloverFiles, base_dir: Path) -> dict[str, Any]:
    """The YAML ``ca`` section after a rollover: the new CA issues, the old one (with its own settings) heads ``previous``."""
    retired = {k: v for k, v in section.items() if k not in ("previous", "link_certificates_file")}
    rolled = dict(section)
    rolled.update(cert_file=_relative(files.cert_file, base_dir), previous=[retired, *section.get("previous", [])])
    if files.link_certificates_file:  # a new root: self-signed, linked to the old one
        rolled.pop("chain_file", None)
        rolled["link_certificates_file"] = _relative(files.link_certificates_file, base_dir)
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
