"""The admin JSON API under ``/api/v1``: the device registry, certificates, revocation, statistics.

Every route needs an admin account over HTTP Basic (:func:`api_admin_required`,
backing off after failed passwords) and a client address inside
``admin.allowed_networks``. Everything that comes
back is JSON, errors included: ``{"error": "<one line>", "status": <code>}``
with the status's usual headers (``WWW-Authenticate`` on 401, ``Allow`` on 405,
``Retry-After`` on 429).

Errors raised in these views are rendered by the blueprint's handler, with the
status and message :func:`est_app.errors.describe` gives every surface. Some
never reach a blueprint handler: routing failures (an unknown path under
``/api/v1`` or a wrong method), the rate limiter's 429 and the 413/500 the
application renders itself. For those an app-wide after-request hook turns the
application's one-line ``text/plain`` error into the same JSON shape, for
paths under ``/api/v1`` only; every other path keeps its text/plain errors.

Lists are keyset-paginated: pass a page's ``next`` as ``after`` to get the
next page; ``next`` is null on the last one. Changing requests (POST) must be
``Content-Type: application/json``, which a browser cannot send cross-site
without a CORS preflight this API never grants: cached Basic credentials
cannot be used to revoke a certificate from another site's page.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional

from flask import Blueprint, Response, g, request

from ..ca.crl import REASONS
from ..errors import BadRequest, Conflict, NotFound, UnsupportedMediaType, describe
from .. import revocation
from ..revocation import revoke
from ..state import state
from ..records import certificate_json, device_json, event_json, iso
from ..store import AlreadyRevoked, Device
from ..store import NotFound as StoreNotFound
from ..store.reports import MAX_ID, AmbiguousDevice, DeviceNotFound, Reports
from . import api_admin_required

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
bp = Blueprint("api", __name__, url_prefix=PREFIX)

STATUSES = ("valid", "superseded", "revoked")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_DAYS = 36500
MAX_SEARCH = 256
DEVICE = "<device>"  # a device name or a device number (a name holding "/" is reached by its number)
LIST_PARAMS = ("search", "label", "status", "expires_within_days", "after", "limit")
DEFAULT_REASON = {"device": "cessationOfOperation", "certificate": "unspecified"}
EVENTS_PER_DEVICE = 50
RECENT_EVENTS = 20
HEX = re.compile(r"[0-9a-f]{1,64}")


# --- JSON rendering ---------------------------------------------------------------


def json_response(body: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    """``application/json``, with ``<``, ``>`` and ``&`` escaped so no text a device chose can read as markup."""
    text = json.dumps(body, ensure_ascii=True, sort_keys=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    response = Response(text + "\n", status=status, mimetype="application/json")
    response.headers.update(headers or {})
    return response


def error_response(status: int, message: str, headers: Optional[dict[str, str]] = None) -> Response:
    line = " ".join(message.split())  # one line, whatever the message held
    return json_response({"error": line, "status": status}, status, headers)


# --- query parameters -------------------------------------------------------------


def query_params(allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string as a dict; an unknown or repeated parameter is a 400 (a typo must not widen a list)."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        expected = ", ".join(allowed) if allowed else "none"
        raise BadRequest(f"unknown query parameter(s) {', '.join(unknown)}; this route takes: {expected}")
    repeated = sorted(k for k in request.args if len(request.args.getlist(k)) > 1)
    if repeated:
        raise BadRequest(f"query parameter(s) {', '.join(repeated)} given more than once")
    return {k: v for k, v in request.args.items()}


def int_param(params: dict[str, str], name: str, default: Optional[int], low: int, high: int) -> Optional[int]:
    raw = params.get(name)
    if raw is None:
        return default
    value = raw.strip()
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, not {raw!r}")
    return int(value)


def list_filters(params: dict[str, str]) -> dict:
    """search, label, status, expires_within_days and limit, checked; ``after`` is the caller's."""
    search = params.get("search") or None
    if search is not None and len(search) > MAX_SEARCH:
        raise BadRequest(f"search must be at most {MAX_SEARCH} characters")
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    return {
        "search": search,
        "label": params.get("label") or None,
        "status": status,
        "expires_within_days": int_param(params, "expires_within_days", None, 0, MAX_DAYS),
        "limit": int_param(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
    }


def normalise_serial(text: str) -> str:
    """A serial as the store keys it: lower-case hex, no colons, no leading zeros (as `est-admin cert revoke`)."""
    serial = text.strip().lower().replace(":", "").lstrip("0") or "0"
    if not HEX.fullmatch(serial):
        raise BadRequest(f"{text!r} is not a certificate serial number (hexadecimal, colons allowed)")
    return serial


def reports() -> Reports:
    return Reports(state().store.engine)


def page_json(page, render) -> dict:
    return {"items": [render(item) for item in page.items], "next": page.next_after, "total": page.total}


# --- devices ---------------------------------------------------------------------


@bp.get("/devices")
@api_admin_required
def list_devices() -> Response:
    params = query_params(LIST_PARAMS)
    filters = list_filters(params)
    after = int_param(params, "after", None, 1, MAX_ID)
    page = reports().devices(**filters, after=after)
    return json_response(page_json(page, lambda d: device_json(d, d.status, d.not_after)))


@bp.get(f"/devices/{DEVICE}")
@api_admin_required
def show_device(device: str) -> Response:
    store = state().store
    d = _device(device)
    history = store.device_certificates(d.id)
    current = next((c for c in history if c.serial == d.current_serial), None) or store.get_certificate(d.current_serial)
    # Events are keyed by device name alone; the same name on another label is another device.
    events = [e for e in reports().recent_events(EVENTS_PER_DEVICE, device=d.device_key) if e.label in ("", d.label)]
    body = device_json(d, current.status if current else None, current.not_after if current else None)
    body["certificates"] = [certificate_json(c) for c in history]
    body["events"] = [event_json(e) for e in events]
    return json_response(body)


@bp.delete(f"/devices/{DEVICE}")
@api_admin_required
def delete_device(device: str) -> Response:
    params = query_params(("label", "keep_certificate"))
    keep = params.get("keep_certificate", "false")
    if keep not in ("true", "false"):
        raise BadRequest(f"keep_certificate must be true or false, not {keep!r}")
    d = _device(device, params)
    if revocation.delete_device(d, _actor(), request.remote_addr or "", keep_certificate=keep == "true") is None:
        raise NotFound(f"no device {device}")
    response = Response(status=204)
    response.headers.pop("Content-Type", None)
    return response


@bp.post(f"/devices/{DEVICE}/revoke")
@api_admin_required
def revoke_device(device: str) -> Response:
    d = _device(device)
    reason = _reason(DEFAULT_REASON["device"])
    return _revoke(d.current_serial, reason)


# --- certificates ----------------------------------------------------------------


@bp.get("/certificates")
@api_admin_required
def list_certificates() -> Response:
    params = query_params(LIST_PARAMS)
    filters = list_filters(params)
    after = None
    if params.get("after"):
        after = normalise_serial(params["after"])
        if state().store.get_certificate(after) is None:
            raise BadRequest(f"after={params['after']!r} is not the serial of a certificate here; pass a page's 'next' as is")
    page = reports().certificates(**filters, after=after)
    return json_response(page_json(page, certificate_json))


@bp.get("/certificates/<serial>")
@api_admin_required
def show_certificate(serial: str) -> Response:
    query_params(())
    record = state().store.get_certificate(normalise_serial(serial))
    if record is None:
        raise NotFound(f"no certificate with serial {serial}")
    return json_response(certificate_json(record, with_pem=True))


@bp.post("/certificates/<serial>/revoke")
@api_admin_required
def revoke_certificate(serial: str) -> Response:
    query_params(())
    reason = _reason(DEFAULT_REASON["certificate"])
    return _revoke(normalise_serial(serial), reason)


# --- statistics ------------------------------------------------------------------


@bp.get("/statistics")
@api_admin_required
def statistics() -> Response:
    query_params(())
    r = reports()
    body = r.statistics()
    body["recent_events"] = [event_json(e) for e in r.recent_events(RECENT_EVENTS)]
    return json_response(body)


# --- shared steps ----------------------------------------------------------------


def _actor() -> str:
    return f"admin:{g.admin.name}"


def _device(reference: str, params: Optional[dict[str, str]] = None) -> Device:
    """The device a route's name or number refers to (``?label=`` settles a name on several labels);
    ``params``: the query, when the route takes more than ``label``."""
    label = (params if params is not None else query_params(("label",))).get("label") or None
    try:
        return reports().find_device(reference, label)
    except DeviceNotFound as exc:
        raise NotFound(str(exc)) from None
    except AmbiguousDevice as exc:
        raise BadRequest(f"{exc}: add ?label= ({', '.join(exc.labels)}) or use the device number") from None


def json_object(fields: tuple[str, ...], example: str) -> dict[str, Any]:
    """A changing request's JSON object body, holding only ``fields`` (an empty body is ``{}``)."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {request.mimetype or 'missing'}")
    data = request.get_data()
    if data.strip():
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"request body is not JSON: {exc}") from None
    else:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object such as {example}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; this route takes: {', '.join(fields)}")
    return body


def _reason(default: str) -> str:
    """The revocation reason from a JSON object body (``{}`` or an empty body take the default)."""
    body = json_object(("reason",), '{"reason": "keyCompromise"}')
    reason = body.get("reason", default)
    if reason not in REASONS:
        raise BadRequest(f"reason must be one of {', '.join(REASONS)}, not {json.dumps(reason)}")
    return reason


def _revoke(serial: str, reason: str) -> Response:
    """Revoke ``serial`` for the current admin and publish a new CRL; 404 unknown, 409 revoked already."""
    try:
        revoked = revoke(serial, reason, _actor(), request.remote_addr or "")
    except StoreNotFound:
        raise NotFound(f"no certificate with serial {serial}") from None
    except AlreadyRevoked:
        record = state().store.get_certificate(serial)
        raise Conflict(f"certificate {serial} is revoked already ({record.revocation_reason} at {iso(record.revoked_at)})") from None
    log.info("%s revoked %s (%s)", _actor(), serial, reason)
    return json_response(certificate_json(revoked))


# --- errors ----------------------------------------------------------------------


@bp.errorhandler(Exception)
def _error(exc: Exception) -> Response:
    return error_response(*describe(exc))


def _under_prefix(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@bp.after_app_request
def _json_everywhere(response: Response) -> Response:
    """Under /api/v1: JSON for the errors no blueprint handler sees, and no caching or type sniffing."""
    if not _under_prefix(request.path):
        return response
    if response.status_code >= 400 and response.mimetype == "text/plain":
        message = response.get_data(as_text=True)
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
        response = error_response(response.status_code, message, headers)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
