"""The certificate authorities: each one's key, certificate and chain, and issuing.

:func:`load_authority` reads a CA from the files a ``ca`` section names and
refuses to start on anything inconsistent (a key that does not match, a
certificate that is not a CA or not valid now, a chain that does not reach a
self-signed root). :func:`load_authorities` loads the top-level ``ca`` and
every label's own ``labels.<name>.ca`` into :class:`Authorities`. Its parts,
:func:`load_ca_chain` (no key read) and :func:`load_ca_key`, serve checks that
must not need the key's passphrase (``est-admin doctor``).
The key signs through a :class:`~.signers.Signer`: a PEM file's (``key_file``)
or a PKCS#11 token's (``key``, a ``pkcs11:`` URI), chosen by :func:`load_ca_signer`.
Commands that never sign can defer the key to its first use, so they run
without the passphrase or PIN (which systemd hands only to the running service).
:class:`CertificateAuthority` knows nothing of HTTP or storage.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import partial
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from ..config import CASettings, ConfigError, Settings
from .profile import CertificateProfile
from .signers import FileSigner, Signer

log = logging.getLogger(__name__)

# Backdating absorbs clock skew on devices whose clocks drift.
BACKDATE = timedelta(minutes=5)
SUBJECT_ATTRIBUTES = frozenset(
    {
        NameOID.COMMON_NAME,
        NameOID.SERIAL_NUMBER,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COUNTRY_NAME,
        NameOID.STATE_OR_PROVINCE_NAME,
        NameOID.LOCALITY_NAME,
    }
)
DIGESTS = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def issuer_id(certificate: x509.Certificate) -> str:
    """How records name the CA that issued them: SHA-256 (hex) of its subject and public key, DER.

    Name and key are what relying parties match a CRL or OCSP answer on, so a CA
    certificate renewed with the same name and key keeps its id and its revocations.
    """
    return hashlib.sha256(certificate.subject.public_bytes() + _spki(certificate.public_key())).hexdigest()


class CertificateAuthority:
    """An issuing CA: ``chain`` runs from its own certificate to the self-signed root.

    ``name`` is the configuration section it came from (``ca``, ``labels.pumps.ca``), for messages.
    """

    def __init__(
        self,
        signer: Signer | Callable[[], Signer],  # or a function loading it at first use
        chain: tuple[x509.Certificate, ...],
        digest: str = "sha256",
        crl_url: str | None = None,
        ocsp_url: str | None = None,
        name: str = "ca",
    ) -> None:
        self._signer = signer
        self.chain = chain
        self.certificate = chain[0]
        self.name = name
        self.issuer_id = issuer_id(self.certificate)
        signs_without_digest = isinstance(self.certificate.public_key(), (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        self._digest = None if signs_without_digest else DIGESTS[digest]()
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self.authority_key_identifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self.authority_key_identifier = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key())
        self.cacerts = pkcs7.serialize_certificates(list(chain), serialization.Encoding.DER)
        self.retired: tuple[CertificateAuthority, ...] = ()
        self.link_certificates: tuple[x509.Certificate, ...] = ()
        self._pointers: list[tuple[x509.ExtensionType, bool]] = []
        if crl_url:
            point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
            self._pointers.append((x509.CRLDistributionPoints([point]), False))
        if ocsp_url:
            access = x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))
            self._pointers.append((x509.AuthorityInformationAccess([access]), False))

    def add_retired(self, retired: list[CertificateAuthority], links: list[x509.Certificate]) -> None:
        """After a rollover (RFC 7030 4.1.3): the CAs this one replaced, newest first, and the link
        certificates; ``cacerts`` answers all of them after this CA's own chain."""
        self.retired = tuple(retired)
        self.link_certificates = tuple(links)
        published = dict.fromkeys([*self.chain, *(c for r in self.retired for c in r.chain), *self.link_certificates])
        self.cacerts = pkcs7.serialize_certificates(list(published), serialization.Encoding.DER)

    @property
    def signer(self) -> Signer:
        """What signs with the CA key, loaded now if it was deferred (a :class:`ConfigError` if it cannot be)."""
        if not isinstance(self._signer, Signer):
            self._signer = self._signer()
        return self._signer

    @property
    def digest(self) -> hashes.HashAlgorithm | None:
        """The hash the CA signs with (None for Ed25519/Ed448 keys)."""
        return self._digest

    def validity_problem(self, now: datetime | None = None) -> str | None:
        """None while the CA certificate is within its validity period; otherwise what is wrong."""
        now = now or datetime.now(timezone.utc)
        if now < self.certificate.not_valid_before_utc:
            return f"is not valid before {self.certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        if now >= self.certificate.not_valid_after_utc:
            return f"expired on {self.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; renew it"
        return None

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        profile: CertificateProfile,
        public_key: CertificatePublicKeyTypes | None = None,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """Sign an end-entity certificate for an already-verified CSR.

        ``public_key`` replaces the CSR's key when the server generated the key pair.
        """
        now = now or datetime.now(timezone.utc)
        not_before = now - BACKDATE
        not_after = min(now + timedelta(days=profile.validity_days), self.certificate.not_valid_after_utc)
        if not_after <= now:
            raise RuntimeError("the CA certificate has expired; renew it before issuing")
        public_key = public_key or csr.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(issued_subject(csr.subject))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(profile.key_usage(public_key), critical=True)
            .add_extension(profile.extended_key_usage_extension(), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self.authority_key_identifier, critical=False)
        )
        for extension, critical in self._pointers:
            builder = builder.add_extension(extension, critical=critical)
        if profile.copy_subject_alt_name:
            try:
                san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                builder = builder.add_extension(san, critical=False)
            except x509.ExtensionNotFound:
                pass
        return self.signer.sign_certificate(builder, self._digest)

    def certs_only(self, certificate: x509.Certificate, profile: CertificateProfile) -> bytes:
        """The certs-only PKCS#7 an enrollment answers with."""
        certs = [certificate, *self.chain] if profile.include_chain else [certificate]
        return pkcs7.serialize_certificates(certs, serialization.Encoding.DER)


