"""Who is asking: HTTP Basic users, client certificates (RAs and devices), and
proof-of-possession linking to the TLS session (RFC 7030 3.5).

Client certificates are read from gunicorn's own TLS socket, from the WSGI
environ key ``SSL_CLIENT_CERT`` (PEM), or from a reverse proxy's header
(URL-escaped PEM, or base64 DER) only when the immediate peer is a trusted proxy. Whatever
the source, the app verifies the certificate itself: issued by a trust
anchor, valid now, EKU clientAuth, not revoked.

Passwords are stored as werkzeug (scrypt) hashes, which cost tens of
milliseconds by design. So that this cost does not bound enrollment
throughput, a successful verification is remembered for a short while, keyed
by an HMAC (with a per-process random key) of the name and password, and
bound to the stored hash it matched: a removed user or a changed password
stops matching on the next request, in every worker, because the user row is
read on every request. Before any of this, a client address that keeps
failing waits (:mod:`est_app.throttle`): 429, nothing hashed, nothing looked up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import wraps
from typing import Callable, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID
from flask import current_app, g, request
from flask_httpauth import HTTPBasicAuth
from werkzeug.datastructures import Authorization
from werkzeug.security import check_password_hash, generate_password_hash

from . import hub, throttle
from .audit import clipped_name
from .errors import REALM, Forbidden, Unauthorized, parsing_client_input
from .profiles import EnrollmentProfile
from .state import state
from .store import MAX_USER_NAME, User


class _BasicAuth(HTTPBasicAuth):
    """Reads credentials with werkzeug's parser, the one behind ``request.authorization``.

    flask-httpauth's own parser skips characters that are not base64, so a header
    werkzeug calls absent could still log a user in, on a label that refuses
    passwords. One parser, and its failures (werkzeug raises on non-ASCII) are a 400.
    """

    def get_auth(self) -> Optional[Authorization]:
        return basic_credentials()


def basic_credentials() -> Optional[Authorization]:
    """The request's HTTP Basic credentials, read by werkzeug's parser for the EST and admin
    surfaces alike; a header that parser cannot read is a 400."""
    with parsing_client_input("Authorization header is not HTTP Basic credentials (base64 of name:password)"):
        auth = request.authorization
    return auth if auth is not None and auth.type == "basic" else None


basic = _BasicAuth(realm=REALM)


@dataclass(frozen=True)
class Identity:
    """An authenticated requester: ``user`` (Basic), ``ra`` (registered certificate) or ``device`` (its own certificate)."""

    kind: str
    name: str
    certificate: Optional[x509.Certificate] = None

    @property
    def requester(self) -> str:
        return f"{self.kind}:{self.name}"


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def describe(certificate: x509.Certificate) -> str:
    return f"{certificate.subject.rfc4514_string() or '(empty subject)'} (SHA-256 {fingerprint(certificate)[:16]}...)"


# --- passwords ---------------------------------------------------------------


class VerifiedCredentials:
    """A bounded, expiring memory of (name, password) pairs that matched a stored hash.

    Requests that present the same pair while it is being checked wait for that check
    instead of hashing it again: a worker starting cold, or whose memory of the gateway's
    pair has just expired, under a burst of enrollments (all through the gateway's one
    account) computed one ~100 ms hash per waiting request, each its share of the cores.
    """

    def __init__(self, ttl_seconds: float = 300.0, max_entries: int = 10000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: dict[bytes, tuple[str, float]] = {}
        self._checking: dict[tuple[bytes, str], _Check] = {}
        self._lock = threading.Lock()

    def check(self, user: User, password: str) -> bool:
        """True when ``password`` is the user's; remembered only while the stored hash is unchanged."""
        name = user.name.encode()
        digest = hmac.new(self._key, len(name).to_bytes(4, "big") + name + password.encode(), hashlib.sha256).digest()
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[0] == user.password_hash and entry[1] > now:
            return True
        if not self._hash_once(digest, user.password_hash, password):
            return False
        if self.ttl > 0:
            with self._lock:
                if len(self._entries) >= self.max_entries:
                    self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
                    if len(self._entries) >= self.max_entries:
                        self._entries.clear()
                self._entries[digest] = (user.password_hash, now + self.ttl)
        return True

    def _hash_once(self, digest: bytes, password_hash: str, password: str) -> bool:
        """The hash check of one pair against one stored hash, shared by the requests that ask meanwhile."""
        key = (digest, password_hash)
        with self._lock:
            check = self._checking.get(key)
            if check is None:
                check = self._checking[key] = _Check()
                done = None
            else:
                done = hub.new_event()
                check.waiters.append(done)
        if done is not None:
            done.wait()
            if check.matched is not None:
                return check.matched
            return hub.off_hub(check_password_hash, password_hash, password)  # the first asker's check raised
        try:
            check.matched = hub.off_hub(check_password_hash, password_hash, password)
        finally:
            with self._lock:
                del self._checking[key]
            for waiter in check.waiters:
                waiter.set()
        return check.matched


