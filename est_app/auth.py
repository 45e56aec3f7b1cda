"""Who is asking: HTTP Basic users from the store.

Passwords are stored as werkzeug (scrypt) hashes, which cost tens of
milliseconds by design. So that this cost does not bound enrollment
throughput, a successful verification is remembered for a short while, keyed
by an HMAC (with a per-process random key) of the name and password, and
bound to the stored hash it matched: a removed user or a changed password
stops matching on the next request, in every worker, because the user row is
read on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from typing import Optional

from flask import current_app, request
from flask_httpauth import HTTPBasicAuth
from werkzeug.security import check_password_hash, generate_password_hash

from .errors import text_response
from .state import state
from .store import User

REALM = "EST"
basic = HTTPBasicAuth(realm=REALM)


class VerifiedCredentials:
    """A bounded, expiring memory of (name, password) pairs that matched a stored hash."""

    def __init__(self, ttl_seconds: float = 300.0, max_entries: int = 10000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def check(self, user: User, password: str) -> bool:
        """True when ``password`` is the user's; remembered only while the stored hash is unchanged."""
        name = user.name.encode()
        digest = hmac.new(self._key, len(name).to_bytes(4, "big") + name + password.encode(), hashlib.sha256).digest()
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[0] == user.password_hash and entry[1] > now:
            return True
        if not check_password_hash(user.password_hash, password):
            return False
        if self.ttl > 0:
            with self._lock:
                if len(self._entries) >= self.max_entries:
                    self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
                    if len(self._entries) >= self.max_entries:
                        self._entries.clear()
                self._entries[digest] = (user.password_hash, now + self.ttl)
        return True


_dummy_hash: Optional[str] = None


def _equalise_timing(password: str) -> None:
    """Spend what a real check costs, so response time does not reveal which names exist."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = generate_password_hash(secrets.token_hex(16))
    check_password_hash(_dummy_hash, password)


@basic.verify_password
def _verify(name: str, password: str) -> Optional[User]:
    if not name or not password:
        return None
    app_state = state()
    user = app_state.store.get_user(name)
    if user is None:
        _equalise_timing(password)
        return None
    return user if app_state.credentials.check(user, password) else None


@basic.error_handler
def _refused(status: int):
    if status == 401 and request.authorization is None:
        message = "authentication required: send HTTP Basic credentials of an EST user"
    elif status == 401:
        message = "credentials not accepted: unknown user or wrong password"
    else:
        message = "authenticated, but not allowed to use this operation"
    current_app.logger.info("auth refused (%s) for %s", status, request.remote_addr)
    return text_response(status, message)
