"""The dashboard under ``/admin``: server-rendered pages for the hospital's operators.

Sign-in is a form for admin accounts, backing off after failures
(:mod:`est_app.throttle`), and a server-side session (:mod:`.sessions`). The
account is looked up again on every request, so an admin removed or demoted
with the CLI is out at once. Every change (revoke, delete, sign out) is a
POST carrying the session's CSRF token, reached through a confirmation page; GET never changes
anything. Pages are Jinja with autoescaping and no JavaScript; the overview's
chart is an SVG drawn from the numbers here. The queries are the keyset
reports of :mod:`est_app.store.reports`, a fixed handful per page.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from dataclasses import dataclass
from datetime import date, datetime
from typing import Optional
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, flash, g, make_response, redirect, render_template, request, session, url_for
from werkzeug.http import HTTP_STATUS_CODES

from ..approval import inventory_label
from ..ca.crl import REASONS
from .. import revocation
from ..records import request_json
from ..errors import TooManyRequests, describe
from ..health import expiry_warnings
from ..revocation import revoke
from ..state import state
from ..store import MAX_USER_NAME, AlreadyRevoked, AuditEvent, CertificateRecord, Device
from ..store import NotFound as UnknownCertificate
from ..store import utcnow
from ..store.requests import add_to_inventory, list_inventory, remove_from_inventory
from ..store.reports import MAX_ID, AmbiguousDevice, DeviceNotFound, Reports
from . import check_admin_password, refuse_login
from .sessions import signed_in_admin

log = logging.getLogger(__name__)

bp = Blueprint("dashboard", __name__, url_prefix="/admin")

PAGE_SIZE = 50
RECENT_EVENTS = 10  # on the overview; the activity page has the whole trail, paged
DEVICE_EVENTS = 50
STATUSES = ("valid", "revoked", "superseded")
EXPIRY_WINDOWS = (30, 60, 90)
LOGIN_COOKIE = "__Host-est_login"  # the sign-in form's double-submit CSRF token
NOTICES = {  # ?notice= on the sign-in page: fixed texts only, never echoed input
    "signed-out": ("success", "You have signed out."),
    "ended": (
        "error",
        "Your session has ended: it timed out, was signed out, the password was changed, "
        "or the account was removed or is no longer an administrator. Sign in again.",
    ),
}
MAX_SEARCH = 256  # devices.device_key
DEFAULT_REVOKE_REASON = "cessationOfOperation"  # as `est-admin device revoke`
REASON_TEXT = {
    "cessationOfOperation": "Cessation of operation: the pump is decommissioned or out of service",
    "keyCompromise": "Key compromise: the pump or its key may be in someone else's hands (lost, stolen)",
    "affiliationChanged": "Affiliation changed: the pump moved to another organisation or site",
    "privilegeWithdrawn": "Privilege withdrawn: the pump may no longer join the network",
    "superseded": "Superseded: the pump has been given a newer certificate",
    "unspecified": "Unspecified",
}
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages show device data and carry the CSRF token
}


# --- the gate: network (above), then an admin session, on every request but the sign-in form ---


@bp.before_request
def _require_admin() -> Optional[Response]:
    if request.endpoint == "dashboard.login":
        return None
    user = signed_in_admin()
    if user is None:
        ended = session.presented
        session.sign_out()
        target = request.full_path.rstrip("?") if request.method == "GET" else None
        return redirect(url_for(".login", next=_safe_next(target), notice="ended" if ended else None))
    g.admin = user
    return None


@bp.after_request
def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@bp.context_processor
def _template_context() -> dict:
    admin = g.get("admin")
    return {"admin": admin, "csrf_token": session.get("csrf", "") if admin else "", "now": utcnow()}


@bp.errorhandler(Exception)
def _error_page(exc: Exception) -> Response:
    status, message, headers = describe(exc)
    page = render_template("admin/error.html", status=status, title=HTTP_STATUS_CODES.get(status, "Error"), message=message)
    response = make_response(page, status)
    response.headers.update(headers)
    return response


def _require_csrf() -> None:
    """A change needs the form's ``csrf`` field to equal the session's token."""
    if not _same_token(session.get("csrf")):
        abort(400, "The form's security token is missing or out of date. Go back, reload the page and try again.")


def _same_token(expected: Optional[str]) -> bool:
    return bool(expected) and hmac.compare_digest(request.form.get("csrf", "").encode(), expected.encode())


def _safe_next(target: Optional[str]) -> Optional[str]:
    """A dashboard path to return to after sign-in; anything else (another host, scheme, control characters) is dropped."""
    if not target or not target.startswith("/admin/") or "\\" in target or target.startswith("//"):
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _audit(event: AuditEvent) -> None:
    """Write an event that accompanies no change (sign-in); a failure is logged, not shown."""
    try:
        state().store.add_audit(event)
    except Exception:
        log.exception("could not write the audit event %s", event.event)


# --- sign in and out ---


@bp.route("/login", methods=["GET", "POST"])
def login():
    next_target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if signed_in_admin() is not None:
            return redirect(next_target or url_for(".overview"))
        return _login_form(next_target, notice=NOTICES.get(request.args.get("notice", "")))
    if not _same_token(request.cookies.get(LOGIN_COOKIE)):
        return _login_form(next_target, "The sign-in form had expired. Please sign in again.", 400)
    name = request.form.get("username", "").strip()
    shown = name[:MAX_USER_NAME]
    try:
        user = check_admin_password("dashboard", name, request.form.get("password", ""))
    except TooManyRequests as exc:
        message = f"Too many failed sign-ins from this address or for this account. Try again in {exc.retry_after} seconds."
        return _login_form(next_target, message, 429, shown, exc.headers)
    if user is None:
        return _login_form(next_target, "Incorrect username or password.", 403, shown)
    if not user.is_admin:
        refuse_login(user.name, "an EST user, not an admin")
        message = (
            f"“{user.name}” is an EST account, for gateways and devices enrolling certificates; "
            "it cannot sign in to the dashboard. Sign in with an administrator account."
        )
        return _login_form(next_target, message, 403, shown)
    session.sign_in(user)
    _audit(AuditEvent("admin-login", actor=f"admin:{user.name}", client_address=request.remote_addr or ""))
    return redirect(next_target or url_for(".overview"))


def _login_form(
    next_target: Optional[str], error: Optional[str] = None, status: int = 200, username: str = "",
    headers: Optional[dict[str, str]] = None, notice: Optional[tuple[str, str]] = None,
) -> Response:
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    page = render_template("admin/login.html", next=next_target, login_csrf=token, error=error, username=username, notice=notice)
    response = make_response(page, status, headers or {})
    response.set_cookie(LOGIN_COOKIE, token, path="/", secure=True, httponly=True, samesite="Strict")
    return response


@bp.post("/logout")
def logout():
    _require_csrf()
    session.sign_out()
    return redirect(url_for(".login", notice="signed-out"))


# --- overview ---


@bp.get("/")
def overview():
    reports = Reports(state().store.engine)
    stats = reports.statistics()
    return render_template(
        "admin/overview.html",
        section="overview",
        stats=stats,
        chart=bar_chart(stats["issued_per_day"]),
        issued_total=sum(day["count"] for day in stats["issued_per_day"]),
        events=reports.events(limit=RECENT_EVENTS),
        windows=EXPIRY_WINDOWS,
        ca_warnings=list(expiry_warnings(state()).values()),
    )


@bp.get("/activity")
def activity():
    """The whole audit trail, newest first, a page at a time."""
    after_id = _after_id()
    page = Reports(state().store.engine).events(after=after_id, limit=PAGE_SIZE)
    return render_template("admin/activity.html", section="activity", page=page, paged=after_id is not None)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: str  # ISO date
    count: int
    tick: Optional[str]  # x-axis label under this bar, if any


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right: int  # x of the plot's right edge
    baseline: float  # y of zero
    bars: list[Bar]
    ticks: list[tuple[float, int]]  # (y, value) for horizontal grid lines
    peak: int


def bar_chart(per_day: list[dict], width: int = 760, height: int = 230) -> Chart:
    """Geometry for an SVG bar chart of ``[{"date": ISO, "count": n}, ...]`` (oldest first)."""
    left, right, top, bottom = 40, 8, 12, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    counts = [day["count"] for day in per_day]
    peak = max(counts, default=0)
    step = _nice_step(peak)
    ceiling = max(step, step * math.ceil(peak / step))
    slot = plot_w / max(len(per_day), 1)
    bars = []
    for i, day in enumerate(per_day):
        h = round(day["count"] / ceiling * plot_h, 1)
        bw = round(slot * 0.72, 1)
        label_every = 7 if len(per_day) > 10 else 1
        tick = _short_date(day["date"]) if (len(per_day) - 1 - i) % label_every == 0 else None
        bars.append(Bar(round(left + i * slot + (slot - bw) / 2, 1), round(top + plot_h - h, 1), bw, h, day["date"], day["count"], tick))
    ticks = [(round(top + plot_h - v / ceiling * plot_h, 1), v) for v in range(0, ceiling + 1, step)]
    return Chart(width, height, left, width - right, top + plot_h, bars, ticks, peak)


def _nice_step(peak: int) -> int:
    """A grid step of 1, 2 or 5 times a power of ten giving at most four intervals above ``peak``."""
    if peak <= 4:
        return 1
    magnitude = 10 ** math.floor(math.log10(peak / 4))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude * 4 >= peak)


def _short_date(iso: str) -> str:
    d = date.fromisoformat(iso)
    return f"{d.day} {d:%b}"


# --- devices ---


@bp.get("/devices")
def devices():
    filters = _device_filters()
    after_id = _after_id()
    labels = sorted({p.name for p in state().profiles.values()} | ({filters["label"]} if filters.get("label") else set()))
    page = Reports(state().store.engine).devices(
        search=filters.get("q"),
        label=filters.get("label"),
        status=filters.get("status"),
        expires_within_days=filters.get("expiring"),
        after=after_id,
        limit=PAGE_SIZE,
    )
    return render_template(
        "admin/devices.html",
        section="devices",
        filters=filters,
        page=page,
        paged=after_id is not None,
        after=after_id,
        labels=labels,
        statuses=STATUSES,
        windows=EXPIRY_WINDOWS,
    )


def _after_id() -> Optional[int]:
    """A list page's ``after`` (the last id of the previous page); anything else starts at the top."""
    after = request.args.get("after", "")
    return int(after) if after.isascii() and after.isdigit() and int(after) <= MAX_ID else None


