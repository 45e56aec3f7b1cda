"""The wire layer alone: request decoding and the response encoding strategies."""

from __future__ import annotations

import base64

import pytest
from flask import Response

from est_app.encoding import Base64Encoding, DerEncoding, ESTResponse, decode_body, response_encoding
from est_app.errors import BadRequest

from .pki import der, make_csr, pem

CSR = make_csr()
CSR_DER = der(CSR)
CSR_B64 = base64.b64encode(CSR_DER)


def wrapped(data: bytes, width: int, sep: bytes = b"\n") -> bytes:
    return sep.join(data[i : i + width] for i in range(0, len(data), width))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(CSR_DER, id="raw DER"),
        pytest.param(pem(CSR).replace(b"\n", b"\r\n"), id="PEM with CRLF"),
        pytest.param(CSR_B64, id="base64 one line"),
        pytest.param(wrapped(CSR_B64, 64) + b"\n", id="base64 64 columns"),
        pytest.param(wrapped(CSR_B64, 76, b"\r\n"), id="base64 76 columns CRLF"),
        pytest.param(b"  \t" + wrapped(CSR_B64, 10, b" \n\t") + b"\n\n", id="base64 odd whitespace"),
    ],
)
def test_decode_accepts_every_form(body):
    assert decode_body(body) == CSR_DER


@pytest.mark.parametrize(
    "body, phrase",
    [
        (b"", "empty body"),
        (b" \r\n ", "empty body"),
        (b"not base64 at all!", "not DER, PEM or base64"),
        (base64.b64encode(b"hello world"), "does not decode to DER"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n", "no matching END"),
        (CSR_B64[:-3], "not DER, PEM or base64"),
    ],
)
def test_decode_refuses_with_a_reason(body, phrase):
    with pytest.raises(BadRequest) as info:
        decode_body(body)
    assert phrase in info.value.message


def test_der_ending_in_whitespace_bytes_is_kept_whole():
    body = b"\x30\x06\x04\x04ab \n"
    assert decode_body(body) == body


def test_base64_wraps_at_line_length_and_adds_header():
    payload = bytes(range(256)) * 3
    response = ESTResponse([("application/pkcs7-mime", payload)])
    Base64Encoding(64).apply(response)
    body = response.get_data()
    lines = body.rstrip(b"\n").split(b"\n")
    assert all(len(line) == 64 for line in lines[:-1]) and 0 < len(lines[-1]) <= 64
    assert base64.b64decode(body) == payload
    assert response.headers["Content-Transfer-Encoding"] == "base64"
    assert response.headers["Content-Length"] == str(len(body))
    assert response.headers["Content-Type"] == "application/pkcs7-mime"


def test_base64_line_length_zero_is_one_line():
    payload = bytes(range(256)) * 3
    response = ESTResponse([("application/pkcs7-mime", payload)])
    Base64Encoding(0).apply(response)
    assert response.get_data().count(b"\n") == 1 and response.get_data().endswith(b"\n")
    assert base64.b64decode(response.get_data()) == payload


def test_der_is_raw_and_strips_header():
    payload = b"\x30\x03\x02\x01\x05"
    response = ESTResponse([("application/pkcs7-mime", payload)])
    response.headers["Content-Transfer-Encoding"] = "base64"
    DerEncoding().apply(response)
    assert response.get_data() == payload
    assert "Content-Transfer-Encoding" not in response.headers
    assert response.headers["Content-Length"] == str(len(payload))


def test_der_strips_header_from_any_response():
    response = Response("x", headers={"Content-Transfer-Encoding": "base64"})
    DerEncoding().apply(response)
    assert "Content-Transfer-Encoding" not in response.headers


@pytest.mark.parametrize("strategy", [Base64Encoding(64), DerEncoding()], ids=["base64", "der"])
def test_multipart_renders_each_part_with_the_strategy(strategy):
    key, certs = b"\x30\x01\x01", b"\x30\x02\x02\x02"
    response = ESTResponse([("application/pkcs8", key), ("application/pkcs7-mime; smime-type=certs-only", certs)])
    strategy.apply(response)
    ctype = response.headers["Content-Type"]
    assert ctype.startswith("multipart/mixed; boundary=")
    boundary = ctype.split("boundary=")[1].encode()
    body = response.get_data()
    assert body.endswith(b"--" + boundary + b"--\r\n")
    parts = body.split(b"--" + boundary)[1:-1]
    assert len(parts) == 2
    decoded = []
    for part in parts:
        head, _, content = part.strip(b"\r\n").partition(b"\r\n\r\n")
        has_cte = b"Content-Transfer-Encoding: base64" in head
        assert has_cte == (strategy.name == "base64")
        decoded.append(base64.b64decode(content) if has_cte else content)
    assert decoded == [key, certs]
    assert "Content-Transfer-Encoding" not in response.headers


def test_response_encoding_by_name():
    assert response_encoding("der").name == "der"
    assert response_encoding("base64", 0) == Base64Encoding(0)
    with pytest.raises(ValueError):
        response_encoding("pem")
