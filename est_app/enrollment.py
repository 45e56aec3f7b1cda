"""The enrollment service: the steps every issuing operation shares, and no Flask.

Plain values in (a CSR as :func:`est_app.ca.load_csr` returns it, signature and
key checked; the label's profile; who asks and from where), a certificate or a
catalogued error out. For each issue it holds the CSR to the label's policy, picks the device key, has the label's CA sign, commits
certificate, device and audit row in one transaction (superseding the device's
previous certificate), draws another serial on a collision, and reports the
issue to its ``issued`` hook (the metrics). The EST views call it, and so will
anything else that issues (an operator approving a pending request, with its
stored CSR and requester). A certificate is returned only after its record is
committed; one the store refuses is discarded unrecorded. The store's refusals
become catalogued errors in one place, :func:`store_refusal`.

A retry (the same requester sending the same CSR to the same operation within the
label's retry window, its first response lost) gets the certificate already issued,
audited as ``retry`` and not reported as issued. The store decides it under the
device's lock (:meth:`Store.enroll_device`'s ``answers_request``; for re-enrollment,
its refusal of a superseded certificate), so identical requests at once issue once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from . import hub
from .audit import EVENTS, RETRY
from .ca import Authorities, CertificateAuthority, CertificateProfile, check_policy, issued_subject
from .ca.keygen import generate_key, key_type_of
from .errors import BadRequest, Conflict, ESTError, Forbidden
from .profiles import EnrollmentProfile
from .store import (
    AlreadyIssued, AuditEvent, CertificateRecord, DeviceExists, DeviceOnOtherLabel, NotCurrent, Orphaned, SerialTaken, Store, utcnow,
)

log = logging.getLogger(__name__)

# A 159-bit random serial colliding once is already beyond belief; twice in a row means a broken CA.
SERIAL_ATTEMPTS = 3

StoreRefusal = Union[DeviceExists, DeviceOnOtherLabel, NotCurrent, Orphaned]


@dataclass(frozen=True)
class Requester:
    """Who asks for a certificate and from where, as the certificate, device and audit records keep it."""

    name: str  # "user:gateway", "ra:<fingerprint>", "device:<serial>" (auth.Identity.requester)
    client_address: str = ""
    request_id: str = ""  # the HTTP request's, for the log


class EnrollmentService:
    """Issues and records certificates for the labels' profiles; built once per app."""

    def __init__(
        self,
        store: Store,
        authorities: Authorities,
        profiles: dict[Optional[str], EnrollmentProfile],
        issued: Callable[[str, str], None] = lambda operation, label: None,
        retried: Callable[[str, str], None] = lambda operation, label: None,
    ) -> None:
        self.store = store
        self.authorities = authorities
        self.profiles = profiles
        self.issued = issued  # (operation, label), once the certificate is committed
        self.retried = retried  # (operation, label), when a retry is answered with the certificate already issued

    # --- the operations ------------------------------------------------------------

    def enroll(
        self, csr: x509.CertificateSigningRequest, profile: EnrollmentProfile, requester: Requester, operation: str = "simpleenroll"
    ) -> x509.Certificate:
        """Issue for the CSR's device on ``profile``'s label and record it as the device's current certificate."""
        check_policy(csr, profile.csr_policy)
        return self._issue_for_device(csr, profile, requester, operation, profile.certificate, profile.duplicate_policy or "renew")

    def bootstrap(
        self, csr: x509.CertificateSigningRequest, profile: EnrollmentProfile, requester: Requester, validity_days: int
    ) -> x509.Certificate:
        """A short-lived clientAuth certificate; a device enrolled already is refused unless the label renews."""
        check_policy(csr, profile.csr_policy)
        certificate_profile = replace(profile.certificate, validity_days=validity_days, extended_key_usage=("clientAuth",), include_chain=False)
        return self._issue_for_device(csr, profile, requester, "bootstrap", certificate_profile, profile.duplicate_policy or "reject")

    def serverkeygen(
        self, csr: x509.CertificateSigningRequest, profile: EnrollmentProfile, requester: Requester
    ) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
        """A key pair of the CSR key's type (one of the label's ``serverkeygen_key_types``) and its certificate."""
        check_policy(csr, profile.csr_policy)
        wanted = key_type_of(csr.public_key())
        if wanted not in profile.serverkeygen_key_types:
            allowed = ", ".join(profile.serverkeygen_key_types)
            raise BadRequest(f"serverkeygen key type {wanted or 'of this CSR'} is not allowed here; use a CSR key of: {allowed}")
        private_key = hub.off_hub(generate_key, wanted)
        policy = profile.duplicate_policy or "renew"
        certificate = self._issue_for_device(
            csr, profile, requester, "serverkeygen", profile.certificate, policy, public_key=private_key.public_key()
        )
        return private_key, certificate

    def reenrollment_profile(self, current: x509.Certificate) -> EnrollmentProfile:
        """The profile of the label ``current`` was issued on, whatever path the request came in on.

        Forbidden when ``current`` cannot re-enroll: unknown here, on a label no longer
        served, not valid, or its device deleted. (The store checks status and device
        again under its write lock; checking first spares a signature.)
        """
        serial = serial_of(current)
        record = self.store.get_certificate(serial)
        profile = self.profile_named(record.label) if record else None
        if profile is None:
            where = f"on label {record.label!r}, which this server no longer serves" if record else "outside this server's records"
            raise Forbidden(f"certificate {serial} was issued {where}; enroll afresh")
        if record.status != "valid" and self._successor(record, profile) is None:
            raise store_refusal(NotCurrent(record.status), serial)
        if record.device_id is None:
            raise store_refusal(Orphaned(serial), serial)
        return profile

    def reenroll(self, csr: x509.CertificateSigningRequest, current: x509.Certificate, requester: Requester) -> x509.Certificate:
        """Issue a successor to ``current`` (same subject and subjectAltName) and supersede it."""
        profile = self.reenrollment_profile(current)
        check_policy(csr, profile.csr_policy)
        if issued_subject(csr.subject) != current.subject:
            raise Forbidden(
                f"CSR subject {csr.subject.rfc4514_string()!r} differs from the certificate's {current.subject.rfc4514_string()!r}"
            )
        if set(_alt_names(csr)) != set(_alt_names(current)):
            raise Forbidden("CSR subjectAltName differs from the certificate's; re-enrollment keeps the same names")
        old_serial = serial_of(current)
        answers_request = self._answers_request(csr, profile, requester, "simplereenroll")
        for _attempt in range(SERIAL_ATTEMPTS):
            certificate = self._authority(profile).issue(csr, profile.certificate)
            record = self._record(certificate, profile, requester, "simplereenroll")
            audit = self._event("simplereenroll", profile, requester, record.common_name, record.serial, f"supersedes {old_serial}")
            try:
                self.store.replace_certificate(old_serial, record, requester.client_address, audit)
            except SerialTaken:
                continue
            except (NotCurrent, Orphaned) as exc:
                # Refused under the device's lock: a successor recorded by then is the one a retry gets.
                successor = self._successor(self.store.get_certificate(old_serial), profile)
                if successor is not None and answers_request(successor):
                    return self._retried(successor, profile, requester, successor.common_name)
                raise store_refusal(exc, old_serial) from None
            return self._committed(certificate, record, profile, requester)
        raise RuntimeError(f"the CA issued {SERIAL_ATTEMPTS} serials in a row that are taken; its serial source is broken")

    def certs_only(self, certificate: x509.Certificate, profile: EnrollmentProfile) -> bytes:
        """The certs-only PKCS#7 an enrollment on ``profile``'s label answers with."""
        return self._authority(profile).certs_only(certificate, profile.certificate)

    def already_issued(
        self, csr: x509.CertificateSigningRequest, profile: EnrollmentProfile, requester: Requester, operation: str
    ) -> Optional[x509.Certificate]:
        """The certificate this request was already answered with (a retry within the window, audited as one), or None.

        Read without the store's lock, for steps that come before issuing (approval: a collected
        request's lost response is answered, not filed again); issuing itself decides under the lock.
        """
        answers = self._answers_request(csr, profile, requester, operation)
        if answers is None:
            return None
        key = device_key(csr, profile.device_id)
        record = self.store.current_certificate(profile.name, key)
        return self._retried(record, profile, requester, key) if record is not None and answers(record) else None

    def profile_named(self, name: str) -> Optional[EnrollmentProfile]:
        """The profile recorded as ``name`` on certificates ('default' for the unlabelled path)."""
        return next((p for p in self.profiles.values() if p.name == name), None)

    # --- the shared steps ----------------------------------------------------------

    def _issue_for_device(
        self,
        csr: x509.CertificateSigningRequest,
        profile: EnrollmentProfile,
        requester: Requester,
        operation: str,
        certificate_profile: CertificateProfile,
        policy: str,
        public_key: Optional[CertificatePublicKeyTypes] = None,
    ) -> x509.Certificate:
        key = device_key(csr, profile.device_id)
        answers_request = self._answers_request(csr, profile, requester, operation)
        for _attempt in range(SERIAL_ATTEMPTS):
            certificate = self._authority(profile).issue(csr, certificate_profile, public_key)
            record = self._record(certificate, profile, requester, operation)
            audit = self._event(operation, profile, requester, key, record.serial)
            try:
                self.store.enroll_device(record, key, policy, requester.client_address, audit, answers_request)
            except SerialTaken:
                continue
            except AlreadyIssued as exc:
                return self._retried(exc.record, profile, requester, key)
            except (DeviceExists, DeviceOnOtherLabel) as exc:
                raise store_refusal(exc) from None
            return self._committed(certificate, record, profile, requester)
        raise RuntimeError(f"the CA issued {SERIAL_ATTEMPTS} serials in a row that are taken; its serial source is broken")

    # --- retries: a lost response answered with the certificate already issued ---------

    def _answers_request(
        self, csr: x509.CertificateSigningRequest, profile: EnrollmentProfile, requester: Requester, operation: str
    ) -> Optional[Callable[[CertificateRecord], bool]]:
        """Whether a recorded certificate is this request's own, issued within the label's retry window.

        Same label, requester and operation, still valid, and the CSR's public key, subject and
        subjectAltName. None when the window is 0. (A serverkeygen request never matches: its
        certificate holds the key the server generated, not the CSR's.)
        """
        if not profile.retry_window:
            return None
        since = utcnow() - profile.retry_window
        public_key, subject, names = _spki(csr), issued_subject(csr.subject), set(_alt_names(csr))

        def answers(record: CertificateRecord) -> bool:
            if (record.status, record.label, record.requester, record.operation) != ("valid", profile.name, requester.name, operation):
                return False
            if record.issued_at is None or record.issued_at < since:
                return False
            issued = x509.load_der_x509_certificate(record.der)
            return _spki(issued) == public_key and issued.subject == subject and set(_alt_names(issued)) == names

        return answers

    def _successor(self, record: Optional[CertificateRecord], profile: EnrollmentProfile) -> Optional[CertificateRecord]:
        """The certificate a re-enrollment recorded right after superseded ``record``, when issued within the window."""
        if record is None or record.status != "superseded" or record.device_id is None or not profile.retry_window:
            return None
        history = self.store.device_certificates(record.device_id)  # oldest first
        position = [r.serial for r in history].index(record.serial)
        successor = history[position + 1] if position + 1 < len(history) else None
        if successor is None or (successor.operation, successor.status) != ("simplereenroll", "valid") or successor.issued_at is None:
            return None
        return successor if successor.issued_at >= utcnow() - profile.retry_window else None

    def _retried(self, record: CertificateRecord, profile: EnrollmentProfile, requester: Requester, device: str) -> x509.Certificate:
        self.store.add_audit(AuditEvent(
            event=RETRY, actor=requester.name, client_address=requester.client_address, label=profile.name, device=device,
            serial=record.serial, detail=f"{record.operation} sent again; answered with the certificate issued at {record.issued_at:%Y-%m-%d %H:%M:%S} UTC",
        ))
        log.info(
            "%s: retry of %s: returned %s for %r on label %s to %s from %s", requester.request_id or "-", record.operation, record.serial,
            record.common_name, profile.name, requester.name, requester.client_address or "-",
        )
        self.retried(record.operation, profile.name)
        return x509.load_der_x509_certificate(record.der)

    def _committed(self, certificate: x509.Certificate, record: CertificateRecord, profile: EnrollmentProfile, requester: Requester) -> x509.Certificate:
        log.info(
            "%s: issued %s for %r on label %s to %s from %s", requester.request_id or "-", record.serial, record.common_name,
            profile.name, requester.name, requester.client_address or "-",
        )
        self.issued(record.operation, profile.name)
        return certificate

    def _authority(self, profile: EnrollmentProfile) -> CertificateAuthority:
        return self.authorities.for_label(profile.label)

    def _record(self, certificate: x509.Certificate, profile: EnrollmentProfile, requester: Requester, operation: str) -> CertificateRecord:
        cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return CertificateRecord(
            serial=serial_of(certificate),
            common_name=str(cn[0].value) if cn else "",
            subject=certificate.subject.rfc4514_string(),
            label=profile.name,
            requester=requester.name,
            operation=operation,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            der=certificate.public_bytes(Encoding.DER),
            issuer=self._authority(profile).issuer_id,
        )

    @staticmethod
    def _event(operation: str, profile: EnrollmentProfile, requester: Requester, device: str, serial: str, detail: str = "") -> AuditEvent:
        return AuditEvent(
            event=EVENTS[operation], actor=requester.name, client_address=requester.client_address,
            label=profile.name, device=device, serial=serial, detail=detail,
        )


