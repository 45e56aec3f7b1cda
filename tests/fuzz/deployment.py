"""The one deployment every fuzz harness runs against, and the real inputs they start from.

A development PKI made by `est init` (as tests/conftest.py does), a config
with labels that switch on every policy branch (CN pattern, required CSR
attributes, each device-id mode, both response encodings, certificate and
password authentication, a trusted proxy), an RA certificate registered for
the labels, and a device certificate issued by the CA. ``seeds`` makes valid
CSRs in every body form and real OCSP requests, so mutations start near the
structures the parsers expect.
"""

from __future__ import annotations

import base64
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID
from flask import Flask
from werkzeug.security import generate_password_hash

from est_app import auth, create_app
from est_app.auth import fingerprint
from est_app.ca.profile import CertificateProfile
from est_app.state import AppState

from ..conftest import PASSWORD, USER, basic_auth, run_cli

PROXY = "127.0.0.9"
LABELS = {
    "pumps": {
        "subject_cn_pattern": "NPP[A-Z0-9]{4}",
        "csr_attributes": ["serialNumber", "macAddress", "challengePassword"],
        "auth": ["basic", "cert"],
        "response_format": "der",
        "include_chain": True,
    },
    "strict": {"csr_attributes": ["serialNumber", "extensionRequest"], "require_csr_attributes": True, "device_id": "serialNumber"},
    "san": {
        "device_id": "san",
        "san_types": ["dns", "email", "ip", "uri"],
        "san_dns_suffixes": ["pumps.example", "example.org"],
        "base64_line_length": 0,
        "serverkeygen_key_types": ["ec-p256", "ec-p384"],
    },
    "ra": {"auth": ["cert"], "duplicate_policy": "reject"},
}
# A password hash this cheap is for the fuzzer only: scrypt's deliberate cost (tens of
# milliseconds a check) would hold every harness touching Basic to a few dozen runs a second.
CHEAP_HASH = "pbkdf2:sha256:1"


@dataclass
class Deployment:
    app: Flask
    state: AppState
    directory: Path
    ra_certificate: x509.Certificate
    device_certificate: x509.Certificate
    device_key: ec.EllipticCurvePrivateKey


def scratch_parent() -> str | None:
    """Where deployments go: memory-backed when there is /dev/shm (every refusal is an audited SQLite write)."""
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def build() -> Deployment:
    """Create the PKI, database and app in ``$EST_FUZZ_DEPLOYMENT`` (the runner makes and removes it) or a new directory."""
    directory = Path(os.environ.get("EST_FUZZ_DEPLOYMENT") or tempfile.mkdtemp(prefix="est-fuzz-", dir=scratch_parent()))
    result = run_cli("init", "--dir", str(directory))
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config.update(
        database={"url": f"sqlite:///{directory / 'est.db'}"},
        rate_limit={"enabled": False},
        labels=LABELS,
        trusted_proxies=[f"{PROXY}/32"],
        log_level="ERROR",
        # The password back-off would answer most inputs 429 unparsed after five failures; the
        # harnesses reach the parsers behind it (a 429 stays an allowed answer).
        admin={**config.get("admin", {}), "lockout_after": 10**9},
    )
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    app = create_app(path)
    app.config["TESTING"] = True
    state: AppState = app.extensions["est_app"]
    state.store.add_user(USER, generate_password_hash(PASSWORD, CHEAP_HASH))
    auth._dummy_hash = generate_password_hash("not a password", CHEAP_HASH)  # same reason as CHEAP_HASH

    authority = state.authority
    ra_key = ec.generate_private_key(ec.SECP256R1())
    ra_certificate = authority.issue(_csr("IQE-GATEWAY-1", ra_key), CertificateProfile(extended_key_usage=("clientAuth",)))
    state.store.add_ra(fingerprint(ra_certificate), ra_certificate.subject.rfc4514_string(), ["pumps", "ra", "default"])
    device_key = ec.generate_private_key(ec.SECP256R1())
    client = app.test_client()
    response = client.post(
        "/.well-known/est/simpleenroll",
        data=pem(_csr("DEV-0001", device_key)),  # the unlabelled path: not a pump name (pumps owns NPP....)
        headers={"Content-Type": "application/pkcs10", **basic_auth()},
    )
    assert response.status_code == 200, response.get_data()
    device_certificate = state.store.find_devices(search="DEV-0001")[0]
    record = state.store.device_certificates(device_certificate.id)[0]
    return Deployment(app, state, directory, ra_certificate, x509.load_der_x509_certificate(record.der), device_key)


