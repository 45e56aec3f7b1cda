"""All EST wire encoding: request bodies in, response bodies out.

Requests are decoded whatever ``Content-Transfer-Encoding`` claims (RFC 8951):
raw DER, PEM, or base64 with any whitespace. Responses are built by views as
:class:`ESTResponse` objects holding DER parts; an after-request hook hands
them to the deployment's (or label's) :class:`ResponseEncoding`, which writes
the body and adds or strips ``Content-Transfer-Encoding``. Views never
base64 anything.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

from flask import Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import BadRequest, parsing_client_input

CTE = "Content-Transfer-Encoding"
PKCS7_MIME = "application/pkcs7-mime"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PKCS10 = "application/pkcs10"
PKCS8 = "application/pkcs8"
CSRATTRS = "application/csrattrs"
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)
_WHITESPACE = re.compile(rb"\s+")


def read_body() -> bytes:
    """The raw request body, refused with 413 over ``MAX_CONTENT_LENGTH`` however it is framed.

    With a Content-Length, werkzeug refuses an oversized body before reading. A
    chunked body has none, and werkzeug's stream would stop quietly at the
    limit, so one byte more than the limit is read to tell "exactly" from "over".
    """
    if request.content_length is not None or not request.environ.get("wsgi.input_terminated"):
        return request.get_data(cache=False)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    data = request.environ["wsgi.input"].read(limit + 1)
    if len(data) > limit:
        raise RequestEntityTooLarge()
    return data


def decode_body(data: bytes, what: str = "request") -> bytes:
    """Return the DER inside a request body sent as DER, PEM or base64."""
    if data[:1] == b"\x30":
        return data  # DER: never strip, its last bytes may well look like whitespace
    data = data.strip()
    if not data:
        raise BadRequest(f"empty body: expected a {what} as DER, PEM or base64")
    if data.startswith(b"-----BEGIN"):
        match = _PEM.search(data)
        if match is None:
            raise BadRequest(f"PEM body has no matching END line: expected a {what}")
        data = match.group(2)
    with parsing_client_input(f"body is not DER, PEM or base64: expected a {what} in one of those"):
        der = base64.b64decode(_WHITESPACE.sub(b"", data), validate=True)
    if not der or der[0] != 0x30:
        raise BadRequest(f"base64 body does not decode to DER (no ASN.1 SEQUENCE): expected a {what}")
    return der


class ESTResponse(Response):
    """A response whose body is still DER parts, for the encoding hook to render.

    One part makes a single-body response; several make ``multipart/mixed``.
    """

    def __init__(self, parts: list[tuple[str, bytes]], status: int = 200) -> None:
        super().__init__(status=status)
        self.parts = parts


def waiting_for_approval(message: str, retry_after: int) -> Response:
    """RFC 7030 4.2.3: 202 Accepted, ``Retry-After`` in seconds, one ``text/plain`` line saying what it waits for.

    Not an :class:`ESTResponse`: no EST payload, so neither strategy adds or keeps
    ``Content-Transfer-Encoding``; the body is the same text in both formats.
    """
    response = Response(message + "\n", status=202, content_type="text/plain; charset=utf-8")
    response.headers["Retry-After"] = str(retry_after)
    return response


class ResponseEncoding(Protocol):
    name: str

    def apply(self, response: Response) -> None:
        """Render an :class:`ESTResponse` body; tidy the headers of any other response."""


def _finish(response: Response, content_type: str, body: bytes) -> None:
    response.set_data(body)  # also sets Content-Length
    response.headers["Content-Type"] = content_type


def _multipart(parts: list[tuple[str, bytes]], part_headers: dict[str, str], render) -> tuple[str, bytes]:
    boundary = "est-" + secrets.token_hex(12)
    extra = "".join(f"{k}: {v}\r\n" for k, v in part_headers.items())
    chunks = [
        f"--{boundary}\r\nContent-Type: {ctype}\r\n{extra}\r\n".encode() + render(der) + b"\r\n"
        for ctype, der in parts
    ]
    return f"multipart/mixed; boundary={boundary}", b"".join(chunks) + f"--{boundary}--\r\n".encode()


@dataclass(frozen=True)
class Base64Encoding:
    """Base64 of the DER, wrapped at ``line_length`` columns (0: one line), CTE header added."""

    line_length: int = 64
    name: str = "base64"

    def encode(self, der: bytes) -> bytes:
        text = base64.b64encode(der)
        if not self.line_length:
            return text
        n = self.line_length
        return b"\n".join(text[i : i + n] for i in range(0, len(text), n))

    def apply(self, response: Response) -> None:
        if not isinstance(response, ESTResponse):
            return
        if len(response.parts) == 1:
            ((ctype, der),) = response.parts
            _finish(response, ctype, self.encode(der) + b"\n")
            response.headers[CTE] = "base64"
        else:
            ctype, body = _multipart(response.parts, {CTE: "base64"}, self.encode)
            _finish(response, ctype, body)


@dataclass(frozen=True)
class DerEncoding:
    """Raw DER bytes; any ``Content-Transfer-Encoding`` header is stripped."""

    name: str = "der"

    def apply(self, response: Response) -> None:
        response.headers.pop(CTE, None)
        if not isinstance(response, ESTResponse):
            return
        if len(response.parts) == 1:
            ((ctype, der),) = response.parts
            _finish(response, ctype, der)
        else:
            ctype, body = _multipart(response.parts, {}, bytes)
            _finish(response, ctype, body)


def response_encoding(name: str, line_length: int = 64) -> ResponseEncoding:
    """The strategy for a ``response_format`` setting."""
    if name == "der":
        return DerEncoding()
    if name == "base64":
        return Base64Encoding(line_length)
    raise ValueError(f"unknown response format {name!r}")
