"""Harness: ``POST serverkeygen`` through the test client, with good Basic credentials.

The body is a CSR in any form; the label (default, ``san`` with EC-only key
types, ``pumps`` with DER answers) is chosen by the input's length so the
same bytes always take the same path. A 200 must be a two-part
``multipart/mixed`` whose parts are a PKCS#8 key and a certs-only PKCS#7.
"""

from __future__ import annotations

from . import harness  # noqa: I001  (first: instruments est_app)

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from ..test_protocol import multipart
from . import deployment
from .deployment import body_forms, der, sample_csrs

DEPLOYMENT = deployment.build()
CLIENT = DEPLOYMENT.app.test_client()
PATHS = ("/.well-known/est/serverkeygen", "/.well-known/est/san/serverkeygen", "/.well-known/est/pumps/serverkeygen")
HEADERS = {"Content-Type": "application/pkcs10", **deployment.basic_auth()}


def test_one_input(data: bytes) -> None:
    response = harness.no_server_error(CLIENT.post(PATHS[len(data) % len(PATHS)], data=data, headers=HEADERS))
    assert response.status_code in (200, 400, 409), (response.status_code, response.get_data())
    if response.status_code != 200:
        return
    (key_headers, key), (_, certs) = multipart(response)
    if key_headers.get("Content-Transfer-Encoding") == "base64":
        key, certs = base64.b64decode(key), base64.b64decode(certs)
    serialization.load_der_private_key(key, None)
    assert len(pkcs7.load_der_pkcs7_certificates(certs)) >= 1

def seeds() -> list[bytes]:
    """CSRs in every form, without RSA-2048 ones: each would cost an RSA key generation per mutation kept valid."""
    found = []
    for csr in sample_csrs():
        if not isinstance(csr.public_key(), rsa.RSAPublicKey) or csr.public_key().key_size < 2048:
            found += body_forms(der(csr))
    return found


if __name__ == "__main__":
    harness.run("serverkeygen", test_one_input, seeds())
