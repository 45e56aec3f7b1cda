"""Every kind of bad input, through the real router: the right status, one actionable
text/plain line, and a good request still succeeds afterwards."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from .conftest import PASSWORD, USER, basic_auth
from .pki import der, ec_key, make_csr, rsa_key

ENROLL = "/.well-known/est/simpleenroll"
GOOD_CSR = base64.b64encode(der(make_csr()))


def _broken_signature() -> bytes:
    body = bytearray(der(make_csr()))
    body[-5] ^= 0x01
    return bytes(body)


def _certificate_der(pki_dir) -> bytes:
    from cryptography import x509

    return der(x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes()))


PKCS10 = {"Content-Type": "application/pkcs10"}

# (id, method, path, headers, body, status, phrase)
CASES = [
    ("no credentials", "POST", ENROLL, PKCS10, GOOD_CSR, 401, "authentication required"),
    ("wrong password", "POST", ENROLL, {**PKCS10, **basic_auth(USER, "wrong password!")}, GOOD_CSR, 401, "not accepted"),
    ("unknown user", "POST", ENROLL, {**PKCS10, **basic_auth("nobody", PASSWORD)}, GOOD_CSR, 401, "not accepted"),
    ("malformed Authorization", "POST", ENROLL, {**PKCS10, "Authorization": "Basic !!!"}, GOOD_CSR, 401, "authentication required"),
    ("wrong content type", "POST", ENROLL, {"Content-Type": "text/plain", **basic_auth()}, GOOD_CSR, 415, "application/pkcs10"),
    ("missing content type", "POST", ENROLL, basic_auth(), GOOD_CSR, 415, "application/pkcs10"),
    ("empty body", "POST", ENROLL, {**PKCS10, **basic_auth()}, b"", 400, "empty body"),
    ("garbage", "POST", ENROLL, {**PKCS10, **basic_auth()}, b"\xff\xfe garbage", 400, "not DER, PEM or base64"),
    ("base64 of text", "POST", ENROLL, {**PKCS10, **basic_auth()}, base64.b64encode(b"hello"), 400, "does not decode to DER"),
    ("truncated DER", "POST", ENROLL, {**PKCS10, **basic_auth()}, der(make_csr())[:40], 400, "not a PKCS#10"),
    ("bad signature", "POST", ENROLL, {**PKCS10, **basic_auth()}, _broken_signature(), 400, "signature does not verify"),
    ("RSA 1024", "POST", ENROLL, {**PKCS10, **basic_auth()}, der(make_csr(key=rsa_key(1024))), 400, "too weak"),
    ("curve P-192", "POST", ENROLL, {**PKCS10, **basic_auth()}, der(make_csr(key=ec_key(ec.SECP192R1()))), 400, "not allowed"),
    ("secp256k1", "POST", ENROLL, {**PKCS10, **basic_auth()}, der(make_csr(key=ec_key(ec.SECP256K1()))), 400, "not allowed"),
    ("no common name", "POST", ENROLL, {**PKCS10, **basic_auth()}, der(make_csr(cn=None)), 400, "commonName"),
    ("body over limit", "POST", ENROLL, {**PKCS10, **basic_auth()}, b"A" * (64 * 1024 + 1), 413, "larger than"),
    ("unknown label", "POST", "/.well-known/est/nosuch/simpleenroll", {**PKCS10, **basic_auth()}, GOOD_CSR, 404, "unknown EST label"),
    ("unknown operation", "GET", "/.well-known/est/nosuch", {}, b"", 404, "Not Found"),
    ("wrong method", "GET", ENROLL, {}, b"", 405, "Method Not Allowed"),
    ("fullcmc", "POST", "/.well-known/est/fullcmc", {}, b"", 501, "not supported"),
]


@pytest.mark.parametrize("method, path, headers, body, status, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_the_server_keeps_answering(client, method, path, headers, body, status, phrase):
    response = client.open(path, method=method, headers=headers, data=body)
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert phrase in text and text.count("\n") == 1
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Basic realm="EST"'
    if status == 405:
        assert "POST" in response.headers["Allow"]
    good = client.post(ENROLL, data=GOOD_CSR, headers={**PKCS10, **basic_auth()})
    assert good.status_code == 200


def test_not_a_csr_but_a_certificate(client, pki_dir):
    response = client.post(ENROLL, data=_certificate_der(pki_dir), headers={**PKCS10, **basic_auth()})
    assert response.status_code == 400
    assert "not a PKCS#10" in response.get_data(as_text=True)


def test_a_fault_is_a_500_with_a_request_id_and_no_trace(make_app, caplog):
    app = make_app()

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom")
    text = response.get_data(as_text=True)
    assert response.status_code == 500
    assert "request id" in text and "secret internals" not in text and "Traceback" not in text
    request_id = text.split("request id ")[1].split(")")[0]
    assert any(request_id in r.getMessage() for r in caplog.records)


def test_rate_limit_answers_429_with_retry_after(make_app):
    app = make_app(rate_limit={"enabled": True, "limit": "3 per minute"})
    client = app.test_client()
    statuses = [client.get("/.well-known/est/cacerts").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    response = client.get("/.well-known/est/cacerts")
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 61  # the window, rounded up
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    ok = app.test_client().get("/.well-known/est/cacerts", environ_base={"REMOTE_ADDR": "127.0.0.2"})
    assert ok.status_code == 200 and "Retry-After" not in ok.headers