class _Check:
    """A hash check in progress: who waits for it, and its outcome (None until known, or if it raised)."""

    def __init__(self) -> None:
        self.waiters: list = []
        self.matched: Optional[bool] = None


_dummy_hash: Optional[str] = None


def password_matches(user: Optional[User], password: str) -> bool:
    """Whether ``password`` is the user's; for no user, as slow as a real check, so names stay secret."""
    global _dummy_hash
    if user is not None:
        return state().credentials.check(user, password)
    if _dummy_hash is None:
        _dummy_hash = hub.off_hub(generate_password_hash, secrets.token_hex(16))
    hub.off_hub(check_password_hash, _dummy_hash, password)
    return False


@basic.verify_password
def _verify(name: str, password: str) -> Optional[User]:
    """EST Basic auth: a client address that keeps failing backs off before any password is checked.

    Even a remembered pair waits: otherwise a blocked client could test guesses against the memory.
    """
    if not name or not password:
        return None
    address = request.remote_addr or ""
    throttle.check("est", address)
    user = state().store.get_user(name) if len(name) <= MAX_USER_NAME else None
    if len(name) > MAX_USER_NAME or not password_matches(user, password):
        throttle.failed("est", address, actor=f"user:{clipped_name(name)}")
        return None
    return user


# --- client certificates -----------------------------------------------------


class ClientCertificateVerifier:
    """Checks a client certificate against the trust anchors, the clock, its EKU and the store."""

    def __init__(self, anchors: list[x509.Certificate], store) -> None:
        self.anchors = anchors
        self.store = store

    def issuer_of(self, certificate: x509.Certificate) -> Optional[x509.Certificate]:
        for anchor in self.anchors:
            if anchor.subject == certificate.issuer:
                try:
                    certificate.verify_directly_issued_by(anchor)
                    return anchor
                except (ValueError, TypeError, InvalidSignature):
                    continue
        return None

    def verify(self, certificate: x509.Certificate) -> x509.Certificate:
        """Return the issuing anchor, or raise 401 saying what is wrong."""
        issuer = self.issuer_of(certificate)
        if issuer is None:
            raise Unauthorized(f"client certificate {describe(certificate)} is not issued by a CA this server trusts")
        problem = self.problem(certificate)
        if problem:
            raise Unauthorized(f"client certificate {describe(certificate)} {problem}")
        return issuer

    def problem(self, certificate: x509.Certificate) -> Optional[str]:
        """What makes the certificate unusable whoever issued it, or None: validity, EKU, revocation.

        Revocation is the store's status of the certificates this server issued. For RAs from an
        external CA (``tls.client_ca_file``) no CRL is fetched: withdraw one with ``est-admin ra remove``.
        """
        now = datetime.now(timezone.utc)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return "is expired or not yet valid"
        try:
            usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = []
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            return "lacks the clientAuth extended key usage"
        record = self.store.get_certificate(format(certificate.serial_number, "x"))
        if record is not None and record.der == certificate.public_bytes(Encoding.DER) and record.status == "revoked":
            return "is revoked"
        return None


def client_certificate() -> Optional[x509.Certificate]:
    """The peer's certificate for this request, from the first source that has one."""
    if "est_client_cert" not in g:
        g.est_client_cert = _from_tls_socket() or _from_environ() or _from_proxy_header()
    return g.est_client_cert


def _load(data: bytes, source: str) -> x509.Certificate:
    with parsing_client_input(f"client certificate from {source} is not a valid X.509 certificate"):
        certificate = x509.load_der_x509_certificate(data) if data[:1] == b"\x30" else x509.load_pem_x509_certificate(data)
        certificate.subject, certificate.issuer, certificate.extensions  # parsed lazily: fail here, as the client's fault
        return certificate


def _tls_socket() -> Optional[ssl.SSLSocket]:
    sock = request.environ.get("gunicorn.socket")
    return sock if isinstance(sock, ssl.SSLSocket) else None


def _from_tls_socket() -> Optional[x509.Certificate]:
    sock = _tls_socket()
    der = sock.getpeercert(binary_form=True) if sock is not None else None
    return _load(der, "the TLS session") if der else None


def _from_environ() -> Optional[x509.Certificate]:
    pem = request.environ.get("SSL_CLIENT_CERT")
    return _load(pem.encode(), "SSL_CLIENT_CERT") if pem else None