def _device_filters() -> dict:
    """The list's filters from the query string, only those set (unknown values are ignored)."""
    args = request.args
    filters: dict = {}
    q = args.get("q", "").strip()
    if q:
        filters["q"] = q[:MAX_SEARCH]
    if args.get("label"):
        filters["label"] = args["label"][:64]
    if args.get("status") in STATUSES:
        filters["status"] = args["status"]
    if args.get("expiring", "").isascii() and args.get("expiring", "").isdigit() and int(args["expiring"]) in EXPIRY_WINDOWS:
        filters["expiring"] = int(args["expiring"])
    return filters


def _device_or_404(reference: str) -> Device:
    """The device a page's address names (the pages link by number; a name works too, ``?label=`` settles it)."""
    try:
        return Reports(state().store.engine).find_device(reference, request.args.get("label") or None)
    except DeviceNotFound:
        abort(404, f"There is no device {reference}. It may have been deleted.")
    except AmbiguousDevice as exc:
        abort(400, f"{exc}: open it from the device list, or add ?label= ({', '.join(exc.labels)}) to the address.")


@bp.get("/devices/<device>")
def device(device: str):
    d = _device_or_404(device)
    certificates = state().store.device_certificates(d.id)
    current = next((c for c in certificates if c.serial == d.current_serial), None)
    return render_template(
        "admin/device.html",
        section="devices",
        device=d,
        current=current,
        certificates=list(reversed(certificates)),  # newest first
        events=_device_events(d, certificates),
    )


