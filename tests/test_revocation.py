"""Revocation through the CLI and the Flask test client: the store, the CRL and its cache, OCSP.

`est cert revoke` and `est device revoke` run for real (each CLI run builds its own app, as
another process on the same database would); the CRL is read back from GET /crl and /crl.pem
and checked with cryptography; OCSP requests are built with cryptography's OCSPRequestBuilder.
A revoked certificate is refused as an RA credential and for re-enrollment from the next request.
"""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
import subprocess
import urllib.parse
from datetime import datetime, timedelta, timezone
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import est_app.revocation as revocation_module
from est_app import create_app
from est_app.ca.crl import build_crl
from est_app.ca.development import create_root_ca
from est_app.ca.signers import KeyUnavailable, Signer
from est_app.config import ConfigError
from est_app.revocation import crl_not_renewed, revoke
from est_app.state import state
from est_app.store.schema import unpublished_revocations

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, make_csr, pem
from .test_enroll import certs_from

ENROLL = "/.well-known/est/simpleenroll"
REENROLL = "/.well-known/est/simplereenroll"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
OCSP_REQUEST = "application/ocsp-request"
OCSP_RESPONSE = "application/ocsp-response"
# The reason names the CLI takes, and the CRL/OCSP reason each becomes (None: no reason code).
REASONS = {
    "unspecified": None,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def build(make_config, tmp_path):
    """``build(**overrides)``: an app (with the test user) and its config path, database and test client."""

    def make(**overrides) -> SimpleNamespace:
        path = make_config(**overrides)
        result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=path)
        assert result.exit_code == 0, result.output
        app = create_app(path)
        app.config["TESTING"] = True
        return SimpleNamespace(app=app, client=app.test_client(), config=path, db=tmp_path / "est.db")

    return make


@pytest.fixture
def env(build) -> SimpleNamespace:
    return build()


@pytest.fixture(scope="module")
def ca(pki_dir) -> tuple[object, x509.Certificate]:
    key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    return key, x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def enroll(client, cn: str = "NPPBBB4", key=None, path: str = ENROLL) -> tuple[x509.Certificate, object]:
    """Enroll ``cn`` with Basic credentials; the certificate and its key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    response = client.post(path, data=der(make_csr(cn, key)), headers={"Content-Type": "application/pkcs10", **basic_auth()})
    assert response.status_code == 200, response.get_data(as_text=True)
    (cert,) = certs_from(response)
    return cert, key


def cli(env: SimpleNamespace, *args: str):
    return run_cli(*args, config=env.config)


def revoke_cli(env: SimpleNamespace, serial_text: str, *reason: str) -> str:
    result = cli(env, "cert", "revoke", serial_text, *(("--reason", reason[0]) if reason else ()))
    assert result.exit_code == 0, result.output
    return result.output


def record_of(env: SimpleNamespace, serial_hex: str):
    with env.app.app_context():
        return state().store.get_certificate(serial_hex)


def get_crl(client) -> x509.CertificateRevocationList:
    response = client.get("/crl")
    assert response.status_code == 200, response.get_data()
    assert response.headers["Content-Type"] == "application/pkix-crl"
    assert response.headers["Content-Length"] == str(len(response.get_data()))
    return x509.load_der_x509_crl(response.get_data())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def crl_rows(env: SimpleNamespace) -> list[tuple[int, str, str]]:
    with sqlite3.connect(env.db) as db:
        return db.execute("SELECT number, this_update, next_update FROM crls ORDER BY number").fetchall()


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, algorithm=hashes.SHA1, nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def ocsp_post(client, body: bytes) -> ocsp.OCSPResponse:
    response = client.post("/ocsp", data=body, headers={"Content-Type": OCSP_REQUEST})
    assert response.status_code == 200, response.get_data()
    assert response.headers["Content-Type"] == OCSP_RESPONSE
    return ocsp.load_der_ocsp_response(response.get_data())


def ocsp_get(client, body: bytes | str) -> ocsp.OCSPResponse:
    """RFC 6960 A.1: GET {url}/{url-encoding of base64 of the DER request}."""
    encoded = body if isinstance(body, str) else urllib.parse.quote(base64.b64encode(body).decode(), safe="")
    response = client.get(f"/ocsp/{encoded}")
    assert response.status_code == 200, response.get_data()
    assert response.headers["Content-Type"] == OCSP_RESPONSE
    return ocsp.load_der_ocsp_response(response.get_data())


def verify_signature(public_key, signature: bytes, data: bytes, algorithm) -> None:
    """Raise InvalidSignature unless ``signature`` over ``data`` is ``public_key``'s."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, rsa_padding.PKCS1v15(), algorithm)
    else:
        public_key.verify(signature, data)


def key_hash(public_key) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING: the ResponderID byKey / issuerKeyHash."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def near_now(value: datetime, seconds: float = 30) -> bool:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return abs((datetime.now(timezone.utc) - value).total_seconds()) < seconds


