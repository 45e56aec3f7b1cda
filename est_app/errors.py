"""The catalogue of errors a client can act on, each carrying its HTTP status.

Any layer may raise these (the CA service raises :class:`BadRequest` for a bad
CSR without knowing it will become HTTP). :func:`describe` is the one mapping
from any failure to what the client is told (status, one line, headers):
catalogued errors, werkzeug's HTTP exceptions, and anything else, a real fault,
logged with the request id and answered with a bare 500. Each surface only
chooses the body: ``text/plain`` here (:func:`register`, for EST and every
path without its own), JSON for the admin API, an HTML page for the dashboard.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from flask import Flask, Response, current_app, g
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger(__name__)


class ESTError(Exception):
    """Base of the catalogue: a status, one actionable line, optional headers."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ESTError):
    """Malformed input or a request the policy refuses."""

    status = 400


REALM = "EST"


class Unauthorized(ESTError):
    """401 always carries a challenge (RFC 9110 15.5.2); libest sends credentials only after one."""

    status = 401

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers or {"WWW-Authenticate": f'Basic realm="{REALM}"'})


class Forbidden(ESTError):
    status = 403


class NotFound(ESTError):
    status = 404


class Conflict(ESTError):
    status = 409


class UnsupportedMediaType(ESTError):
    status = 415


class TooManyRequests(ESTError):
    """429: back off; ``Retry-After`` says for how many seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class NotImplementedByServer(ESTError):
    status = 501


class ServiceUnavailable(ESTError):
    """503: a part the server needs (the database, the CA key's token) is down; ``Retry-After`` says when to try again."""

    status = 503

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


@contextmanager
def parsing_client_input(message: str, error: type[ESTError] = BadRequest) -> Iterator[None]:
    """Parse what a client sent inside this block: any failure there is the client's, ``error(message)``.

    cryptography, pyasn1 and werkzeug refuse unparsable input with many exception
    types (ValueError, TypeError, UnsupportedAlgorithm, DuplicateExtension, ...),
    some only on first access to a lazily parsed field. Catching them one type at
    a time is how the next one becomes a 500, so this is the one place that turns
    any of them into a catalogued error, with the parser's reason appended.
    Catalogued errors raised inside pass through unchanged.
    """
    try:
        yield
    except ESTError:
        raise
    except Exception as exc:
        reason = "".join(c if c.isprintable() else " " for c in " ".join(str(exc).split()))[:200]
        raise error(f"{message} ({reason or type(exc).__name__})") from None


class ErrorDescription(NamedTuple):
    """What a client is told about a failure, whatever the format of the body."""

    status: int
    message: str  # one line a person can act on
    headers: dict[str, str]


def describe(exc: BaseException) -> ErrorDescription:
    """The status, message and headers of any failure, for every renderer (call it once per failure: it logs).

    Another library's exception that means something a client can act on (the
    database unreachable: :class:`ServiceUnavailable`) is one more branch here.
    """
    if isinstance(exc, ESTError):
        log.info("refused %s %s: %s", request_id(), exc.status, exc.message)
        return ErrorDescription(exc.status, exc.message, dict(exc.headers))
    if isinstance(exc, RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return ErrorDescription(413, f"request body larger than {limit} bytes; an EST request is a few KiB", {})
    if isinstance(exc, HTTPException):
        headers = {k: v for k, v in exc.get_headers() if k.lower() not in ("content-type", "content-length")}
        return ErrorDescription(exc.code or 500, f"{exc.name}: {exc.description}", headers)
    if isinstance(exc, OperationalError):
        # Down, restarting, unreachable, locked or timed out: not a fault of ours or the client's. Details to the log.
        log.warning("database unavailable, request id %s: %s", request_id(), " ".join(str(exc.orig or exc).split())[:300])
        return describe(ServiceUnavailable("the database is unavailable; try again later", retry_after=10))
    log.error("internal error, request id %s", request_id(), exc_info=exc)
    return ErrorDescription(500, f"Internal server error (request id {request_id()}); the operator's log has details", {})


def request_id() -> str:
    """This request's id, in its log lines (an issue, a refusal, a fault) and a 500's message.

    Made at first use: most requests log none."""
    if "request_id" not in g:
        g.request_id = secrets.token_hex(8)
    return g.request_id


def text_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The one shape every text error takes: ``text/plain``, one line."""
    resp = Response(message.rstrip("\n") + "\n", status=status, content_type="text/plain; charset=utf-8")
    resp.headers.update(headers or {})
    return resp


def text_error(exc: BaseException) -> Response:
    """Any failure as a one-line ``text/plain`` answer."""
    return text_response(*describe(exc))


def register(app: Flask) -> None:
    """Answer every failure no blueprint renders itself as one ``text/plain`` line (:func:`describe` says which)."""
    app.register_error_handler(Exception, text_error)
