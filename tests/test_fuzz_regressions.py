"""Every input a fuzz harness (tests/fuzz/) ever found failing, replayed through the test client.

The inputs are the committed files in tests/fuzz/findings/<harness>/ (the
harnesses also replay them as seeds). Each case says how the harness sent
it and what the answer must be now: the status and the one line a client
gets. A file without a case here fails the last test, so a finding cannot
be committed without its regression case.
"""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path

import pytest
from cryptography.x509 import ocsp

from .conftest import basic_auth
from .fuzz.deployment import header_text
from .pki import der, make_csr

FINDINGS = Path(__file__).parent / "fuzz" / "findings"
EST = "/.well-known/est"
PROXY = "127.0.0.9"
LABELS = {"ra": {"auth": ["cert"]}}
OCSP_MALFORMED = "OCSP malformedRequest"


def enroll_with_basic(client, data: bytes):
    """csr harness: the body of a simpleenroll with good credentials."""
    return client.post(f"{EST}/simpleenroll", data=data, headers={"Content-Type": "application/pkcs10", **basic_auth()})


def ocsp_post(client, data: bytes):
    return client.post("/ocsp", data=data, headers={"Content-Type": "application/ocsp-request"})


def ocsp_get(client, data: bytes):
    return client.get("/ocsp/" + urllib.parse.quote(base64.b64encode(data).decode(), safe=""))


def authorization_to(path: str):
    """auth harness, Authorization targets: the header (after the selector byte) on an enrollment with a valid CSR."""

    def send(client, data: bytes):
        headers = {"Content-Type": "application/pkcs10", "Authorization": header_text(data[1:])}
        return client.post(path, data=der(make_csr("NPPFUZZ1")), headers=headers)

    return send


def proxy_certificate_to(path: str):
    """auth harness, proxy targets: the value as the trusted proxy's client-certificate header."""

    def send(client, data: bytes):
        headers = {"Content-Type": "application/pkcs10", "X-SSL-Client-Cert": header_text(data[1:])}
        return client.post(path, data=der(make_csr("NPPFUZZ2")), headers=headers, environ_base={"REMOTE_ADDR": PROXY})

    return send


# (finding file, how it is sent, status, phrase in the one-line answer or OCSP_MALFORMED, what failed before the fix)
CASES = [
    ("csr/unsupported-curve", enroll_with_basic, 400, "CSR public key is of an unsupported type",
     "UnsupportedAlgorithm from csr.public_key() escaped load_csr: 500"),
    ("ocsp/negative-serial", ocsp_post, 200, OCSP_MALFORMED,
     "the CertID's negative serial reached the response builder, which cannot encode it: 500 on /ocsp"),
    ("ocsp/negative-serial", ocsp_get, 200, OCSP_MALFORMED, "the same through the GET path form"),
    ("ocsp/issuer-name-hash-shorter-than-digest", ocsp_post, 200, OCSP_MALFORMED,
     "a 19-byte SHA-1 issuer name hash reached the response builder, which refuses it: 500 (found reading the fix, replayed by the harness)"),
    ("auth/basic-non-ascii", authorization_to(f"{EST}/simpleenroll"), 400, "Authorization header is not HTTP Basic credentials",
     "werkzeug's Basic parser raised ValueError on non-ASCII text: 500"),
    ("auth/basic-lenient-parser-on-cert-only-label", authorization_to(f"{EST}/ra/simpleenroll"), 401,
     "authentication required: send a registered RA client certificate",
     "flask-httpauth skipped the '!' and logged the user in while werkzeug saw no credentials: "
     "a certificate was issued on a label that refuses passwords"),
    ("auth/proxy-certificate-bad-subject", proxy_certificate_to(f"{EST}/ra/simpleenroll"), 400,
     "client certificate from the X-SSL-Client-Cert header is not a valid X.509 certificate",
     "the subject failed cryptography's lazy parsing in describe(): 500"),
]


@pytest.fixture
def client(make_app):
    return make_app(labels=LABELS, trusted_proxies=[f"{PROXY}/32"]).test_client()


@pytest.mark.parametrize("finding, send, status, phrase, before", [pytest.param(*case, id=f"{case[0]}-{case[1].__name__}") for case in CASES])
def test_finding_is_answered_as_a_client_error(client, finding, send, status, phrase, before):
    response = send(client, (FINDINGS / finding).read_bytes())
    assert response.status_code == status, response.get_data()
    if phrase == OCSP_MALFORMED:
        assert response.headers["Content-Type"] == "application/ocsp-response"
        assert ocsp.load_der_ocsp_response(response.get_data()).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    else:
        text = response.get_data(as_text=True)
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert text.count("\n") == 1 and phrase in text, text
    # The server still answers, and still enrolls.
    assert enroll_with_basic(client, der(make_csr("NPPAFTER"))).status_code == 200


def test_every_committed_finding_has_a_regression_case():
    committed = {str(path.relative_to(FINDINGS)) for path in FINDINGS.rglob("*") if path.is_file()}
    assert committed == {case[0] for case in CASES}


def test_admin_api_basic_header_werkzeug_cannot_read_is_a_json_400(client):
    """Found by tests/test_properties.py after the admin API stopped going through flask-httpauth:
    `Authorization: Basic \\x80` on /api/v1 was a 500 (werkzeug's parser raised ValueError)."""
    response = client.get("/api/v1/devices", headers={"Authorization": "Basic \x80"})
    assert response.status_code == 400 and response.mimetype == "application/json", response.get_data()
    assert response.get_json()["error"].startswith("Authorization header is not HTTP Basic credentials")
    assert enroll_with_basic(client, der(make_csr("NPPAFTER"))).status_code == 200