def _device_events(d: Device, certificates: list[CertificateRecord]) -> list[AuditEvent]:
    """The newest events naming the device: by its name, or by the CN of one of its certificates (re-enrollment)."""
    reports = Reports(state().store.engine)
    names = {d.device_key} | {c.common_name for c in certificates if c.common_name}
    found = {e.id: e for name in sorted(names) for e in reports.recent_events(DEVICE_EVENTS, device=name) if e.label in (d.label, "")}
    return sorted(found.values(), key=lambda e: e.id, reverse=True)[:DEVICE_EVENTS]


# --- revoke ---


@bp.get("/devices/<device>/revoke")
def revoke_confirm(device: str):
    d = _device_or_404(device)
    current = state().store.get_certificate(d.current_serial)
    return render_template(
        "admin/revoke.html", section="devices", device=d, certificate=current, reasons=_reasons(), default_reason=DEFAULT_REVOKE_REASON
    )


@bp.post("/devices/<device>/revoke")
def revoke_device(device: str):
    _require_csrf()
    d = _device_or_404(device)
    reason = request.form.get("reason", "")
    if reason not in REASONS:
        abort(400, f"Choose a revocation reason from the list (one of {', '.join(sorted(REASONS))}).")
    serial = request.form.get("serial", "")
    if serial != d.current_serial:
        flash(
            "The device has a new certificate since you opened the confirmation. Nothing was revoked; "
            "check the certificate below and confirm again.",
            "error",
        )
        return redirect(url_for(".revoke_confirm", device=d.id))
    try:
        revoke(serial, reason, f"admin:{g.admin.name}", request.remote_addr or "")
    except UnknownCertificate:
        abort(404, f"There is no certificate with serial {serial}.")
    except AlreadyRevoked:
        flash(f"Certificate {serial} was revoked already; nothing changed.", "error")
        return redirect(url_for(".device", device=d.id))
    if problem := revocation.crl_not_renewed():
        flash(f"Certificate {serial} of {d.device_key} is revoked ({reason}), but {problem}.", "error")
    else:
        flash(f"Certificate {serial} of {d.device_key} is revoked ({reason}) and the CRL has been re-signed.", "success")
    return redirect(url_for(".device", device=d.id))


