"""Harness: a CSR body through the whole issuing path, below HTTP.

Decode the body, load and verify the CSR (est_app/ca/csr.py), hold it to
every label's policy, take its device id, check proof-of-possession, issue
(est_app/ca/authority.py), build the certs-only answer and the serverkeygen
multipart, and render both in each response encoding (est_app/est/issuance.py,
est_app/encoding.py). Every refusal must be a catalogued 4xx, every issued
certificate's basic constraints, key usage and EKU are the profile's, and
every rendered answer must decode back to the DER it was given.
"""

from __future__ import annotations

from . import harness  # noqa: I001  (first: instruments est_app)

import base64

from cryptography import x509

from est_app.auth import Identity, check_proof_of_possession
from est_app.ca import check_policy, load_csr
from est_app.encoding import CERTS_ONLY, PKCS8, Base64Encoding, DerEncoding, ESTResponse, decode_body
from est_app.enrollment import device_key

from . import deployment
from .deployment import body_forms, der, sample_csrs

DEPLOYMENT = deployment.build()
AUTHORITY = DEPLOYMENT.state.authority
PROFILES = list(DEPLOYMENT.state.profiles.values())
ENCODINGS = (Base64Encoding(64), Base64Encoding(0), DerEncoding())
USER = Identity("user", deployment.USER)
KEY_STAND_IN = b"\x30\x03\x02\x01\x00"  # the serverkeygen key part: the encoding is what is exercised


def enroll_offline(body: bytes, profiles: list = PROFILES) -> None:
    """Everything simpleenroll does to a body, for each of ``profiles`` (default: every label), except recording."""
    csr = harness.client_error_or_none(lambda: load_csr(decode_body(body, "PKCS#10 CSR")))
    if csr is not None:
        with DEPLOYMENT.app.test_request_context():
            for profile in profiles:
                harness.client_error_or_none(issue_for, csr, profile)


def issue_for(csr: x509.CertificateSigningRequest, profile) -> None:
    check_policy(csr, profile.csr_policy)
    check_proof_of_possession(csr, USER, profile)
    device_key(csr, profile.device_id)
    certificate = AUTHORITY.issue(csr, profile.certificate)
    # Nothing a CSR asks for decides CA:TRUE, key usage or EKU.
    extensions = certificate.extensions
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert extensions.get_extension_for_class(x509.KeyUsage).value == profile.certificate.key_usage(certificate.public_key())
    assert extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == profile.certificate.extended_key_usage_extension()
    certs_only = AUTHORITY.certs_only(certificate, profile.certificate)
    for encoding in ENCODINGS:
        single = ESTResponse([(CERTS_ONLY, certs_only)])
        encoding.apply(single)
        body = single.get_data()
        assert (base64.b64decode(body) if encoding.name == "base64" else body) == certs_only
        multipart = ESTResponse([(PKCS8, KEY_STAND_IN), (CERTS_ONLY, certs_only)])
        encoding.apply(multipart)
        assert multipart.headers["Content-Length"] == str(len(multipart.get_data()))


def seeds() -> list[bytes]:
    found = []
    for csr in sample_csrs():
        found += body_forms(der(csr))
    return found


if __name__ == "__main__":
    harness.run("csr", enroll_offline, seeds())