def issued_subject(subject: x509.Name) -> x509.Name:
    """The subject a certificate gets for a CSR's: only the attribute types the CA vouches for."""
    rdns = []
    for rdn in subject.rdns:
        kept = [a for a in rdn if a.oid in SUBJECT_ATTRIBUTES]
        if kept:
            rdns.append(x509.RelativeDistinguishedName(kept))
    return x509.Name(rdns)


class Authorities:
    """Every CA this server issues from, each once: the top-level ``ca`` and the labels' own."""

    def __init__(self, default: CertificateAuthority, labels: dict[str, CertificateAuthority], settings: dict[str, CASettings]) -> None:
        self.default = default
        self._labels = labels
        issuing = [default, *labels.values()]
        self.retired = [r for a in issuing for r in a.retired]  # by rollovers: they sign CRLs and OCSP answers only
        self._by_issuer = {a.issuer_id: a for a in [*issuing, *self.retired]}
        self.settings = settings  # issuer id -> the section it was loaded from
        # Records from before issuers were recorded predate every rollover: the oldest top-level CA issued them.
        self.unrecorded = default.retired[-1] if default.retired else default

    def __iter__(self) -> Iterator[CertificateAuthority]:
        """Every CA, retired ones (which still sign CRLs and OCSP answers) included."""
        return iter(self._by_issuer.values())

    def for_label(self, label: Optional[str]) -> CertificateAuthority:
        """The CA that issues on ``label`` (None: the unlabelled path)."""
        return self._labels.get(label, self.default) if label else self.default

    def issuer_of(self, issuer: Optional[str]) -> Optional[CertificateAuthority]:
        """The CA a certificate record names; records from before issuers were recorded (None) are the oldest top-level CA's."""
        return self.unrecorded if issuer is None else self._by_issuer.get(issuer)


def load_authorities(settings: Settings, defer_key: bool = False) -> Authorities:
    """Load the top-level CA and each label's own; a CA named twice must be named alike, and is loaded once."""
    loaded: dict[str, tuple[CASettings, CertificateAuthority]] = {}

    def load(section: CASettings, where: str) -> CertificateAuthority:
        authority = load_authority(section, where, defer_key)
        first_settings, first = loaded.setdefault(authority.issuer_id, (section, authority))
        if first_settings != section:
            raise ConfigError(f"{where} names the same CA as {first.name} with other settings: make them equal, or leave {where} out")
        if first is authority and section.previous:
            retired = [(p, r) for i, p in enumerate(section.previous) if (r := load_retired_authority(p, f"{where}.previous[{i}]", defer_key))]
            authority.add_retired([r for _, r in retired], load_link_certificates(section, where, [authority, *(r for _, r in retired)]))
            for retired_section, retired_authority in retired:
                loaded.setdefault(retired_authority.issuer_id, (retired_section, retired_authority))
        return first

    default = load(settings.ca, "ca")
    labels = {name: load(label.ca, f"labels.{name}.ca") for name, label in settings.labels.items() if label.ca is not None}
    return Authorities(default, labels, {issuer: section for issuer, (section, _) in loaded.items()})


def load_authority(settings: CASettings, where: str = "ca", defer_key: bool = False) -> CertificateAuthority:
    """Load and cross-check the CA named by a ``ca`` section (``where``: its key, for messages);
    ``defer_key`` loads the key at first use."""
    chain = load_ca_chain(settings, where)
    signer = partial(load_ca_signer, settings, chain[0], where) if defer_key else load_ca_signer(settings, chain[0], where)
    authority = CertificateAuthority(signer, chain, settings.digest, settings.crl_url, settings.ocsp_url, where)
    problem = authority.validity_problem()
    if problem:
        raise ConfigError(f"{where}.cert_file {settings.cert_file} {problem}")
    return authority


