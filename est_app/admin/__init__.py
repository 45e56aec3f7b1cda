"""The operator surfaces: the JSON API under ``/api/v1`` and the dashboard under ``/admin``.

Both need an admin account (``est-admin user add NAME --admin``): the API
takes HTTP Basic, the dashboard a login form and a session cookie. Both can
be switched off (``admin.enabled``) or limited to client networks
(``admin.allowed_networks``). What lives here: switching them on, the
network gate, and who counts as an admin.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from functools import wraps
from typing import Callable

from flask import Flask, g, request

from ..auth import basic, client_certificate
from ..config import Settings
from ..errors import Forbidden, Unauthorized
from ..proxy import in_networks, parse_networks
from ..state import state
from ..store import AuditEvent, Store, User

ADMIN_CHALLENGE = {"WWW-Authenticate": 'Basic realm="EST admin"'}


def init_admin(app: Flask, settings: Settings, store: Store) -> None:
    """Register the admin API and dashboard, unless ``admin.enabled`` is false."""
    if not settings.admin.enabled:
        return
    from . import api, dashboard

    # Shared by every worker (and server) through the store, so sessions survive across them.
    app.secret_key = store.secret("session_key", lambda: secrets.token_bytes(32))
    app.config.update(
        SESSION_COOKIE_NAME="est_admin",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=settings.admin.session_minutes),
    )
    app.extensions["est_admin_networks"] = parse_networks(settings.admin.allowed_networks)
    app.register_blueprint(api.bp)
    app.register_blueprint(dashboard.bp)


def check_network() -> None:
    """before_request for admin blueprints: refuse clients outside ``admin.allowed_networks``."""
    from flask import current_app

    networks = current_app.extensions["est_admin_networks"]
    if networks and not in_networks(request.remote_addr, networks):
        raise Forbidden(f"the admin interface is not available from {request.remote_addr}")


def api_admin_required(view: Callable) -> Callable:
    """HTTP Basic with an admin account; EST users and RAs get 403, no credentials 401."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        user: User | None = basic.current_user()
        if user is None:
            if request.authorization is not None:
                refuse_login(request.authorization.username or "", "wrong password or unknown user")
                raise Unauthorized("credentials not accepted: unknown user or wrong password", ADMIN_CHALLENGE)
            if client_certificate() is not None:
                raise Forbidden("client certificates cannot administer this server; use an admin account")
            raise Unauthorized("authentication required: send HTTP Basic credentials of an admin account", ADMIN_CHALLENGE)
        if not user.is_admin:
            refuse_login(user.name, "an EST user, not an admin")
            raise Forbidden(f"user {user.name!r} is an EST user, not an admin")
        g.admin = user
        return view(*args, **kwargs)

    return basic.login_required(optional=True)(wrapper)


def refuse_login(name: str, reason: str) -> None:
    """Audit a refused admin login (API or dashboard); the password is never recorded."""
    state().store.add_audit(
        AuditEvent("admin-login", "refused", actor=f"admin:{name}", client_address=request.remote_addr or "", detail=reason)
    )


def current_admin_from_session(name: str | None) -> User | None:
    """The admin a session names, if that account still exists and is still an admin."""
    if not name:
        return None
    user = state().store.get_user(name)
    return user if user is not None and user.is_admin else None