def _from_proxy_header() -> Optional[x509.Certificate]:
    settings = state().settings
    value = request.headers.get(settings.client_cert_header)
    if not value:
        return None
    peer = request.environ.get("est.peer_addr", request.remote_addr)
    if not state().proxies.is_trusted(peer):
        current_app.logger.warning("ignored %s header from untrusted address %s", settings.client_cert_header, peer)
        return None
    source = f"the {settings.client_cert_header} header"
    return _load(_forwarded_certificate(value, source), source)


def _forwarded_certificate(value: str, source: str) -> bytes:
    """A proxy's certificate header as PEM or DER: URL-escaped PEM (nginx's ``$ssl_client_escaped_cert``)
    or base64 of the DER (HAProxy's ``ssl_c_der,base64``; between colons as RFC 9440's ``Client-Cert``)."""
    text = urllib.parse.unquote(value).strip()
    if text.startswith("-----BEGIN"):
        return text.encode()
    with parsing_client_input(f"client certificate from {source} is not a valid X.509 certificate"):
        return base64.b64decode(text.strip(":"), validate=True)


# --- who may use a label -----------------------------------------------------


def enrolling_identity(profile: EnrollmentProfile) -> Identity:
    """The user or RA behind an enrollment on ``profile``'s label; 401 or 403 otherwise."""
    certificate = client_certificate()
    user = basic.current_user()
    if certificate is not None and "cert" in profile.auth:
        try:
            state().verifier.verify(certificate)
        except Unauthorized:
            if user is None or "basic" not in profile.auth:
                raise
            certificate = None  # good credentials stand on their own
        ra = state().store.get_ra(fingerprint(certificate)) if certificate is not None else None
        if ra is not None:
            if profile.name not in ra.label_set:
                raise Forbidden(f"RA {describe(certificate)} is not registered for label {profile.name!r}")
            return Identity("ra", ra.fingerprint, certificate)
    if request.authorization is not None and "basic" not in profile.auth:
        raise Forbidden(f"label {profile.name!r} does not accept passwords; present a registered RA certificate")
    if user is not None:
        return Identity("user", user.name)
    if request.authorization is not None:
        raise Unauthorized("credentials not accepted: unknown user or wrong password")
    if certificate is not None:
        if "cert" not in profile.auth:
            raise Unauthorized(f"label {profile.name!r} does not accept client certificates; send HTTP Basic credentials")
        raise Forbidden(f"client certificate {describe(certificate)} is not registered as an RA (est-admin ra add)")
    methods = " or ".join({"basic": "HTTP Basic credentials", "cert": "a registered RA client certificate"}[m] for m in sorted(profile.auth))
    raise Unauthorized(f"authentication required: send {methods}")


def enroller_required(view: Callable) -> Callable:
    """Views that issue on a label's behalf: establish ``g.identity`` per the label's ``auth``."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        g.identity = enrolling_identity(g.profile)
        return view(*args, **kwargs)

    return basic.login_required(optional=True)(wrapper)


def device_identity() -> Identity:
    """The device behind a re-enrollment: its own certificate, issued by one of this server's CAs."""
    certificate = client_certificate()
    if certificate is None:
        raise Unauthorized("re-enrollment needs the current certificate as TLS client certificate")
    issuer = state().verifier.verify(certificate)
    if all(issuer != authority.certificate for authority in state().authorities):
        raise Unauthorized(f"client certificate {describe(certificate)} was not issued by this CA or a label's own CA")
    return Identity("device", format(certificate.serial_number, "x"), certificate)


# --- proof of possession (RFC 7030 3.5) --------------------------------------


def tls_unique() -> Optional[bytes]:
    """The tls-unique channel binding, when the TLS session is ours and TLS <= 1.2."""
    sock = _tls_socket()
    if sock is None or sock.version() not in ("TLSv1", "TLSv1.1", "TLSv1.2"):
        return None
    return sock.get_channel_binding("tls-unique")


def check_proof_of_possession(csr: x509.CertificateSigningRequest, identity: Identity, profile: EnrollmentProfile) -> None:
    """challengePassword must equal base64(tls-unique) when the CSR carries one or the label requires it."""
    if identity.kind == "ra":
        return  # the RA holds the TLS session; the device signed the CSR
    try:
        password = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        password = None
    binding = tls_unique()
    if binding is None:
        if profile.require_pop:
            raise Unauthorized("this label requires proof-of-possession linking: connect with TLS 1.2 directly to this server")
        return
    expected = base64.b64encode(binding)
    if password is None:
        if profile.require_pop:
            raise Unauthorized("this label requires the CSR's challengePassword to be base64(tls-unique) of this TLS session")
        return
    if not hmac.compare_digest(password, expected):
        raise Unauthorized("CSR challengePassword does not match this TLS session's tls-unique value")