def load_retired_authority(settings: CASettings, where: str, defer_key: bool = False) -> Optional[CertificateAuthority]:
    """A CA retired by a rollover (``ca.previous[i]``), or None once it has expired: everything it issued has expired too."""
    chain = load_ca_chain(settings, where)
    if datetime.now(timezone.utc) >= chain[0].not_valid_after_utc:
        log.warning("%s %s expired on %s: leave it out of the configuration", where, settings.cert_file, chain[0].not_valid_after_utc)
        return None
    signer = partial(load_ca_signer, settings, chain[0], where) if defer_key else load_ca_signer(settings, chain[0], where)
    return CertificateAuthority(signer, chain, settings.digest, settings.crl_url, settings.ocsp_url, where)


def load_link_certificates(settings: CASettings, where: str, authorities: list[CertificateAuthority]) -> list[x509.Certificate]:
    """The rollover's link certificates: each certifies one of ``authorities``' keys and is signed by another's."""
    if settings.link_certificates_file is None:
        return []
    links = load_certificates(settings.link_certificates_file, f"{where}.link_certificates_file")
    keys = {_spki(a.certificate.public_key()) for a in authorities}
    for link in links:
        signed = any(_signed_by(link, a.certificate) for a in authorities)
        if _spki(link.public_key()) not in keys or not signed:
            raise ConfigError(
                f"{where}.link_certificates_file {settings.link_certificates_file}: {link.subject.rfc4514_string()} "
                "is not a link between this CA and one it replaced (ca.previous)"
            )
    return links


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def load_ca_chain(settings: CASettings, where: str = "ca") -> tuple[x509.Certificate, ...]:
    """A ``ca`` section's CA certificate and those above it up to the self-signed root; the key is not read.

    Refused with a ConfigError naming ``where``: a file without a certificate, a
    certificate that is not a CA, a chain that does not reach a self-signed root.
    Validity in time is left to the caller.
    """
    certificate = load_certificates(settings.cert_file, f"{where}.cert_file")[0]
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"{where}.cert_file {settings.cert_file} is not a CA certificate (basicConstraints CA:TRUE missing)")
    pool = load_certificates(settings.chain_file, f"{where}.chain_file") if settings.chain_file else []
    return _chain_to_root(certificate, pool, where)


def load_ca_signer(settings: CASettings, certificate: x509.Certificate, where: str = "ca") -> Signer:
    """The signer of a ``ca`` section's key: in a PKCS#11 token (``key``) or a PEM file (``key_file``), checked against ``certificate``."""
    if settings.key is not None:
        from .pkcs11 import PKCS11Signer

        signer = PKCS11Signer(settings.key, settings.pkcs11_module, settings.pin_file, certificate.public_key(), where)
        signer.check()
        return signer
    return FileSigner(load_ca_key(settings, certificate, where))


def load_ca_key(settings: CASettings, certificate: x509.Certificate, where: str = "ca") -> PrivateKeyTypes:
    """A ``ca`` section's private key, decrypted with its passphrase; refused (ConfigError) unless it is ``certificate``'s."""
    key = _load_private_key(settings, where)
    if not key_belongs_to(key, certificate):
        raise ConfigError(f"{where}.key_file {settings.key_file} does not belong to {where}.cert_file {settings.cert_file}")
    return key


def key_belongs_to(private_key: PrivateKeyTypes, certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` certifies the public half of ``private_key``."""
    return _spki(private_key.public_key()) == _spki(certificate.public_key())


def load_certificates(path: Path, key: str) -> list[x509.Certificate]:
    """The certificates of a PEM file (or the one of a DER file); ``key`` names the setting, for messages."""
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ConfigError(f"{key} {path}: not a PEM or DER certificate ({exc})") from None


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _chain_to_root(certificate: x509.Certificate, pool: list[x509.Certificate], where: str) -> tuple[x509.Certificate, ...]:
    chain = [certificate]
    while chain[-1].issuer != chain[-1].subject:
        issuer = next((c for c in pool if c.subject == chain[-1].issuer and c not in chain), None)
        if issuer is None:
            raise ConfigError(
                f"{where}.chain_file must hold every certificate up to a self-signed root; missing the issuer {chain[-1].issuer.rfc4514_string()}"
            )
        chain.append(issuer)
    return tuple(chain)


def _load_private_key(settings: CASettings, where: str) -> PrivateKeyTypes:
    passphrase = None
    if settings.key_passphrase_env:
        value = os.environ.get(settings.key_passphrase_env)
        if value is None:
            raise ConfigError(f"{where}.key_passphrase_env: environment variable {settings.key_passphrase_env} is not set")
        passphrase = value.encode()
    elif settings.key_passphrase_file:
        try:
            passphrase = settings.key_passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:  # a systemd credential exists only while the service runs
            raise ConfigError(f"{where}.key_passphrase_file {settings.key_passphrase_file}: cannot read it ({exc.strerror})") from None
    try:
        return serialization.load_pem_private_key(settings.key_file.read_bytes(), passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise ConfigError(f"{where}.key_file {settings.key_file}: {exc}") from None
    except ValueError:
        raise ConfigError(f"{where}.key_file {settings.key_file}: not a PEM private key, or the passphrase is wrong") from None
