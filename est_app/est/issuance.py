"""The steps every issuing operation shares: read the CSR, issue, record, answer.

A certificate is only ever returned after its record (and its device's) is
committed; a duplicate device under the ``reject`` policy is a 409 and the
freshly signed certificate is discarded unrecorded and unreturned.
"""

from __future__ import annotations

from dataclasses import replace

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from flask import request

from .. import metrics
from ..audit import EVENTS, request_event
from ..auth import Identity
from ..ca import CertificateProfile, check_policy, load_csr
from ..encoding import CERTS_ONLY, PKCS10, ESTResponse, decode_body, read_body
from ..errors import BadRequest, Conflict, Forbidden, UnsupportedMediaType
from ..profiles import EnrollmentProfile
from ..state import state
from ..store import CertificateRecord, DeviceExists, DeviceOnOtherLabel, NotCurrent, Orphaned, SerialTaken


def read_csr(profile: EnrollmentProfile) -> x509.CertificateSigningRequest:
    """The request's CSR, decoded, verified and held to the profile's policy."""
    if request.mimetype != PKCS10:
        raise UnsupportedMediaType(f"Content-Type must be {PKCS10}, not {request.mimetype or 'missing'}")
    csr = load_csr(decode_body(read_body(), "PKCS#10 CSR"))
    check_policy(csr, profile.csr_policy)
    return csr


def device_key(csr: x509.CertificateSigningRequest, how: str) -> str:
    """The device id a label keys its registry on: the CN, the serialNumber attribute or the first SAN."""
    if how == "cn":
        return str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    if how == "serialNumber":
        values = csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if not values:
            raise BadRequest("this label identifies devices by the subject serialNumber attribute, which the CSR lacks")
        return str(values[0].value)
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = []
    for name in names:
        if isinstance(name, (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name)):
            return name.value
        if isinstance(name, x509.IPAddress):
            return str(name.value)
    raise BadRequest("this label identifies devices by subjectAltName, and the CSR requests none (DNS, URI, email or IP)")


def issue_for_device(
    csr: x509.CertificateSigningRequest,
    profile: EnrollmentProfile,
    identity: Identity,
    operation: str,
    *,
    certificate_profile: CertificateProfile | None = None,
    default_policy: str = "renew",
    public_key: CertificatePublicKeyTypes | None = None,
) -> x509.Certificate:
    """Issue for the CSR's device and record it as the device's current certificate."""
    key = device_key(csr, profile.device_id)
    policy = profile.duplicate_policy or default_policy
    app_state = state()
    while True:
        certificate = app_state.authority_for(profile).issue(csr, certificate_profile or profile.certificate, public_key)
        record = _record(certificate, profile, identity, operation)
        audit = request_event(EVENTS[operation], device=key, serial=record.serial)
        try:
            app_state.store.enroll_device(record, key, policy, request.remote_addr or "", audit)
            metrics.certificate_issued(operation, profile.name)
            return certificate
        except SerialTaken:
            continue  # a random 159-bit serial collided: draw another
        except DeviceExists as exc:
            d = exc.device
            raise Conflict(
                f"device {d.device_key!r} (number {d.id}) is already enrolled on label {d.label!r}; "
                f"re-enroll with its current certificate, or have an operator free the name with `est-admin device delete {d.id}`"
            ) from None
        except DeviceOnOtherLabel as exc:
            d = exc.device
            raise Conflict(
                f"device {d.device_key!r} is enrolled on label {d.label!r} (number {d.id}), and a device has one label; "
                f"to move it here, an operator runs `est-admin device delete {d.id}` (revokes its certificate), then enroll again"
            ) from None


def issue_replacement(csr: x509.CertificateSigningRequest, profile: EnrollmentProfile, identity: Identity) -> x509.Certificate:
    """Re-enrollment: issue, and supersede the certificate the device authenticated with."""
    old_serial = format(identity.certificate.serial_number, "x")
    app_state = state()
    while True:
        certificate = app_state.authority_for(profile).issue(csr, profile.certificate)
        record = _record(certificate, profile, identity, "simplereenroll")
        audit = request_event("reenroll", device=record.common_name, serial=record.serial, detail=f"supersedes {old_serial}")
        try:
            app_state.store.replace_certificate(old_serial, record, request.remote_addr or "", audit)
            metrics.certificate_issued("simplereenroll", profile.name)
            return certificate
        except SerialTaken:
            continue
        except NotCurrent as exc:
            state_word = exc.status or "unknown to this server"
            raise Forbidden(f"certificate {old_serial} is {state_word}; re-enroll with the device's current certificate") from None
        except Orphaned:
            raise Forbidden(orphan_message(old_serial)) from None


def orphan_message(serial: str) -> str:
    return f"certificate {serial} belongs to no device (the device was deleted); a deleted device must enroll afresh"


def certs_only_response(certificate: x509.Certificate, profile: EnrollmentProfile) -> ESTResponse:
    return ESTResponse([(CERTS_ONLY, state().authority_for(profile).certs_only(certificate, profile.certificate))])


def _record(certificate: x509.Certificate, profile: EnrollmentProfile, identity: Identity, operation: str) -> CertificateRecord:
    cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateRecord(
        serial=format(certificate.serial_number, "x"),
        common_name=str(cn[0].value) if cn else "",
        subject=certificate.subject.rfc4514_string(),
        label=profile.name,
        requester=identity.requester,
        operation=operation,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        der=certificate.public_bytes(Encoding.DER),
        issuer=state().authority_for(profile).issuer_id,
    )


def bootstrap_profile(profile: EnrollmentProfile, validity_days: int) -> CertificateProfile:
    """Bootstrap certificates: short-lived, clientAuth only, whatever the label says."""
    return replace(profile.certificate, validity_days=validity_days, extended_key_usage=("clientAuth",), include_chain=False)
