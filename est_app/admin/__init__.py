"""The operator surfaces: the JSON API under ``/api/v1``, the dashboard under ``/admin``, and ``/metrics``.

The API and the dashboard need an admin account (``est-admin user add NAME
--admin``): the API takes HTTP Basic, the dashboard a sign-in form and a
server-side session (:mod:`.sessions`). All three answer only from
``admin.allowed_networks`` (loopback unless opened), judged on the client
address after ``trusted_proxies``; the API and dashboard can be switched off
(``admin.enabled``). What lives here: switching them on, the network gate, the
admin password check with its back-off, and who counts as an admin.
"""

from __future__ import annotations

from datetime import timedelta
from functools import wraps
from typing import Callable, Optional
from urllib.parse import urlsplit, urlunsplit

from flask import Flask, Response, current_app, g, request

from .. import throttle
from ..audit import clipped_name
from ..auth import basic_credentials, client_certificate, password_matches
from ..config import Settings
from ..errors import Forbidden, Unauthorized
from ..proxy import in_networks, parse_networks
from ..state import state
from ..store import MAX_USER_NAME, AuditEvent, Store, User

ADMIN_CHALLENGE = {"WWW-Authenticate": 'Basic realm="EST admin"'}
OPERATOR_BLUEPRINTS = frozenset({"api", "dashboard", "metrics"})


def init_admin(app: Flask, settings: Settings, store: Store) -> None:
    """Gate the operator surfaces by network; register the API and dashboard unless ``admin.enabled`` is false."""
    app.extensions["est_admin_networks"] = parse_networks(settings.admin.allowed_networks)
    app.before_request(check_network)  # /metrics too, whether or not the API and dashboard are on
    if not settings.admin.enabled:
        return
    from . import api, dashboard, requests  # noqa: F401  (requests adds its routes to api.bp)
    from .sessions import StoreSessionInterface

    app.session_interface = StoreSessionInterface(
        store, idle=timedelta(minutes=settings.admin.session_minutes), lifetime=timedelta(hours=settings.admin.session_max_hours)
    )
    app.after_request(_relative_location)
    app.register_blueprint(api.bp)
    app.register_blueprint(dashboard.bp)


def check_network() -> None:
    """before_request: refuse clients outside ``admin.allowed_networks`` on the operator surfaces."""
    if request.blueprint not in OPERATOR_BLUEPRINTS:
        return
    peer = request.environ.get("est.peer_addr", request.remote_addr)
    if "X-Forwarded-For" in request.headers and not state().proxies.is_trusted(peer):
        # Through a proxy this server does not trust, the peer's address says nothing about the client.
        raise Forbidden(f"the admin interface is not available through a proxy outside trusted_proxies ({peer})")
    if not in_networks(request.remote_addr, current_app.extensions["est_admin_networks"]):
        raise Forbidden(f"the admin interface is not available from {request.remote_addr}")


def _relative_location(response: Response) -> Response:
    """Redirects name a path only: an absolute URL would be built from the client's Host header."""
    location = response.headers.get("Location")
    if location:
        parts = urlsplit(location)
        if parts.scheme or parts.netloc:
            response.headers["Location"] = urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment))
    return response


def check_admin_password(surface: str, name: str, password: str) -> Optional[User]:
    """The account ``name`` if ``password`` is its own, else None (refusal audited, failure counted).

    Raises 429 while the account or the client address is backing off, before any password is
    hashed. A name longer than the store allows is refused without a lookup.
    """
    address = request.remote_addr or ""
    account = name if 0 < len(name) <= MAX_USER_NAME else None
    failures = throttle.check(surface, address, account)
    user = state().store.get_user(account) if account else None
    if account is None or not password_matches(user, password):
        refuse_login(name, "wrong password or unknown user" if len(name) <= MAX_USER_NAME else f"user name longer than {MAX_USER_NAME} characters")
        throttle.failed(surface, address, account, actor=f"admin:{clipped_name(name)}")
        return None
    throttle.succeeded(account, failures)
    return user


def api_admin_required(view: Callable) -> Callable:
    """HTTP Basic with an admin account; EST users and RAs get 403, no credentials 401, backing off 429."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        credentials = basic_credentials()
        if credentials is None:
            if client_certificate() is not None:
                raise Forbidden("client certificates cannot administer this server; use an admin account")
            raise Unauthorized("authentication required: send HTTP Basic credentials of an admin account", ADMIN_CHALLENGE)
        user = check_admin_password("api", credentials.username or "", credentials.password or "")
        if user is None:
            raise Unauthorized("credentials not accepted: unknown user or wrong password", ADMIN_CHALLENGE)
        if not user.is_admin:
            refuse_login(user.name, "an EST user, not an admin")
            raise Forbidden(f"user {user.name!r} is an EST user, not an admin")
        g.admin = user
        return view(*args, **kwargs)

    return wrapper


def refuse_login(name: str, reason: str) -> None:
    """Audit a refused admin login (API or dashboard); the password is never recorded, a long name is clipped."""
    event = AuditEvent("admin-login", "refused", actor=f"admin:{clipped_name(name)}", client_address=request.remote_addr or "", detail=reason)
    try:
        state().store.add_audit(event)
    except Exception:
        current_app.logger.exception("could not write the audit event for a refused admin login")
