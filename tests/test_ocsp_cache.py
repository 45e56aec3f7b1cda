"""The OCSP responder's cache of signed answers: reuse, freshness, the bound, and revocations by other processes.

Apps are real (``make_app``: SQLite, or PostgreSQL where marked), answers are checked
with cryptography against the CA certificate, and revocations come from a second app
instance on the same database and from a real ``est-admin`` process.
"""

from __future__ import annotations

import secrets
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from est_app import create_app
from est_app.ca.ocsp import OCSPResponder
from est_app.revocation import revoke
from est_app.state import state

from .server import BIN
from .test_revocation import enroll, key_hash, ocsp_request, serial, verify_signature

OCSP_HEADERS = {"Content-Type": "application/ocsp-request"}


def post(client, body: bytes) -> bytes:
    response = client.post("/ocsp", data=body, headers=OCSP_HEADERS)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/ocsp-response"
    return response.get_data()


def verified(answer: bytes, ca_cert: x509.Certificate) -> ocsp.OCSPResponse:
    """The parsed answer, its signature checked against the CA (the responder here is the CA itself)."""
    response = ocsp.load_der_ocsp_response(answer)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.responder_key_hash == key_hash(ca_cert.public_key())
    verify_signature(ca_cert.public_key(), response.signature, response.tbs_response_bytes, response.signature_hash_algorithm)
    return response


@pytest.fixture
def ca_cert(app) -> x509.Certificate:
    with app.app_context():
        return state().authority.certificate


def responder(app) -> OCSPResponder:
    return app.extensions["est_app"].ocsp


def test_repeated_requests_get_the_same_signed_bytes(app, client, ca_cert):
    cert, _ = enroll(client)
    for algorithm in (hashes.SHA1, hashes.SHA256):  # each CertID its own answer, echoing that CertID
        body = ocsp_request(cert, ca_cert, algorithm)
        first = post(client, body)
        assert [post(client, body) for _ in range(3)] == [first] * 3
        response = verified(first, ca_cert)
        assert response.certificate_status == ocsp.OCSPCertStatus.GOOD and response.serial_number == cert.serial_number
        assert isinstance(response.hash_algorithm, algorithm)
        assert response.next_update_utc - response.this_update_utc == timedelta(hours=1)
    assert responder(app).cached_answers() == 2


@pytest.mark.both_databases
def test_revocation_by_another_app_instance_shows_in_the_next_answer(app, client, ca_cert, make_settings):
    cert, _ = enroll(client)
    body = ocsp_request(cert, ca_cert)
    good = post(client, body)
    assert post(client, body) == good  # served from the cache
    other = create_app(make_settings())  # another worker or host: its own store and responder, the same database
    with other.app_context():
        revoke(serial(cert), "keyCompromise", actor="test")
    response = verified(post(client, body), ca_cert)
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_reason == x509.ReasonFlags.key_compromise
    assert ocsp.load_der_ocsp_response(post(other.test_client(), body)).certificate_status == ocsp.OCSPCertStatus.REVOKED


def test_revocation_by_est_admin_process_shows_in_the_next_answer(app, client, ca_cert, make_config):
    cert, _ = enroll(client)
    body = ocsp_request(cert, ca_cert, hashes.SHA256)
    assert verified(post(client, body), ca_cert).certificate_status == ocsp.OCSPCertStatus.GOOD
    result = subprocess.run(
        [str(BIN / "est-admin"), "--config", str(make_config()), "cert", "revoke", serial(cert), "--reason", "cessationOfOperation"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    response = verified(post(client, body), ca_cert)
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_reason == x509.ReasonFlags.cessation_of_operation


def test_nonce_requests_are_signed_fresh_and_echo_their_nonce(app, client, ca_cert):
    cert, _ = enroll(client)
    post(client, ocsp_request(cert, ca_cert))  # a cached answer exists for this CertID
    cached = responder(app).cached_answers()
    nonces = [secrets.token_bytes(16) for _ in range(2)]
    answers = [post(client, ocsp_request(cert, ca_cert, nonce=nonce)) for nonce in nonces]
    for nonce, answer in zip(nonces, answers):
        response = verified(answer, ca_cert)
        assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert answers[0] != answers[1]
    assert responder(app).cached_answers() == cached


def test_answers_are_signed_again_halfway_to_next_update(app, client, ca_cert):
    cert, _ = enroll(client)
    body = ocsp_request(cert, ca_cert)
    ocsp_responder = responder(app)
    signed_at = datetime.now(timezone.utc).replace(microsecond=0)
    first = ocsp_responder.respond(body, signed_at)
    half = ocsp_responder.validity / 2
    assert ocsp_responder.respond(body, signed_at + half - timedelta(seconds=1)) == first
    renewed = ocsp_responder.respond(body, signed_at + half)
    assert renewed != first
    assert verified(renewed, ca_cert).this_update_utc == signed_at + half
    assert ocsp_responder.respond(body, signed_at + half + timedelta(seconds=1)) == renewed
    # A clock set back before the cached thisUpdate gets a new answer, not one dated in its future.
    earlier = ocsp_responder.respond(body, signed_at)
    assert verified(earlier, ca_cert).this_update_utc == signed_at


def test_the_cache_is_bounded_least_recently_used_first(app, client, ca_cert):
    certs = [enroll(client, f"NPPLRU{i}")[0] for i in range(4)]
    bodies = [ocsp_request(cert, ca_cert) for cert in certs]
    with app.app_context():
        app_state = state()
        small = OCSPResponder(app_state.authorities, app_state.store.certificate_status, cache_entries=3)
    signed_at = datetime.now(timezone.utc).replace(microsecond=0)
    later = signed_at + timedelta(seconds=1)  # an answer signed again says so in its thisUpdate
    first = [small.respond(body, signed_at) for body in bodies[:3]]
    assert small.respond(bodies[0], later) == first[0]  # used again: the most recent now
    small.respond(bodies[3], signed_at)  # pushes out the least recently used: the second
    assert small.cached_answers() == 3
    assert small.respond(bodies[0], later) == first[0]
    resigned = small.respond(bodies[1], later)
    assert verified(resigned, ca_cert).this_update_utc == later and verified(resigned, ca_cert).serial_number == certs[1].serial_number
    assert small.cached_answers() == 3


def test_unknown_serials_are_not_cached(app, client, ca_cert):
    enroll(client)
    probe = ocsp.load_der_ocsp_request(ocsp_request(ca_cert, ca_cert))
    for _ in range(3):
        body = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(probe.issuer_name_hash, probe.issuer_key_hash, x509.random_serial_number(), hashes.SHA1())
            .build()
            .public_bytes(Encoding.DER)
        )
        assert verified(post(client, body), ca_cert).certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    assert responder(app).cached_answers() == 0