def store_refusal(exc: StoreRefusal, serial: str = "") -> ESTError:
    """The catalogued error for a store's refusal to record (``serial``: the certificate being replaced)."""
    if isinstance(exc, DeviceExists):
        d = exc.device
        return Conflict(
            f"device {d.device_key!r} (number {d.id}) is already enrolled on label {d.label!r}; "
            f"re-enroll with its current certificate, or have an operator free the name with `est-admin device delete {d.id}`"
        )
    if isinstance(exc, DeviceOnOtherLabel):
        d = exc.device
        return Conflict(
            f"device {d.device_key!r} is enrolled on label {d.label!r} (number {d.id}), and a device has one label; "
            f"to move it here, an operator runs `est-admin device delete {d.id}` (revokes its certificate), then enroll again"
        )
    if isinstance(exc, NotCurrent):
        return Forbidden(f"certificate {serial} is {exc.status or 'unknown to this server'}; re-enroll with the device's current certificate")
    return Forbidden(f"certificate {serial} belongs to no device (the device was deleted); a deleted device must enroll afresh")


def device_key(csr: x509.CertificateSigningRequest, how: str) -> str:
    """The device id a label keys its registry on: the CN, the serialNumber attribute or the first SAN."""
    if how == "cn":
        return str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    if how == "serialNumber":
        values = csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if not values:
            raise BadRequest("this label identifies devices by the subject serialNumber attribute, which the CSR lacks")
        return str(values[0].value)
    for name in _alt_names(csr):
        if isinstance(name, (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name)):
            return name.value
        if isinstance(name, x509.IPAddress):
            return str(name.value)
    raise BadRequest("this label identifies devices by subjectAltName, and the CSR requests none (DNS, URI, email or IP)")


def serial_of(certificate: x509.Certificate) -> str:
    """A serial as the store keys it: lower-case hex."""
    return format(certificate.serial_number, "x")


def _spki(obj: Union[x509.CertificateSigningRequest, x509.Certificate]) -> bytes:
    return obj.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _alt_names(obj: Union[x509.CertificateSigningRequest, x509.Certificate]) -> list[x509.GeneralName]:
    try:
        return list(obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []
