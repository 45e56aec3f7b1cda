"""Each CA and the TLS certificate, from their files: validity and remaining lifetime, keys,
chains, the names clients dial, and each CA's newest CRL in the store.

Every ``ca`` section is checked alike, the top-level ``ca`` and each label's own
``labels.<name>.ca``, under its own name. A CA key is decrypted only to check that it
belongs to its certificate, and only when it needs no passphrase or the passphrase is
at hand.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from gunicorn.util import parse_address

from ...ca.authority import issuer_id, key_belongs_to, load_ca_chain, load_ca_key, load_certificates
from ...config import CASettings, ConfigError, Settings
from ...store import Store, utcnow
from .inside import check_file, check_secret
from .report import Report, shown

WARN_DAYS = 30


@dataclass(frozen=True)
class CheckedCA:
    """A ``ca`` section as checked: ``where`` names it; ``chain`` is empty when its certificates cannot be used."""

    where: str  # "ca" or "labels.<name>.ca"
    settings: CASettings
    chain: tuple[x509.Certificate, ...]
    label: Optional[str] = None  # the label it was first named on (its CRL: /crl/<label>); None: the top-level CA

    def current(self) -> bool:
        """Whether it can issue now: its certificate is usable and not expired."""
        return bool(self.chain) and self.chain[0].not_valid_after_utc > datetime.now(timezone.utc)


def check_lifetime(report: Report, subject: str, certificate: x509.Certificate, renew: str) -> bool:
    """Validity now and remaining lifetime; True while valid."""
    now = datetime.now(timezone.utc)
    name = shown(certificate.subject.rfc4514_string())
    end = certificate.not_valid_after_utc
    if now < certificate.not_valid_before_utc:
        report.fail(subject, f"{name} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC", "check the server clock, or reissue it")
        return False
    if now > end:
        report.fail(subject, f"{name} expired on {end:%Y-%m-%d}", renew)
        return False
    days = (end - now).days
    if days < WARN_DAYS:
        report.warn(subject, f"{name} expires in {days} days ({end:%Y-%m-%d})", renew)
    else:
        report.ok(subject, f"{name} valid until {end:%Y-%m-%d} ({days} days)")
    return True


# --- the CAs ----------------------------------------------------------------------------------------


def check_cas(report: Report, settings: Settings, absent: dict[str, str]) -> dict[CASettings, CheckedCA]:
    """Check the top-level CA and each label's own, each distinct section once (labels naming one alike share it)."""
    named = {settings.ca: ("ca", None)}
    for name, label in settings.labels.items():
        if label.ca is not None:
            named.setdefault(label.ca, (f"labels.{name}.ca", name))
    return {
        section: CheckedCA(where, section, _check_ca(report, section, where, absent.get(where)), label)
        for section, (where, label) in named.items()
    }


def issuing_ca(cas: dict[CASettings, CheckedCA], settings: Settings, label: Optional[str]) -> CheckedCA:
    """The checked CA that issues on ``label`` (None: the unlabelled path)."""
    own = settings.labels[label].ca if label else None
    return cas[own or settings.ca]


def _check_ca(report: Report, section: CASettings, where: str, credential: Optional[str]) -> tuple[x509.Certificate, ...]:
    try:
        chain = load_ca_chain(section, where)
    except ConfigError as exc:
        report.fail(where, str(exc), f"fix {where}.cert_file / {where}.chain_file; est-server refuses to start with this same line")
        return ()
    except OSError as exc:
        report.fail(where, f"cannot read {exc.filename}: {exc.strerror}", "run doctor as the service user; the service needs to read it")
        return ()
    renew = "renew the CA and re-enroll every device before then (pumps and FreeRADIUS trust the old one until then)"
    if check_lifetime(report, where, chain[0], renew):
        left = (chain[0].not_valid_after_utc - datetime.now(timezone.utc)).days
        if left < section.cert_validity_days:
            report.warn(where, f"issued certificates end with the CA in {left} days, before cert_validity_days ({section.cert_validity_days})", renew)
    for issuer in chain[1:]:
        check_lifetime(report, f"{where} chain", issuer, f"renew it, and {where}.chain_file with it")
    if section.key is not None:  # in a PKCS#11 token: the server checks it at start-up, /readyz while it runs
        report.ok(f"{where} key", f"in a PKCS#11 token ({section.key}); not opened by doctor")
        check_secret(report, f"{where} token PIN", section.pin_file)
    elif check_file(report, f"{where} key", section.key_file):
        _check_ca_key(report, section, where, chain[0], credential)
    if section.key_passphrase_file:
        check_file(report, f"{where} key passphrase", section.key_passphrase_file)
    return chain


def _check_ca_key(report: Report, section: CASettings, where: str, certificate: x509.Certificate, credential: Optional[str]) -> None:
    subject = f"{where} key"
    if b"ENCRYPTED" not in section.key_file.read_bytes():
        report.warn(subject, f"{section.key_file} is not encrypted", "encrypt it and give the passphrase as a systemd credential (DEPLOYMENT.md 3b)")
    elif credential:
        report.warn(subject, f"not checked against the CA certificate: {credential} exists only while est.service runs", "run doctor while est.service runs")
        return
    elif section.key_passphrase_env and section.key_passphrase_env not in os.environ:
        report.warn(subject, f"not checked against the CA certificate: {section.key_passphrase_env} is not set here", f"export {section.key_passphrase_env} to check it")
        return
    elif not (section.key_passphrase_env or section.key_passphrase_file):
        report.fail(
            subject, f"{section.key_file} is encrypted and no passphrase is configured",
            f"set {where}.key_passphrase_file (a systemd credential) or {where}.key_passphrase_env",
        )
        return
    try:
        load_ca_key(section, certificate, where)
    except ConfigError as exc:
        report.fail(subject, str(exc), f"give the right passphrase, or configure the key of {where}.cert_file; est-server refuses to start")
        return
    report.ok(subject, f"{section.key_file} matches the CA certificate")