def _csr(cn: str, key, *, serial_number: str | None = None, san: list[x509.GeneralName] | None = None, challenge: str | None = None):
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial_number:
        names.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if challenge:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest)


def der(obj) -> bytes:
    return obj.public_bytes(serialization.Encoding.DER)


def pem(obj) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def body_forms(data: bytes, label: str = "CERTIFICATE REQUEST") -> list[bytes]:
    """``data`` as every body shape a client sends: DER, PEM, base64 one line, wrapped (LF, CRLF), with spaces."""
    text = base64.b64encode(data)
    lines64 = b"\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    lines76 = b"\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    return [
        data,
        b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label.encode(), lines64, label.encode()),
        text,
        lines64 + b"\n",
        lines76 + b"\r\n",
        b"  " + b" ".join(text[i : i + 10] for i in range(0, len(text), 10)) + b"\t\n",
    ]


def sample_csrs() -> list[x509.CertificateSigningRequest]:
    """Valid CSRs of every key type and shape the labels accept (and a few they refuse)."""
    p256 = ec.generate_private_key(ec.SECP256R1())
    return [
        _csr("NPPBBB4", p256),
        _csr("NPPBBB5", ec.generate_private_key(ec.SECP384R1()), serial_number="SN-0042", challenge="s3cret"),
        _csr("NPPBBB6", rsa.generate_private_key(65537, 2048)),
        _csr("NPPBBB7", ed25519.Ed25519PrivateKey.generate(), serial_number="SN-0043"),
        _csr(
            "pump-8.example",
            p256,
            san=[
                x509.DNSName("pump-8.pumps.example"),
                x509.RFC822Name("pump@example.org"),
                x509.UniformResourceIdentifier("urn:dev:NPPBBB8"),
                x509.IPAddress(__import__("ipaddress").ip_address("10.1.2.3")),
            ],
        ),
        _csr("weak", rsa.generate_private_key(65537, 1024)),
        _csr("odd-curve", ec.generate_private_key(ec.SECP256K1())),
    ]


def ocsp_requests(deployment: Deployment) -> list[bytes]:
    """Real OCSP requests: for the device's certificate with every hash, with a nonce, for an unknown serial."""
    ca = deployment.state.authority.certificate
    device = deployment.device_certificate
    requests = []
    for algorithm in (hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512):
        requests.append(der(ocsp.OCSPRequestBuilder().add_certificate(device, ca, algorithm()).build()))
    with_nonce = ocsp.OCSPRequestBuilder().add_certificate(device, ca, hashes.SHA1()).add_extension(x509.OCSPNonce(b"\x01" * 16), critical=False)
    requests.append(der(with_nonce.build()))
    requests.append(der(ocsp.OCSPRequestBuilder().add_certificate(deployment.ra_certificate, ca, hashes.SHA256()).build()))
    return requests


def header_text(data: bytes) -> str:
    """Bytes as an HTTP header value can carry them: latin-1, without CR, LF or NUL (a server refuses those)."""
    return data.translate(None, b"\r\n\0").decode("latin-1")


def proxy_header(certificate: x509.Certificate) -> bytes:
    """The client-certificate header as a proxy (nginx's $ssl_client_escaped_cert) sends it."""
    return proxy_header_of_der(der(certificate))


def proxy_header_of_der(data: bytes) -> bytes:
    """The same for any bytes: PEM-wrapped and %-escaped."""
    return urllib.parse.quote(body_forms(data, "CERTIFICATE")[1].decode()).encode()


def clock() -> datetime:
    return datetime.now(timezone.utc)