def _reasons() -> list[tuple[str, str]]:
    ordered = [r for r in REASON_TEXT if r in REASONS] + sorted(r for r in REASONS if r not in REASON_TEXT)
    return [(r, REASON_TEXT.get(r, r)) for r in ordered]


# --- delete ---


@bp.get("/devices/<device>/delete")
def delete_confirm(device: str):
    d = _device_or_404(device)
    current = state().store.get_certificate(d.current_serial)
    return render_template("admin/delete.html", section="devices", device=d, certificate=current)


@bp.post("/devices/<device>/delete")
def delete_device(device: str):
    _require_csrf()
    d = _device_or_404(device)
    keep = request.form.get("keep_certificate") == "yes"
    deleted = revocation.delete_device(d, f"admin:{g.admin.name}", request.remote_addr or "", keep_certificate=keep)
    if deleted is None:
        abort(404, f"There is no device {d.id}. It may have been deleted already.")
    problem = None if keep else revocation.crl_not_renewed()
    if keep:
        certificate = f"Its certificate {deleted.current_serial} stays valid until it expires, but cannot re-enroll."
    elif problem:
        certificate = f"Its certificate {deleted.current_serial} is revoked, but {problem}."
    else:
        certificate = f"Its certificate {deleted.current_serial} is revoked and the CRL has been re-signed."
    flash(f"Device {d.device_key} (number {d.id}) is deleted; it may enroll again. {certificate}", "error" if problem else "success")
    return redirect(url_for(".devices"))


# --- enrollment requests waiting for approval, and the asset inventory ---


@bp.get("/requests")
def requests_page():
    store = state().store
    hours = state().approval.settings.pending_hours
    waiting = [request_json(r, hours, with_csr=True) for r in state().approval.requests("pending")]
    labels = sorted(p.name for p in state().profiles.values())
    return render_template(
        "admin/requests.html", section="requests", requests=waiting, inventory=list_inventory(store), labels=labels,
        pending_hours=hours,
    )


@bp.post("/requests/<int:request_id>/<any(approve, reject):decision>")
def decide_request(request_id: int, decision: str):
    _require_csrf()
    approve = decision == "approve"
    decided = state().approval.decide(request_id, approve, f"admin:{g.admin.name}", request.form.get("reason", ""), request.remote_addr or "")
    outcome = "approved: it is issued when the device sends its CSR again" if approve else "rejected"
    flash(f"Request {decided.id} for {decided.device_key} on label {decided.label} is {outcome}.", "success")
    return redirect(url_for(".requests_page"))


@bp.post("/inventory")
def inventory_add():
    _require_csrf()
    label = inventory_label(state().settings, request.form.get("label", ""))
    keys = [line.strip() for line in request.form.get("devices", "").splitlines() if line.strip()]
    if not keys:
        abort(400, "List at least one device id, one a line.")
    actor = f"admin:{g.admin.name}"
    audit = AuditEvent(event="inventory-add", actor=actor, client_address=request.remote_addr or "", label=label, detail=f"{len(keys)} device id(s)")
    added = add_to_inventory(state().store, label, keys, actor, audit)
    flash(f"{added} device(s) added to the inventory of label {label}; {len(set(keys)) - added} were listed already.", "success")
    return redirect(url_for(".requests_page"))


@bp.post("/inventory/remove")
def inventory_remove():
    _require_csrf()
    label, device_key = request.form.get("label", ""), request.form.get("device", "")
    audit = AuditEvent(event="inventory-remove", actor=f"admin:{g.admin.name}", client_address=request.remote_addr or "", label=label, device=device_key)
    if not remove_from_inventory(state().store, label, device_key, audit):
        abort(404, "That device is not in the inventory (it may have been removed already).")
    flash(f"{device_key} is removed from the inventory of label {label}.", "success")
    return redirect(url_for(".requests_page"))


# --- template filters ---


@bp.app_template_filter("admin_time")
def _format_time(value: Optional[datetime]) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value else "—"


@bp.app_template_filter("admin_date")
def _format_date(value: Optional[datetime]) -> str:
    return f"{value:%Y-%m-%d}" if value else "—"


@bp.app_template_filter("admin_number")
def _format_number(value: int) -> str:
    return f"{value:,}"


@bp.app_template_filter("admin_until")
def _format_until(value: Optional[datetime]) -> str:
    """'in 23 days', 'today', 'expired 3 days ago'."""
    if value is None:
        return ""
    days = (value.date() - utcnow().date()).days
    if value < utcnow():
        return "expired today" if days == 0 else f"expired {-days} day{'s' if days != -1 else ''} ago"
    return "today" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"
