"""Harness: the ``Authorization`` header and a trusted proxy's client-certificate header.

The first byte picks where the rest goes: the Basic header of a password
label, of a label taking both methods or of a certificate-only label, or the
proxy's certificate header (from the trusted proxy, or from an untrusted peer
that must be ignored; as the header's text, or as DER the harness wraps in
PEM so that mutations land in the X.509 structure) to a certificate-only
label or to simplereenroll. The body is empty, so a request that
authenticates ends in a 400 without issuing anything; where no credentials
in that header can be enough, it never does.
"""

from __future__ import annotations

from . import harness  # noqa: I001  (first: instruments est_app)

import base64

from . import deployment

DEPLOYMENT = deployment.build()
CLIENT = DEPLOYMENT.app.test_client()
HEADER = DEPLOYMENT.state.settings.client_cert_header
EST = "/.well-known/est"
DER_AS_HEADER = "DER"  # the input is a certificate's DER, sent as the proxy sends PEM: mutations hit X.509, not base64
PAST_AUTH = (400, 401, 403, 429)  # 400: authenticated, then the empty body is refused; 429: backing off
# (path, header the value goes in, peer address, statuses allowed)
TARGETS = (
    (f"{EST}/simpleenroll", "Authorization", "127.0.0.1", PAST_AUTH),
    (f"{EST}/pumps/simpleenroll", "Authorization", "127.0.0.1", PAST_AUTH),
    (f"{EST}/ra/simpleenroll", HEADER, deployment.PROXY, PAST_AUTH),
    (f"{EST}/simplereenroll", HEADER, deployment.PROXY, PAST_AUTH),
    (f"{EST}/pumps/simpleenroll", HEADER, "127.0.0.2", (401, 429)),  # an untrusted peer's certificate header is ignored
    (f"{EST}/ra/simpleenroll", "Authorization", "127.0.0.1", PAST_AUTH),  # refuses passwords: a 400 only for the header itself
    (f"{EST}/ra/simpleenroll", DER_AS_HEADER, deployment.PROXY, PAST_AUTH),
    (f"{EST}/simplereenroll", DER_AS_HEADER, deployment.PROXY, PAST_AUTH),
)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    path, header, peer, allowed = TARGETS[data[0] % len(TARGETS)]
    if header == DER_AS_HEADER:
        header, value = HEADER, deployment.proxy_header_of_der(data[1:]).decode()
    else:
        value = deployment.header_text(data[1:])
    response = CLIENT.post(
        path,
        headers={"Content-Type": "application/pkcs10", header: value},
        environ_base={"REMOTE_ADDR": peer},
    )
    harness.no_server_error(response)
    assert response.status_code in allowed, (response.status_code, response.get_data())
    if path.startswith(f"{EST}/ra/") and header == "Authorization" and response.status_code == 400:
        assert response.get_data().startswith(b"Authorization header is not"), response.get_data()  # refused, not let in


def seeds() -> list[bytes]:
    good = base64.b64encode(f"{deployment.USER}:{deployment.PASSWORD}".encode())
    basic = [b"Basic " + good, b"basic " + good, b"Basic " + base64.b64encode(b"gateway:"), b"Basic " + base64.b64encode(b":x:y"),
             b"Basic", b"Bearer abc", b'Digest username="gateway", realm="EST"']
    certificates = [deployment.proxy_header(DEPLOYMENT.ra_certificate), deployment.proxy_header(DEPLOYMENT.device_certificate),
                    deployment.pem(DEPLOYMENT.ra_certificate).replace(b"\n", b" "), deployment.der(DEPLOYMENT.device_certificate)]
    ders = [deployment.der(DEPLOYMENT.ra_certificate), deployment.der(DEPLOYMENT.device_certificate)]
    return (
        [bytes([i]) + value for i in (0, 1, 5) for value in basic]
        + [bytes([i]) + value for i in (2, 3, 4) for value in certificates]
        + [bytes([i]) + value for i in (6, 7) for value in ders]
    )


if __name__ == "__main__":
    harness.run("auth", test_one_input, seeds())