# --- the TLS certificate ------------------------------------------------------------------------------


def check_tls(report: Report, settings: Settings, hosts: tuple[str, ...]) -> Optional[x509.Certificate]:
    tls = settings.tls
    if tls.cert_file is None:
        report.warn("tls", "no tls.cert_file: the server speaks plain HTTP", "configure tls.cert_file and tls.key_file unless a TLS proxy stands in front")
        return None
    try:
        certificate = load_certificates(tls.cert_file, "tls.cert_file")[0]
    except ConfigError as exc:
        report.fail("tls", str(exc), "configure a PEM certificate")
        return None
    check_lifetime(report, "tls", certificate, "renew the TLS certificate and restart est")
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            report.fail("tls", "the certificate lacks EKU serverAuth: clients refuse it", "reissue it as a TLS server certificate")
    except x509.ExtensionNotFound:
        pass
    dns, ips = _san(certificate)
    names = ", ".join([*dns, *map(str, ips)]) or "none"
    address = parse_address(settings.server.bind)
    dialled = list(hosts)
    if isinstance(address, tuple) and address[0] not in ("", "0.0.0.0", "::"):
        dialled.insert(0, address[0])
    elif not hosts:
        report.warn("tls", f"bind {settings.server.bind} listens on every address: which names gateways dial is unknown", "pass --host NAME (repeat) to check the certificate's names")
    for host in dict.fromkeys(dialled):
        if _names_host(host, dns, ips):
            report.ok("tls", f"the certificate names {host}")
        else:
            report.fail(
                "tls", f"the certificate does not name {host} (its names: {names}); libest and curl refuse it when dialling {host}",
                "reissue it with that name in subjectAltName (trial: move tls.pem/tls.key away, est-admin init --host NAME)",
            )
    if check_file(report, "tls key", tls.key_file):
        try:
            if not key_belongs_to(load_pem_private_key(tls.key_file.read_bytes(), None), certificate):
                report.fail("tls key", f"{tls.key_file} does not belong to {tls.cert_file}", "configure the matching pair")
        except TypeError:
            report.fail("tls key", f"{tls.key_file} is encrypted", "gunicorn needs it unencrypted (mode 0600)")
        except ValueError:
            report.fail("tls key", f"{tls.key_file} is not a PEM private key", "configure the key of tls.cert_file")
    if tls.min_version == "1.3":
        report.warn("tls", "min_version 1.3: libest's estclient speaks TLS 1.2 at most", "set tls.min_version: \"1.2\" if a libest-based gateway enrolls here")
    return certificate


def _san(certificate: x509.Certificate) -> tuple[list[str], list]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return names.get_values_for_type(x509.DNSName), names.get_values_for_type(x509.IPAddress)


def _names_host(host: str, dns: list[str], ips: list) -> bool:
    """Whether a certificate with these SAN entries passes for ``host`` (RFC 6125: one leftmost wildcard label)."""
    try:
        return ipaddress.ip_address(host) in ips
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in dns):
        if name == host or (name.startswith("*.") and host.count(".") > 1 and host.split(".", 1)[1] == name[2:]):
            return True
    return False


# --- the CRLs --------------------------------------------------------------------------------------


def check_crl(report: Report, store: Store, ca: CheckedCA) -> None:
    """The CA's newest CRL in the store: signed by it, not past its nextUpdate, listing every revocation."""
    if not ca.chain:
        return  # its own finding says why; without its certificate the CA has no id to look the CRL up by
    subject, path, refresh = "crl", "/crl", "est-admin crl"
    if ca.label is not None:
        subject, path, refresh = f"{ca.where} crl", f"/crl/{ca.label}", f"est-admin crl --label {ca.label}"
    # The top-level CA's CRLs include those stored before CRLs recorded their issuer.
    scope = (issuer_id(ca.chain[0]), ca.label is None)
    latest = store.current_crl(*scope)
    if latest is None:
        report.warn(subject, "none signed yet", f"fetch {path} once (or {refresh}) before FreeRADIUS checks CRLs")
        return
    now = utcnow()
    if latest.next_update <= now:
        report.fail(
            subject, f"CRL {latest.number} expired at {latest.next_update:%Y-%m-%d %H:%M} UTC: FreeRADIUS with CRL checks refuses every pump",
            f"run {refresh} now, and from a timer more often than {ca.where}.crl_lifetime_hours",
        )
        return
    if not x509.load_der_x509_crl(latest.der).is_signature_valid(ca.chain[0].public_key()):
        report.fail(subject, f"CRL {latest.number} is not signed by {ca.where}'s certificate (was the CA replaced?)", f"run {refresh}")
        return
    stale_since = store.unpublished_since(*scope)
    if stale_since is not None:
        report.fail(
            subject, f"CRL {latest.number} is stale: it lacks revocations made since {stale_since:%Y-%m-%d %H:%M:%S} UTC, "
            "whose re-sign failed; FreeRADIUS with CRL checks still accepts those pumps",
            f"run {refresh} (it needs the CA key); the server re-signs it at the next {path} request once its key signs",
        )
        return
    report.ok(subject, f"CRL {latest.number} valid until {latest.next_update:%Y-%m-%d %H:%M} UTC")
