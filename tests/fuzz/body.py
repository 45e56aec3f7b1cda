"""Harness: the request-body decoder (DER, PEM, base64 in any shape), est_app/encoding.py.

Whatever the bytes, :func:`decode_body` returns DER (a SEQUENCE) or refuses
with a 400; a body sent as DER comes back unchanged.
"""

from __future__ import annotations

from . import harness  # noqa: I001  (first: instruments est_app)

from est_app.encoding import decode_body

from .deployment import body_forms, der, sample_csrs


def test_one_input(data: bytes) -> None:
    decoded = harness.client_error_or_none(decode_body, data, "PKCS#10 CSR")
    if decoded is None:
        return
    assert decoded[:1] == b"\x30", decoded[:16]
    if data[:1] == b"\x30":
        assert decoded == data


def seeds() -> list[bytes]:
    found = []
    for csr in sample_csrs()[:3]:
        found += body_forms(der(csr))
    return found + [b"", b"\x30", b"-----BEGIN X-----\n-----END X-----", b"MA==", b"\r\n  \t"]


if __name__ == "__main__":
    harness.run("body", test_one_input, seeds())
