"""Loading the CA: encrypted keys, passphrase sources, intermediates and their chain."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from est_app.ca import CertificateProfile, load_authority, load_csr
from est_app.ca.development import create_root_ca
from est_app.config import CASettings, ConfigError

from .pki import der, make_csr, pem

PASSPHRASE = b"a long CA passphrase for tests"


def encrypted_key_file(tmp_path, key):
    path = tmp_path / "ca.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(PASSPHRASE)
        )
    )
    return path


@pytest.fixture
def root(tmp_path):
    key, cert = create_root_ca("Test Root")
    (tmp_path / "root.pem").write_bytes(pem(cert))
    return key, cert


def test_encrypted_key_with_passphrase_from_env(tmp_path, root, monkeypatch):
    key, _ = root
    monkeypatch.setenv("EST_TEST_PASSPHRASE", PASSPHRASE.decode())
    settings = CASettings(cert_file=tmp_path / "root.pem", key_file=encrypted_key_file(tmp_path, key), key_passphrase_env="EST_TEST_PASSPHRASE")
    assert load_authority(settings).certificate.subject.rfc4514_string() == "CN=Test Root"


def test_encrypted_key_with_passphrase_from_file(tmp_path, root):
    key, _ = root
    (tmp_path / "passphrase").write_bytes(PASSPHRASE + b"\n")
    settings = CASettings(cert_file=tmp_path / "root.pem", key_file=encrypted_key_file(tmp_path, key), key_passphrase_file=tmp_path / "passphrase")
    assert load_authority(settings).chain[-1].subject == load_authority(settings).chain[-1].issuer


@pytest.mark.parametrize(
    "source, message",
    [
        ({}, "Password was not given but private key is encrypted"),
        ({"key_passphrase_env": "EST_TEST_UNSET"}, "EST_TEST_UNSET is not set"),
        ({"key_passphrase_env": "EST_TEST_WRONG"}, "passphrase is wrong"),
    ],
)
def test_encrypted_key_problems_are_named(tmp_path, root, monkeypatch, source, message):
    key, _ = root
    monkeypatch.delenv("EST_TEST_UNSET", raising=False)
    monkeypatch.setenv("EST_TEST_WRONG", "not it")
    settings = CASettings(cert_file=tmp_path / "root.pem", key_file=encrypted_key_file(tmp_path, key), **source)
    with pytest.raises(ConfigError, match=message):
        load_authority(settings)


def _intermediate(tmp_path, root_key, root_cert):
    """An issuing CA below the root, written to issuing.pem / issuing.key."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuing CA")]))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA384())
    )
    (tmp_path / "issuing.pem").write_bytes(pem(cert))
    (tmp_path / "issuing.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert


def test_intermediate_ca_serves_the_chain_and_caps_validity(tmp_path, root):
    root_key, root_cert = root
    cert = _intermediate(tmp_path, root_key, root_cert)
    settings = CASettings(
        cert_file=tmp_path / "issuing.pem", key_file=tmp_path / "issuing.key", chain_file=tmp_path / "root.pem", digest="sha384"
    )
    authority = load_authority(settings)
    # PKCS#7 certificates are a DER SET OF: compared as a set, not a sequence.
    assert set(pkcs7.load_der_pkcs7_certificates(authority.cacerts)) == {cert, root_cert}
    issued = authority.issue(load_csr(der(make_csr())), CertificateProfile(validity_days=365))
    assert issued.not_valid_after_utc == cert.not_valid_after_utc
    assert isinstance(issued.signature_hash_algorithm, hashes.SHA384)
    issued.verify_directly_issued_by(cert)
    chain = pkcs7.load_der_pkcs7_certificates(authority.certs_only(issued, CertificateProfile(include_chain=True)))
    assert set(chain) == {issued, cert, root_cert} and len(chain) == 3


def test_chain_without_root_stops_start(tmp_path, root):
    root_key, root_cert = root
    _intermediate(tmp_path, root_key, root_cert)
    with pytest.raises(ConfigError, match="missing the issuer CN=Test Root"):
        load_authority(CASettings(cert_file=tmp_path / "issuing.pem", key_file=tmp_path / "issuing.key"))
