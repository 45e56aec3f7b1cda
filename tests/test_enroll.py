"""simpleenroll and cacerts through the Flask test client: profiles, labels, store."""

from __future__ import annotations

import base64
import sqlite3

import pytest
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


@pytest.mark.both_databases
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
    assert record is not None and record.der == der(cert) and record.requester == "user:gateway"


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


def test_label_overrides_format_validity_eku_and_chain(make_app):
    app = make_app(
        labels={
            "pumps": {"response_format": "der", "cert_validity_days": 30, "include_chain": True},
            "servers": {"extended_key_usage": ["serverAuth", "clientAuth"], "base64_line_length": 0},
        }
    )
    client = app.test_client()
    response = enroll(client, der(make_csr()), "/.well-known/est/pumps/simpleenroll")
    assert response.status_code == 200
    assert "Content-Transfer-Encoding" not in response.headers
    certs = pkcs7.load_der_pkcs7_certificates(response.get_data())  # a SET OF: order is not meaningful
    (root,) = [c for c in certs if c.subject == c.issuer]
    (cert,) = [c for c in certs if c != root]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    with app.app_context():
        assert state().store.get_certificate(format(cert.serial_number, "x")).label == "pumps"

    response = enroll(client, der(make_csr("NPPBBB5")), "/.well-known/est/servers/simpleenroll")  # a device has one label
    assert response.get_data().count(b"\n") == 1
    (cert,) = certs_from(response)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

    labelled_cacerts = client.get("/.well-known/est/pumps/cacerts")
    assert labelled_cacerts.status_code == 200 and "Content-Transfer-Encoding" not in labelled_cacerts.headers
    default = enroll(client, der(make_csr("NPPBBB6")))
    assert default.headers["Content-Transfer-Encoding"] == "base64"
    (cert,) = certs_from(default)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 365


def test_label_cn_pattern(make_app):
    client = make_app(labels={"pumps": {"subject_cn_pattern": "NPP[A-Z0-9]{4}"}}).test_client()
    assert enroll(client, der(make_csr("NPPBBB4")), "/.well-known/est/pumps/simpleenroll").status_code == 200
    refused = enroll(client, der(make_csr("laptop-17")), "/.well-known/est/pumps/simpleenroll")
    assert refused.status_code == 400 and "does not match" in refused.get_data(as_text=True)


def test_rsa_subject_gets_key_encipherment_and_san_is_copied(make_app):
    client = make_app(san_types=["dns"], san_dns_suffixes=["ward3.example"]).test_client()
    san = x509.SubjectAlternativeName([x509.DNSName("pump-17.ward3.example")])
    (cert,) = certs_from(enroll(client, pem(make_csr("NPPBBB4", key=rsa_key(2048), extensions=[(san, False)]))))
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == san


def test_subject_keeps_only_allowed_attributes(client):
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "NPPBBB4"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "General Hospital"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "x@example.org"),
            x509.NameAttribute(NameOID.USER_ID, "root"),
        ]
    )
    (cert,) = certs_from(enroll(client, der(make_csr(name=name))))
    assert cert.subject.rfc4514_string() == "O=General Hospital,CN=NPPBBB4"


def test_not_after_never_past_the_ca(make_app, pki_dir):
    client = make_app(ca={"cert_validity_days": 100000}).test_client()
    (cert,) = certs_from(enroll(client, der(make_csr())))
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    assert cert.not_valid_after_utc == ca.not_valid_after_utc


@pytest.mark.both_databases
def test_serials_are_random_unique_and_long(app, client):
    serials = set()
    for _ in range(50):
        (cert,) = certs_from(enroll(client, der(make_csr())))
        serials.add(cert.serial_number)
    assert len(serials) == 50
    assert all(s.bit_length() >= 64 for s in serials)
    with app.app_context():
        assert state().store.count_certificates() == 50


@pytest.mark.both_databases
def test_serial_collision_draws_again(app, client, monkeypatch):
    draws = iter([0x1234567890ABCDEF1, 0x1234567890ABCDEF1, 0x2234567890ABCDEF2])
    monkeypatch.setattr("est_app.ca.authority.x509.random_serial_number", lambda: next(draws))
    first = certs_from(enroll(client, der(make_csr())))[0]
    second = certs_from(enroll(client, der(make_csr())))[0]
    assert (first.serial_number, second.serial_number) == (0x1234567890ABCDEF1, 0x2234567890ABCDEF2)
    with app.app_context():
        assert state().store.count_certificates() == 2


def test_no_certificate_is_returned_unless_its_record_is_committed(app, client, tmp_path):
    # A real database fault: a trigger makes every certificate INSERT fail.
    db = sqlite3.connect(tmp_path / "est.db")
    db.execute("CREATE TRIGGER refuse BEFORE INSERT ON certificates BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.commit()
    response = enroll(client, der(make_csr()))
    assert response.status_code == 500
    body = response.get_data()
    assert b"MII" not in body and b"\x30\x82" not in body
    assert "request id" in body.decode()
    db.execute("DROP TRIGGER refuse")
    db.commit()
    assert db.execute("SELECT count(*) FROM certificates").fetchone()[0] == 0
    assert enroll(client, der(make_csr())).status_code == 200
