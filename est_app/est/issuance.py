"""The steps every issuing operation shares: read the CSR, issue, record, in that order."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from flask import request

from ..ca import check_policy, load_csr
from ..encoding import PKCS10, decode_body
from ..errors import UnsupportedMediaType
from ..profiles import EnrollmentProfile
from ..state import state
from ..store import CertificateRecord, SerialTaken


def read_csr(profile: EnrollmentProfile) -> x509.CertificateSigningRequest:
    """The request's CSR, decoded, verified and held to the profile's policy."""
    if request.mimetype != PKCS10:
        raise UnsupportedMediaType(f"Content-Type must be {PKCS10}, not {request.mimetype or 'missing'}")
    csr = load_csr(decode_body(request.get_data(cache=False), "PKCS#10 CSR"))
    check_policy(csr, profile.csr_policy)
    return csr


def issue_and_record(csr: x509.CertificateSigningRequest, profile: EnrollmentProfile, requester: str) -> x509.Certificate:
    """Issue a certificate and commit its record; only a committed certificate is returned."""
    app_state = state()
    while True:
        certificate = app_state.authority.issue(csr, profile.certificate)
        try:
            app_state.store.record_certificate(_record(certificate, profile.name, requester))
            return certificate
        except SerialTaken:
            continue  # a random 159-bit serial collided: draw another


def _record(certificate: x509.Certificate, label: str, requester: str) -> CertificateRecord:
    cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateRecord(
        serial=format(certificate.serial_number, "x"),
        common_name=str(cn[0].value) if cn else "",
        subject=certificate.subject.rfc4514_string(),
        label=label,
        requester=requester,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        der=certificate.public_bytes(Encoding.DER),
    )
