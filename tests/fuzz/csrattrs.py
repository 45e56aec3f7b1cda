"""Harness: ``GET csrattrs`` (and every other EST operation's path) with a fuzzed label segment.

The label in the URL is the one thing a client controls here; whatever it
is, the answer is the label's ``CsrAttrs`` (DER, decodable with pyasn1's
RFC 7030 module), a 204, a 404 for an unknown label or a 405.
"""

from __future__ import annotations

from . import harness  # noqa: I001  (first: instruments est_app)

import base64
import urllib.parse

from pyasn1.codec.der import decoder
from pyasn1_modules import rfc7030

from . import deployment

DEPLOYMENT = deployment.build()
CLIENT = DEPLOYMENT.app.test_client()
OPERATIONS = ("csrattrs", "cacerts", "fullcmc", "simpleenroll", "")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    operation = OPERATIONS[data[0] % len(OPERATIONS)]
    label = urllib.parse.quote(data[1:].decode("latin-1"), safe="/")
    response = harness.no_server_error(CLIENT.get(f"/.well-known/est/{label}/{operation}"))
    assert response.status_code in (200, 204, 308, 404, 405), (response.status_code, response.get_data())
    if response.status_code == 200 and operation == "csrattrs":
        body = response.get_data()
        der = body if response.headers.get("Content-Transfer-Encoding") is None else base64.b64decode(body)
        attributes, rest = decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
        assert not rest and len(attributes) > 0


def seeds() -> list[bytes]:
    labels = [*deployment.LABELS, "", "unknown", "..", "pumps/", "cacerts", "a%2Fb", "\u00e9t\u00e9", "x" * 300]
    return [bytes([i]) + label.encode() for i in range(len(OPERATIONS)) for label in labels]


if __name__ == "__main__":
    harness.run("csrattrs", test_one_input, seeds())
