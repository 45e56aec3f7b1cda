"""simpleenroll and cacerts through the Flask test client: profiles, labels, store."""

from __future__ import annotations

import base64
import sqlite3

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from est_app.state import state

from .conftest import basic_auth
from .pki import der, make_csr, pem, rsa_key

ENROLL = "/.well-known/est/simpleenroll"


def enroll(client, csr_body: bytes, path: str = ENROLL, **headers):
    return client.post(path, data=csr_body, headers={"Content-Type": "application/pkcs10", **basic_auth(), **headers})


def certs_from(response) -> list[x509.Certificate]:
    body = response.get_data()
    if response.headers.get("Content-Transfer-Encoding") == "base64":
        body = base64.b64decode(body)
    return pkcs7.load_der_pkcs7_certificates(body)


def test_cacerts_holds_the_self_signed_root(client, pki_dir):
    response = client.get("/.well-known/est/cacerts")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/pkcs7-mime"
    assert response.headers["Content-Transfer-Encoding"] == "base64"
    (root,) = certs_from(response)
    assert root.subject == root.issuer
    assert root == x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())


def test_enroll_returns_exactly_the_issued_certificate_and_records_it(app, client, pki_dir):
    response = enroll(client, base64.b64encode(der(make_csr("NPPBBB4"))))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/pkcs7-mime; smime-type=certs-only"
    (cert,) = certs_from(response)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "NPPBBB4"
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    with app.app_context():
        record = state().store.get_certificate(format(cert.serial_number, "x"))
    assert record is not None and record.der == der(cert) and record.requester == "gateway"


def test_csr_cannot_ask_for_ca_or_extra_usages(client):
    csr = make_csr(
        "NPPBBB4",
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.KeyUsage(True, True, True, True, True, True, True, False, False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]), False),
        ],
    )
    (cert,) = certs_from(enroll(client, der(csr)))
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