def write_pem_files(directory: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(pem(cert))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def mint_responder(issuer_key, issuer_cert, eku=(ExtendedKeyUsageOID.OCSP_SIGNING,), key=None) -> tuple[x509.Certificate, object]:
    """A delegated OCSP responder certificate signed by ``issuer_key`` (no EKU extension when ``eku`` is None)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est_app OCSP responder")]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()), critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


# --- est cert revoke / est device revoke ---------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(REASONS))
@pytest.mark.both_databases
def test_cert_revoke_records_status_time_and_reason(env, reason):
    cert, _ = enroll(env.client)
    output = revoke_cli(env, serial(cert), reason)
    assert output == f"revoked {serial(cert)} ({reason}); CRL re-signed\n"
    record = record_of(env, serial(cert))
    assert (record.status, record.revocation_reason) == ("revoked", reason)
    assert near_now(record.revoked_at)

    (entry,) = list(get_crl(env.client))
    assert entry.serial_number == cert.serial_number
    assert abs((entry.revocation_date_utc - record.revoked_at.replace(tzinfo=timezone.utc)).total_seconds()) < 1
    if REASONS[reason] is None:  # RFC 5280 5.3.1: absent rather than unspecified
        with pytest.raises(x509.ExtensionNotFound):
            entry.extensions.get_extension_for_class(x509.CRLReason)
    else:
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == REASONS[reason]


def test_cert_revoke_defaults_to_unspecified(env):
    cert, _ = enroll(env.client)
    revoke_cli(env, serial(cert))
    assert record_of(env, serial(cert)).revocation_reason == "unspecified"


def test_cert_revoke_refuses_an_unknown_reason(env):
    cert, _ = enroll(env.client)
    result = cli(env, "cert", "revoke", serial(cert), "--reason", "stolen")
    assert result.exit_code == 2 and "'stolen' is not one of" in result.output
    assert record_of(env, serial(cert)).status == "valid"


def test_cert_revoke_of_an_unknown_serial_changes_nothing(env):
    enroll(env.client)
    before = crl_number(get_crl(env.client))
    unknown = format(x509.random_serial_number(), "x")
    result = cli(env, "cert", "revoke", unknown)
    assert result.exit_code == 1
    assert f"no certificate with serial {unknown}" in result.output
    assert crl_number(get_crl(env.client)) == before  # no CRL re-signed for nothing
    with env.app.app_context():
        assert [e for e in state().store.audit_events() if e.event == "revoke"] == []


@pytest.mark.both_databases
def test_cert_revoke_twice_keeps_the_first_revocation(env):
    cert, _ = enroll(env.client)
    revoke_cli(env, serial(cert), "keyCompromise")
    first = record_of(env, serial(cert))
    number = crl_number(get_crl(env.client))
    result = cli(env, "cert", "revoke", serial(cert), "--reason", "superseded")
    assert result.exit_code == 1
    assert f"certificate {serial(cert)} is revoked already" in result.output
    again = record_of(env, serial(cert))
    assert (again.status, again.revoked_at, again.revocation_reason) == ("revoked", first.revoked_at, "keyCompromise")
    assert crl_number(get_crl(env.client)) == number
    with env.app.app_context():
        assert len([e for e in state().store.audit_events() if e.event == "revoke"]) == 1


def openssl_styles(cert: x509.Certificate) -> dict[str, str]:
    """The serial as operators copy it: from `openssl x509 -serial`, from `-text`, or typed in capitals."""
    text = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem(cert), capture_output=True, check=True).stdout
    pairs = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big").hex()  # DER-style, sign byte kept
    return {
        "openssl -serial": text.decode().strip().removeprefix("serial="),
        "colons (openssl -text)": ":".join(pairs[i : i + 2] for i in range(0, len(pairs), 2)),
        "uppercase colons": ":".join(pairs[i : i + 2] for i in range(0, len(pairs), 2)).upper(),
        "uppercase": serial(cert).upper(),
        "leading zeros": "000" + serial(cert),
    }


@pytest.mark.parametrize("style", ["openssl -serial", "colons (openssl -text)", "uppercase colons", "uppercase", "leading zeros"])
def test_cert_revoke_accepts_the_serial_as_openssl_prints_it(env, style):
    cert, _ = enroll(env.client)
    typed = openssl_styles(cert)[style]
    output = revoke_cli(env, typed, "keyCompromise")
    assert output.startswith(f"revoked {serial(cert)} (keyCompromise)")
    assert record_of(env, serial(cert)).status == "revoked"


@pytest.mark.both_databases
def test_device_revoke_revokes_the_current_certificate(env):
    old, key = enroll(env.client, "NPPDEV1")
    current, _ = enroll(env.client, "NPPDEV1")  # renew policy: the first is superseded
    other, _ = enroll(env.client, "NPPDEV2")
    with env.app.app_context():
        (device,) = [d for d in state().store.find_devices() if d.device_key == "NPPDEV1"]
    assert device.current_serial == serial(current)
    result = cli(env, "device", "revoke", str(device.id))
    assert result.exit_code == 0, result.output
    assert result.output == f"revoked {serial(current)} (cessationOfOperation); CRL re-signed\n"
    record = record_of(env, serial(current))
    assert (record.status, record.revocation_reason) == ("revoked", "cessationOfOperation")
    assert record_of(env, serial(old)).status == "superseded"
    assert record_of(env, serial(other)).status == "valid"
    assert [e.serial_number for e in get_crl(env.client)] == [current.serial_number]

    result = cli(env, "device", "revoke", str(device.id), "--reason", "keyCompromise")
    assert result.exit_code == 1 and "is revoked already" in result.output
    result = cli(env, "device", "revoke", "9999")
    assert result.exit_code == 1 and "no device number 9999" in result.output


def test_device_revoke_takes_a_reason(env):
    cert, _ = enroll(env.client, "NPPSTOLEN")
    with env.app.app_context():
        (device,) = state().store.find_devices(search="NPPSTOLEN")
    result = cli(env, "device", "revoke", str(device.id), "--reason", "keyCompromise")
    assert result.exit_code == 0, result.output
    assert record_of(env, serial(cert)).revocation_reason == "keyCompromise"


# --- the CRL -------------------------------------------------------------------------------------


def test_crl_is_signed_by_the_ca_and_well_formed(build, ca, pki_dir):
    env = build(ca={"crl_lifetime_hours": 6})
    _, ca_cert = ca
    good, _ = enroll(env.client, "NPPGOOD")
    bad, _ = enroll(env.client, "NPPBAD")
    revoke_cli(env, serial(bad), "keyCompromise")
    crl = get_crl(env.client)
    assert crl.is_signature_valid(ca_cert.public_key())
    assert crl.issuer == ca_cert.subject
    assert crl.next_update_utc - crl.last_update_utc == timedelta(hours=6)
    assert near_now(crl.last_update_utc)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.get_revoked_certificate_by_serial_number(good.serial_number) is None
    assert crl.get_revoked_certificate_by_serial_number(bad.serial_number) is not None
    # and openssl agrees: the CRL verifies against the CA certificate
    result = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-noout", "-CAfile", str(pki_dir / "ca.pem")], input=crl.public_bytes(serialization.Encoding.DER), capture_output=True
    )
    assert result.returncode == 0 and b"verify OK" in result.stderr + result.stdout, result.stderr


@pytest.mark.both_databases
def test_crl_number_grows_by_one_per_revocation(env):
    certs = [enroll(env.client, f"NPPN{i}")[0] for i in range(3)]
    first = crl_number(get_crl(env.client))
    for i, cert in enumerate(certs, start=1):
        revoke_cli(env, serial(cert), "keyCompromise")
        crl = get_crl(env.client)
        assert crl_number(crl) == first + i
        assert sorted(e.serial_number for e in crl) == sorted(c.serial_number for c in certs[:i])


def test_crl_pem_and_der_are_the_same_crl(env):
    cert, _ = enroll(env.client)
    revoke_cli(env, serial(cert), "keyCompromise")
    der_body = env.client.get("/crl").get_data()
    response = env.client.get("/crl.pem")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-pem-file"
    text = response.get_data()
    assert text.startswith(b"-----BEGIN X509 CRL-----\n") and text.endswith(b"-----END X509 CRL-----\n")
    assert all(len(line) <= 64 for line in text.splitlines())
    assert x509.load_pem_x509_crl(text).public_bytes(serialization.Encoding.DER) == der_body


def test_crl_is_served_from_the_cache_between_revocations(env):
    """Without a revocation, every request gets the same signed CRL: nothing is re-signed per request."""
    enroll(env.client)
    bodies = [env.client.get("/crl").get_data() for _ in range(5)] + [env.client.get("/crl.pem").get_data()]
    assert len(set(bodies[:5])) == 1  # ECDSA signatures differ each time: equal bytes mean one signing
    assert x509.load_pem_x509_crl(bodies[5]).public_bytes(serialization.Encoding.DER) == bodies[0]
    assert len(crl_rows(env)) == 1
    with env.app.app_context():
        assert state().crl.current().der is state().crl.current().der  # the cached object itself


@pytest.mark.both_databases
def test_a_revocation_in_another_process_reaches_this_workers_next_request(env):
    """The cross-worker guarantee: a second app on the same database revokes; the first serves the new CRL at once."""
    cert, _ = enroll(env.client)
    before = get_crl(env.client)
    assert list(before) == []

    other = create_app(env.config)  # another gunicorn worker, or the CLI
    with other.app_context():
        revoke(serial(cert), "keyCompromise", "test:other-worker")

    after = get_crl(env.client)
    assert crl_number(after) == crl_number(before) + 1
    assert [e.serial_number for e in after] == [cert.serial_number]
    assert env.client.get("/crl").get_data() == other.test_client().get("/crl").get_data()
    # and a revocation through the CLI (a process of its own) likewise
    second, _ = enroll(env.client, "NPPCLI")
    revoke_cli(env, serial(second), "keyCompromise")
    assert {e.serial_number for e in get_crl(other.test_client())} == {cert.serial_number, second.serial_number}
    assert {e.serial_number for e in get_crl(env.client)} == {cert.serial_number, second.serial_number}


def age_stored_crl(env: SimpleNamespace, hours: float, lifetime_hours: int = 24) -> None:
    """Make the stored CRL look ``hours`` old: the state of the database after that time has passed."""
    this_update = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=hours)
    with sqlite3.connect(env.db) as db:
        db.execute(
            "UPDATE crls SET this_update = ?, next_update = ? WHERE number = (SELECT max(number) FROM crls)",
            (this_update.isoformat(sep=" "), (this_update + timedelta(hours=lifetime_hours)).isoformat(sep=" ")),
        )


@pytest.mark.parametrize("age_hours, resigned", [(11, False), (13, True), (30, True)], ids=["before half-life", "past half-life", "expired"])
def test_a_worker_resigns_a_stored_crl_past_half_life(env, age_hours, resigned):
    first = get_crl(env.client)
    age_stored_crl(env, age_hours)
    fresh_worker = create_app(env.config).test_client()
    crl = get_crl(fresh_worker)
    if not resigned:
        assert crl_number(crl) == crl_number(first)
        assert len(crl_rows(env)) == 1
        return
    assert crl_number(crl) == crl_number(first) + 1
    assert near_now(crl.last_update_utc) and crl.next_update_utc - crl.last_update_utc == timedelta(hours=24)
    assert get_crl(env.client).public_bytes(serialization.Encoding.DER) == crl.public_bytes(serialization.Encoding.DER)


def test_the_same_worker_resigns_when_its_clock_passes_half_life(env, monkeypatch):
    first = get_crl(env.client)
    later = datetime.now(timezone.utc) + timedelta(hours=12, minutes=1)

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return later if tz else later.replace(tzinfo=None)

    monkeypatch.setattr(revocation_module, "datetime", Later)
    crl = get_crl(env.client)
    assert crl_number(crl) == crl_number(first) + 1
    assert abs((crl.last_update_utc - later).total_seconds()) < 1
    assert crl_number(get_crl(env.client)) == crl_number(first) + 1  # and cached again from there


def test_est_crl_resigns_now(env):
    first = crl_number(get_crl(env.client))
    result = cli(env, "crl")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"CRL {first + 1} valid until ")
    assert crl_number(get_crl(env.client)) == first + 1


# --- a revocation whose CRL cannot be re-signed at once -------------------------------------------


class UnpluggedToken(Signer):
    """The CA's signer with its token pulled out: every signature fails as the PKCS#11 signer's do then
    (tests/test_hsm.py pulls a real SoftHSM token)."""

    def __init__(self, public_key) -> None:
        self.public_key = public_key

    def _away(self, *args):
        raise KeyUnavailable("token 'unplugged'", "CKR_DEVICE_REMOVED")

    sign_certificate = sign_crl = sign_ocsp = sign = _away


@contextmanager
def token_unplugged(app):
    with app.app_context():
        authority = state().authority
    plugged = authority.signer
    authority._signer = UnpluggedToken(plugged.public_key)
    try:
        yield
    finally:
        authority._signer = plugged


def unpublished_serials(env: SimpleNamespace) -> list[str]:
    with env.app.app_context():
        with state().store.engine.connect() as conn:
            return list(conn.execute(sa.select(unpublished_revocations.c.serial)).scalars())


@pytest.mark.both_databases
def test_a_revocation_the_ca_cannot_sign_a_crl_for_stands_and_the_next_request_signs_it(env):
    cert, _ = enroll(env.client, "NPPSTALE")
    before = get_crl(env.client)
    with token_unplugged(env.app):
        with env.app.app_context():
            revoked = revoke(serial(cert), "keyCompromise", "test:admin")  # no error: the revocation is committed
            assert crl_not_renewed().startswith("the CRL of ca could not be re-signed (see the log): it is marked stale, /readyz fails")
        assert revoked.status == "revoked" and record_of(env, serial(cert)).status == "revoked"
        assert unpublished_serials(env) == [serial(cert)]
        ready = env.client.get("/readyz")
        assert ready.status_code == 503
        assert re.search(r"; crl is stale: it lacks revocations made since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC and could not be re-signed", ready.get_data(as_text=True))
        held = get_crl(env.client)  # the CRL held, as with the database down: better than none for FreeRADIUS
        assert crl_number(held) == crl_number(before) and list(held) == []

    # The key back: the next request re-signs, though the CRL held is far from half its lifetime.
    after = get_crl(env.client)
    assert crl_number(after) == crl_number(before) + 1 and [e.serial_number for e in after] == [cert.serial_number]
    assert unpublished_serials(env) == []
    assert env.client.get("/readyz").get_data(as_text=True) == "ready\n"
    with env.app.app_context():
        assert crl_not_renewed() is None


@pytest.mark.both_databases
def test_a_revocation_whose_process_died_before_signing_is_published_by_any_worker(env):
    """The revocation's own transaction, then nothing (the process killed): another worker's readiness probe signs
    the CRL, and this worker, its CRL cached, serves that one at its next request."""
    cert, _ = enroll(env.client, "NPPKILLED")
    before = get_crl(env.client)
    with create_app(env.config).app_context():
        state().store.revoke(serial(cert), "keyCompromise")  # what revoke() commits before it signs
    assert unpublished_serials(env) == [serial(cert)]

    probe = create_app(env.config).test_client().get("/readyz")  # a third worker, as HAProxy probes every host
    assert probe.get_data(as_text=True) == "ready\n"
    assert unpublished_serials(env) == []
    after = get_crl(env.client)
    assert crl_number(after) == crl_number(before) + 1 and [e.serial_number for e in after] == [cert.serial_number]


@pytest.mark.both_databases
def test_a_revocation_committed_while_a_crl_is_signed_keeps_its_mark(env):
    """The mark goes only with a stored CRL that lists it: a revocation committed after the list was read stays marked."""
    early, _ = enroll(env.client, "NPPEARLY")
    late, _ = enroll(env.client, "NPPLATE")
    with env.app.app_context():
        store, authority = state().store, state().authority
        store.revoke(serial(early), "keyCompromise")

        def build(number: int):
            signed = build_crl(authority, store.revoked_certificates(), number, datetime.now(timezone.utc), timedelta(hours=24))
            store.revoke(serial(late), "keyCompromise")  # after the revoked list was read, before the CRL is stored
            return signed

        stored = store.save_crl(build, authority.issuer_id, True)
    assert [e.serial_number for e in x509.load_der_x509_crl(stored.der)] == [early.serial_number]
    assert unpublished_serials(env) == [serial(late)]
    assert {e.serial_number for e in get_crl(env.client)} == {early.serial_number, late.serial_number}
    assert unpublished_serials(env) == []


def test_deleting_a_device_marks_its_revoked_certificates(env):
    cert, _ = enroll(env.client, "NPPGONE")
    with create_app(env.config).app_context():
        (device,) = state().store.find_devices(search="NPPGONE")
        state().store.delete_device(device.id, revoke_reason="cessationOfOperation")  # the transaction alone, no re-sign
    assert unpublished_serials(env) == [serial(cert)]
    assert [e.serial_number for e in get_crl(env.client)] == [cert.serial_number]


@pytest.mark.both_databases
def test_crl_leaves_out_superseded_certificates(env):
    old, _ = enroll(env.client, "NPPSUP")
    new, _ = enroll(env.client, "NPPSUP")
    assert record_of(env, serial(old)).status == "superseded"
    assert list(get_crl(env.client)) == []


# --- CRL distribution point and OCSP address in issued certificates ------------------------------


def test_certificates_point_at_crl_and_ocsp_when_configured(build):
    env = build(ca={"crl_url": "http://est.hospital.example/crl", "ocsp_url": "http://est.hospital.example/ocsp"})
    cert, _ = enroll(env.client)
    (point,) = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert point.full_name == [x509.UniformResourceIdentifier("http://est.hospital.example/crl")]
    (access,) = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert access.access_method == x509.oid.AuthorityInformationAccessOID.OCSP
    assert access.access_location == x509.UniformResourceIdentifier("http://est.hospital.example/ocsp")


def test_certificates_carry_no_pointers_by_default(env):
    cert, _ = enroll(env.client)
    for extension in (x509.CRLDistributionPoints, x509.AuthorityInformationAccess):
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(extension)


def test_only_the_configured_pointer_is_added(build):
    env = build(ca={"crl_url": "https://est.hospital.example:8445/crl"})
    cert, _ = enroll(env.client)
    assert cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)


# --- OCSP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512], ids=lambda a: a.name)
def test_ocsp_good_signed_by_the_ca(env, ca, algorithm):
    _, ca_cert = ca
    cert, _ = enroll(env.client)
    response = ocsp_post(env.client, ocsp_request(cert, ca_cert, algorithm))
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert response.serial_number == cert.serial_number
    assert isinstance(response.hash_algorithm, algorithm)
    assert (response.issuer_name_hash, response.issuer_key_hash) == (
        ocsp.load_der_ocsp_request(ocsp_request(cert, ca_cert, algorithm)).issuer_name_hash,
        ocsp.load_der_ocsp_request(ocsp_request(cert, ca_cert, algorithm)).issuer_key_hash,
    )
    assert response.responder_key_hash == key_hash(ca_cert.public_key()) and response.responder_name is None
    verify_signature(ca_cert.public_key(), response.signature, response.tbs_response_bytes, response.signature_hash_algorithm)
    assert near_now(response.this_update_utc) and near_now(response.produced_at_utc)
    assert response.next_update_utc - response.this_update_utc == timedelta(hours=1)


def test_ca_signed_ocsp_response_verifies_for_openssl_relying_parties(env, pki_dir, tmp_path):
    """What FreeRADIUS does: the request, the response and the trust store; nothing more."""
    cert, _ = enroll(env.client)
    body = ocsp_request(cert, x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes()), nonce=secrets.token_bytes(16))
    (tmp_path / "req.der").write_bytes(body)
    (tmp_path / "resp.der").write_bytes(env.client.post("/ocsp", data=body, headers={"Content-Type": OCSP_REQUEST}).get_data())
    result = subprocess.run(
        ["openssl", "ocsp", "-reqin", tmp_path / "req.der", "-respin", tmp_path / "resp.der", "-CAfile", pki_dir / "ca.pem"],
        capture_output=True,
    )
    assert result.returncode == 0 and b"Response verify OK" in result.stderr, result.stderr


@pytest.mark.parametrize("reason", sorted(REASONS))
@pytest.mark.both_databases
def test_ocsp_revoked_with_time_and_reason(env, ca, reason):
    _, ca_cert = ca
    cert, _ = enroll(env.client)
    revoke_cli(env, serial(cert), reason)
    record = record_of(env, serial(cert))
    response = ocsp_post(env.client, ocsp_request(cert, ca_cert))
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert abs((response.revocation_time_utc - record.revoked_at.replace(tzinfo=timezone.utc)).total_seconds()) < 1
    assert response.revocation_reason == REASONS[reason]
    verify_signature(ca_cert.public_key(), response.signature, response.tbs_response_bytes, response.signature_hash_algorithm)


def test_ocsp_revocation_is_seen_by_the_next_request(env, ca):
    _, ca_cert = ca
    cert, _ = enroll(env.client)
    body = ocsp_request(cert, ca_cert)
    assert ocsp_post(env.client, body).certificate_status == ocsp.OCSPCertStatus.GOOD
    revoke_cli(env, serial(cert), "keyCompromise")  # another process
    assert ocsp_post(env.client, body).certificate_status == ocsp.OCSPCertStatus.REVOKED


@pytest.mark.both_databases
def test_ocsp_unknown_serial(env, ca):
    _, ca_cert = ca
    enroll(env.client)
    body = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(
            ocsp.load_der_ocsp_request(ocsp_request(ca_cert, ca_cert)).issuer_name_hash,
            key_hash(ca_cert.public_key()),
            x509.random_serial_number(),
            hashes.SHA1(),
        )
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    response = ocsp_post(env.client, body)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


def test_ocsp_unauthorized_for_another_issuer(env):
    """A known serial asked about under another CA's name and key hashes: not ours to vouch for (RFC 6960 2.3)."""
    cert, _ = enroll(env.client)
    _, foreign = create_root_ca("Some other hospital CA")
    response = ocsp_post(env.client, ocsp_request(cert, foreign))
    assert response.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


@pytest.mark.both_databases
def test_ocsp_superseded_certificates_stay_good(env, ca):
    """Re-enrollment supersedes, it does not revoke: the old certificate is still good until revoked or expired."""
    _, ca_cert = ca
    old, _ = enroll(env.client, "NPPSUP")
    enroll(env.client, "NPPSUP")
    assert ocsp_post(env.client, ocsp_request(old, ca_cert)).certificate_status == ocsp.OCSPCertStatus.GOOD


def test_ocsp_nonce_is_echoed(env, ca):
    _, ca_cert = ca
    cert, _ = enroll(env.client)
    nonce = secrets.token_bytes(16)
    response = ocsp_post(env.client, ocsp_request(cert, ca_cert, nonce=nonce))
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    without = ocsp_post(env.client, ocsp_request(cert, ca_cert))
    with pytest.raises(x509.ExtensionNotFound):
        without.extensions.get_extension_for_class(x509.OCSPNonce)


def test_ocsp_get_answers_like_post(env, ca):
    _, ca_cert = ca
    good, _ = enroll(env.client, "NPPGOOD")
    bad, _ = enroll(env.client, "NPPBAD")
    revoke_cli(env, serial(bad), "keyCompromise")
    for cert, status in ((good, ocsp.OCSPCertStatus.GOOD), (bad, ocsp.OCSPCertStatus.REVOKED)):
        body = ocsp_request(cert, ca_cert)
        assert ocsp_get(env.client, body).certificate_status == status
        # unescaped base64 (with any '/' and '+') is taken too, as some clients send it
        assert ocsp_get(env.client, base64.b64encode(body).decode()).certificate_status == status


def test_ocsp_delegated_responder_signs_and_includes_its_certificate(build, ca, pki_dir, tmp_path):
    ca_key, ca_cert = ca
    responder, responder_key = mint_responder(ca_key, ca_cert)
    cert_file, key_file = write_pem_files(tmp_path, "ocsp-responder", responder, responder_key)
    env = build(ca={"ocsp_responder_cert_file": str(cert_file), "ocsp_responder_key_file": str(key_file)})
    cert, _ = enroll(env.client)
    body = ocsp_request(cert, ca_cert, nonce=b"0123456789abcdef")
    response = ocsp_post(env.client, body)
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert response.certificates == [responder]
    assert response.responder_key_hash == key_hash(responder_key.public_key())
    verify_signature(responder_key.public_key(), response.signature, response.tbs_response_bytes, response.signature_hash_algorithm)
    with pytest.raises(InvalidSignature):
        verify_signature(ca_cert.public_key(), response.signature, response.tbs_response_bytes, response.signature_hash_algorithm)
    # openssl, as a relying party, accepts the delegation (EKU OCSPSigning, issued by the CA)
    (tmp_path / "req.der").write_bytes(body)
    (tmp_path / "resp.der").write_bytes(response.public_bytes(serialization.Encoding.DER))
    for args in (["-reqin", tmp_path / "req.der"], ["-issuer", pki_dir / "ca.pem", "-serial", f"0x{serial(cert)}", "-no_nonce"]):
        result = subprocess.run(
            ["openssl", "ocsp", "-respin", tmp_path / "resp.der", "-CAfile", pki_dir / "ca.pem", *args], capture_output=True
        )
        assert result.returncode == 0 and b"Response verify OK" in result.stderr, result.stdout + result.stderr
    assert f"0x{serial(cert)}: good" in result.stdout.decode().lower(), result.stdout


def responder_config(make_config, tmp_path, cert: x509.Certificate, key):
    """create_app with ``cert`` and ``key`` as the delegated OCSP responder."""
    cert_file, key_file = write_pem_files(tmp_path, "ocsp-responder", cert, key)
    return create_app(make_config(ca={"ocsp_responder_cert_file": str(cert_file), "ocsp_responder_key_file": str(key_file)}))


@pytest.mark.parametrize(
    "eku",
    [(ExtendedKeyUsageOID.CLIENT_AUTH,), (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH), None],
    ids=["clientAuth only", "serverAuth and clientAuth", "no EKU extension"],
)
def test_a_responder_certificate_without_ocsp_signing_stops_startup(make_config, ca, tmp_path, eku):
    ca_key, ca_cert = ca
    cert, key = mint_responder(ca_key, ca_cert, eku=eku)
    with pytest.raises(ConfigError, match="ca.ocsp_responder_cert_file .*: must be issued by the CA with EKU OCSPSigning"):
        responder_config(make_config, tmp_path, cert, key)


@pytest.mark.parametrize("issuer", ["another CA", "another CA of this CA's name"])
def test_a_responder_certificate_from_another_ca_stops_startup(make_config, ca, tmp_path, issuer):
    name = "Some other hospital CA" if issuer == "another CA" else ca[1].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    other_key, other_cert = create_root_ca(name)
    cert, key = mint_responder(other_key, other_cert)
    with pytest.raises(ConfigError, match="must be issued by the CA"):
        responder_config(make_config, tmp_path, cert, key)


def test_est_admin_reports_a_bad_responder_in_one_line(make_config, ca, tmp_path):
    ca_key, ca_cert = ca
    cert, key = mint_responder(ca_key, ca_cert, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    cert_file, key_file = write_pem_files(tmp_path, "ocsp-responder", cert, key)
    config = make_config(ca={"ocsp_responder_cert_file": str(cert_file), "ocsp_responder_key_file": str(key_file)})
    result = run_cli("crl", config=config)
    assert result.exit_code == 1
    assert "must be issued by the CA with EKU OCSPSigning" in result.output and "Traceback" not in result.output


def test_a_responder_key_that_does_not_match_stops_startup(make_config, ca, tmp_path):
    ca_key, ca_cert = ca
    cert, _ = mint_responder(ca_key, ca_cert)
    with pytest.raises(ConfigError, match="ocsp_responder_key_file"):
        responder_config(make_config, tmp_path, cert, ec.generate_private_key(ec.SECP256R1()))


def _truncated(env, ca) -> bytes:
    cert, _ = enroll(env.client)
    return ocsp_request(cert, ca[1])[:-7]


MALFORMED_POSTS = {
    "garbage": lambda env, ca: b"this is not an OCSP request",
    "empty": lambda env, ca: b"",
    "truncated": _truncated,
    "a certificate instead": lambda env, ca: der(ca[1]),
    "DER NULL": lambda env, ca: b"\x05\x00",
    "huge length": lambda env, ca: b"\x30\x84\xff\xff\xff\xff",
    "base64 text": lambda env, ca: base64.b64encode(b"\x30\x03\x02\x01\x00"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED_POSTS))
def test_malformed_ocsp_post_gets_malformed_request(env, ca, kind):
    response = ocsp_post(env.client, MALFORMED_POSTS[kind](env, ca))
    assert response.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert_still_answers(env, ca)


@pytest.mark.parametrize(
    "encoded",
    ["!!!not-base64!!!", "abc", "%ZZ", "AAAA", base64.b64encode(b"garbage").decode(), "a/b/c", "=" * 8],
    ids=["not base64", "bad padding", "bad escape", "zeros", "base64 garbage", "slashes", "padding only"],
)
def test_malformed_ocsp_get_gets_malformed_request(env, ca, encoded):
    response = env.client.get(f"/ocsp/{encoded}")
    assert response.status_code == 200, response.get_data()
    assert response.headers["Content-Type"] == OCSP_RESPONSE
    assert ocsp.load_der_ocsp_response(response.get_data()).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert_still_answers(env, ca)


def test_ocsp_request_for_two_certificates_is_malformed_not_a_fault(env, pki_dir, tmp_path):
    """openssl ocsp with two -cert options sends one request for both; the responder answers malformedRequest."""
    a, _ = enroll(env.client, "NPPA")
    b, _ = enroll(env.client, "NPPB")
    paths = [write_pem_files(tmp_path, n, c, ec.generate_private_key(ec.SECP256R1()))[0] for n, c in (("a", a), ("b", b))]
    request = subprocess.run(
        ["openssl", "ocsp", "-issuer", pki_dir / "ca.pem", "-cert", paths[0], "-cert", paths[1], "-reqout", "/dev/stdout", "-no_nonce"],
        capture_output=True, check=True,
    ).stdout
    response = ocsp_post(env.client, request)
    assert response.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def assert_still_answers(env, ca) -> None:
    cert, _ = enroll(env.client, f"NPPALIVE{secrets.token_hex(2)}")
    assert ocsp_post(env.client, ocsp_request(cert, ca[1])).certificate_status == ocsp.OCSPCertStatus.GOOD


# --- a revoked certificate as a credential -------------------------------------------------------


def refused(response, status: int, phrase: str) -> None:
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert phrase in text, text
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Basic realm="EST"'


def with_cert(client, path: str, csr: x509.CertificateSigningRequest, cert: x509.Certificate):
    return client.post(
        path, data=der(csr), headers={"Content-Type": "application/pkcs10"}, environ_base={"SSL_CLIENT_CERT": pem(cert).decode()}
    )


def test_revoked_ra_certificate_is_refused_from_the_next_request(build, tmp_path):
    """The gateway's RA certificate, issued by this CA through EST, then revoked: its next enrollment is a 401."""
    env = build(labels={"pumps": {"auth": ["cert"]}})
    ra_cert, ra_key = enroll(env.client, "IQE-Gateway")
    ra_file, _ = write_pem_files(tmp_path, "ra", ra_cert, ra_key)
    result = cli(env, "ra", "add", str(ra_file), "--label", "pumps")
    assert result.exit_code == 0, result.output
    ok = with_cert(env.client, "/.well-known/est/pumps/simpleenroll", make_csr("NPPRA01"), ra_cert)
    assert ok.status_code == 200, ok.get_data(as_text=True)

    revoke_cli(env, serial(ra_cert), "keyCompromise")
    response = with_cert(env.client, "/.well-known/est/pumps/simpleenroll", make_csr("NPPRA02"), ra_cert)
    refused(response, 401, "is revoked")
    response = with_cert(env.client, "/.well-known/est/pumps/serverkeygen", make_csr("NPPRA03"), ra_cert)
    refused(response, 401, "is revoked")
    with env.app.app_context():
        assert not state().store.find_devices(search="NPPRA02") and not state().store.find_devices(search="NPPRA03")


@pytest.mark.both_databases
def test_revoked_device_certificate_cannot_reenroll(env):
    cert, key = enroll(env.client, "NPPSTOLEN")
    renewed = with_cert(env.client, REENROLL, make_csr("NPPSTOLEN", key), cert)
    assert renewed.status_code == 200, renewed.get_data(as_text=True)
    (current,) = certs_from(renewed)

    revoke_cli(env, serial(current), "keyCompromise")
    response = with_cert(env.client, REENROLL, make_csr("NPPSTOLEN", key), current)
    refused(response, 401, "is revoked")
    with env.app.app_context():
        (device,) = state().store.find_devices(search="NPPSTOLEN")
    assert device.current_serial == serial(current)  # nothing issued


@pytest.mark.both_databases
def test_revocation_by_another_worker_is_refused_by_this_one(env):
    """The credential check reads the store each request: no worker keeps trusting a revoked certificate."""
    cert, key = enroll(env.client, "NPPXW")
    other = create_app(env.config)
    with other.app_context():
        revoke(serial(cert), "keyCompromise", "test:other-worker")
    refused(with_cert(env.client, REENROLL, make_csr("NPPXW", key), cert), 401, "is revoked")


# --- availability of the revocation endpoints ----------------------------------------------------


def test_revocation_endpoints_are_not_rate_limited_like_est(build, ca):
    env = build(rate_limit={"enabled": True, "limit": "3 per minute"})
    cert, _ = enroll(env.client)  # one of the three EST requests
    body = ocsp_request(cert, ca[1])
    statuses = [env.client.get("/crl").status_code for _ in range(5)] + [env.client.get("/crl.pem").status_code for _ in range(5)]
    statuses += [env.client.post("/ocsp", data=body, headers={"Content-Type": OCSP_REQUEST}).status_code for _ in range(10)]
    assert statuses == [200] * 20
