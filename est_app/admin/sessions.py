"""Server-side dashboard sessions: the cookie carries a random token, the store keeps its SHA-256.

A sign-in creates a session row (user id, JSON data: the CSRF token and
flashed messages) under the hash of a fresh 256-bit token, which goes to the
browser as the ``est_admin`` cookie (Secure, HttpOnly, SameSite=Strict, path
``/admin``). Nothing in the database or on disk can make a cookie: whoever
reads a backup finds only hashes. A session ends at once, in every worker,
when its row goes: sign-out, ``est-admin user passwd`` and ``user remove``
(in the same transaction as the change), the idle timeout
(``admin.session_minutes``) and the absolute lifetime
(``admin.session_max_hours``). Being seen is written at most once a minute.

Before sign-in there is no session: the sign-in form's CSRF token is a
double-submit cookie (``__Host-`` prefixed, so no other site or subdomain can
set it), and notices ("you have signed out") travel as a fixed query value.
So no secret key exists at all.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timedelta
from typing import Optional

from flask import Flask, Response, session
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict
from werkzeug.wrappers import Request

from ..state import state
from ..store import Store, User, utcnow

COOKIE = "est_admin"
COOKIE_PATH = "/admin"
TOUCH_EVERY = timedelta(minutes=1)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdminSession(CallbackDict, SessionMixin):
    """The session of one request: a stored one (``user_id`` set) or none yet."""

    def __init__(self, data: Optional[dict] = None, stored_hash: Optional[str] = None, user_id: Optional[int] = None,
                 last_seen: Optional[datetime] = None, presented: bool = False) -> None:
        def on_update(self: AdminSession) -> None:
            self.modified = True

        super().__init__(data, on_update)
        self.stored_hash = stored_hash
        self.user_id = user_id
        self.last_seen = last_seen
        self.presented = presented  # the request carried a session cookie (valid or not)
        self.modified = False
        self.signing_in: Optional[User] = None

    def sign_in(self, user: User) -> None:
        """Start a new session for ``user`` under a new token (any old one ends)."""
        self.clear()
        self["admin"] = user.name
        self["csrf"] = secrets.token_urlsafe(32)
        self.signing_in = user

    def sign_out(self) -> None:
        self.clear()
        self.signing_in = None


def signed_in_admin() -> Optional[User]:
    """The admin this request's session belongs to, if the account is still that admin."""
    if session.user_id is None:
        return None
    user = state().store.get_user(session.get("admin", ""))
    return user if user is not None and user.id == session.user_id and user.is_admin else None


class StoreSessionInterface(SessionInterface):
    """Flask's session, kept in the store; only requests under ``/admin`` look for one."""

    def __init__(self, store: Store, idle: timedelta, lifetime: timedelta) -> None:
        self.store = store
        self.idle = idle
        self.lifetime = lifetime

    def open_session(self, app: Flask, request: Request) -> AdminSession:
        token = request.cookies.get(COOKIE) if request.path.startswith(COOKIE_PATH + "/") else None
        if not token:
            return AdminSession()
        now = utcnow()
        record = self.store.get_session(token_hash(token), idle_since=now - self.idle, created_since=now - self.lifetime)
        if record is None:
            return AdminSession(presented=True)
        return AdminSession(json.loads(record.data), record.token_hash, record.user_id, record.last_seen, presented=True)

    def save_session(self, app: Flask, session: AdminSession, response: Response) -> None:
        if session.signing_in is not None:
            now = utcnow()
            if session.stored_hash:
                self.store.end_session(session.stored_hash)
            token = secrets.token_urlsafe(32)
            self.store.create_session(
                token_hash(token), session.signing_in.id, json.dumps(dict(session)), now - self.idle, now - self.lifetime
            )
            response.set_cookie(
                COOKIE, token, expires=now + self.lifetime, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict"
            )
            return
        if session.stored_hash is None:
            if session.presented:
                response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict")
            return
        if not session:  # signed out, or cleared because the account changed
            self.store.end_session(session.stored_hash)
            response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict")
        elif session.modified or utcnow() - session.last_seen >= TOUCH_EVERY:
            self.store.touch_session(session.stored_hash, json.dumps(dict(session)) if session.modified else None)
