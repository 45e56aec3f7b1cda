"""Harness: the OCSP responder, as POST body (below HTTP) and as the GET path form (test client).

Every input goes to the responder as a request body; ASCII inputs (the path
form is text: base64, perhaps %-escaped) also go as ``GET /ocsp/<input>``,
which costs a whole test-client request and would otherwise halve the rate.
The endpoint needs no credentials and is exempt from rate limits, so every
byte sequence must get a signed answer or an OCSP ``malformedRequest`` (a
well-formed OCSPResponse), never an exception or a 5xx.
"""

from __future__ import annotations

from . import harness  # noqa: I001  (first: instruments est_app)

import base64
import urllib.parse

from cryptography.x509 import ocsp

from . import deployment

DEPLOYMENT = deployment.build()
RESPONDER = DEPLOYMENT.state.ocsp
CLIENT = DEPLOYMENT.app.test_client()
# unauthorized: a well-formed request about an issuer this server does not run (RFC 6960 2.3)
ANSWERS = (ocsp.OCSPResponseStatus.SUCCESSFUL, ocsp.OCSPResponseStatus.MALFORMED_REQUEST, ocsp.OCSPResponseStatus.UNAUTHORIZED)


def check_answer(der: bytes) -> None:
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status in ANSWERS, response.response_status


def test_one_input(data: bytes) -> None:
    check_answer(RESPONDER.respond(data, deployment.clock()))
    if not data.isascii():
        return
    # The GET form: the path segment is whatever text arrives (a server has already %-decoded it).
    path = urllib.parse.quote(data.decode("latin-1"), safe="")
    response = harness.no_server_error(CLIENT.get(f"/ocsp/{path}"))
    if response.status_code == 200:
        check_answer(response.get_data())


def seeds() -> list[bytes]:
    found = []
    for request in deployment.ocsp_requests(DEPLOYMENT):
        text = base64.b64encode(request)
        found += [request, text, urllib.parse.quote(text).encode(), base64.urlsafe_b64encode(request)]
    return found


if __name__ == "__main__":
    harness.run("ocsp", test_one_input, seeds())
