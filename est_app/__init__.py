"""est_app: an EST (RFC 7030 / RFC 8951) certificate server on Flask.

:func:`create_app` is the application factory: from a :class:`~est_app.config.Settings`
(or the YAML file it is read from) it loads the CAs (the top-level one and the
labels' own), opens the store, builds the enrollment service and registers the
EST blueprint, the error catalogue, rate limiting and the ``est`` CLI group.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from flask import Flask
from sqlalchemy.exc import OperationalError

from . import cli, errors, est, health, metrics
from .admin import init_admin
from .revocation import CRLCache
from .revocation import views as revocation_views
from .auth import ClientCertificateVerifier, VerifiedCredentials
from .ca import Authorities, load_authorities
from .ca.ocsp import OCSPResponder, load_signer
from .config import ConfigError, Settings, database_url, load_config
from .approval import ApprovalService
from .enrollment import EnrollmentService
from .profiles import build_profiles
from .proxy import TrustedProxies
from .ratelimit import exempt, init_rate_limit
from .state import AppState
from .store import SchemaOutdated, Store

CONFIG_ENV = "EST_CONFIG"


def instance_path() -> Path:
    """Flask's instance folder for this package (where `est init` puts things by default)."""
    return Path(Flask(__name__).instance_path)


def create_app(config: str | os.PathLike | Settings | None = None, defer_ca_key: bool = False) -> Flask:
    """Build the app from a settings object, a YAML path, ``$EST_CONFIG`` or ``instance/config.yaml``.

    ``defer_ca_key`` (the CLI) loads the CA key only when something is signed.
    """
    app = Flask(__name__, instance_relative_config=True)
    settings = config if isinstance(config, Settings) else load_config(_config_path(config))
    _configure_logging(settings.log_level)

    if settings.database.url is None:
        os.makedirs(app.instance_path, exist_ok=True)
    store = Store(database_url(settings.database, Path(app.instance_path)), settings.database)
    schema = SchemaCheck(store)
    try:
        schema.run()
    except SchemaOutdated as exc:
        raise ConfigError(f"database {store.engine.url.render_as_string(hide_password=True)}: {exc} (docs/DEPLOYMENT.md)") from None

    authorities = load_authorities(settings, defer_key=defer_ca_key)
    # Client certificates may come from any CA issuing here (device re-enrollment) or from tls.client_ca_file (RAs).
    anchors = list(dict.fromkeys(c for authority in authorities for c in authority.chain))
    if settings.tls.client_ca_file:
        anchors += x509.load_pem_x509_certificates(settings.tls.client_ca_file.read_bytes())
    signers, crls = {}, {}
    for authority in authorities:
        ca = authorities.settings[authority.issuer_id]
        if ca.ocsp_responder_cert_file:
            signers[authority.issuer_id] = load_signer(ca.ocsp_responder_cert_file, ca.ocsp_responder_key_file, authority)
        lifetime = timedelta(hours=ca.crl_lifetime_hours)
        crls[authority.issuer_id] = CRLCache(authority, store, lifetime, top_level=authority is authorities.unrecorded)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    proxies = TrustedProxies(app.wsgi_app, settings.trusted_proxies)
    app.wsgi_app = proxies
    profiles = build_profiles(settings)
    enrollment = EnrollmentService(store, authorities, profiles, issued=metrics.certificate_issued, retried=metrics.enrollment_retried)
    app.extensions["est_app"] = AppState(
        settings=settings,
        authorities=authorities,
        store=store,
        profiles=profiles,
        credentials=VerifiedCredentials(ttl_seconds=settings.auth_cache_seconds),
        verifier=ClientCertificateVerifier(anchors, store),
        crls=crls,
        ocsp=OCSPResponder(authorities, store.certificate_status, signers),
        proxies=proxies,
        enrollment=enrollment,
        approval=ApprovalService(store, settings.approval, enrollment),
    )
    app.extensions["est_inline_paths"] = inline_paths(authorities)
    health.log_expiry_warnings(app.extensions["est_app"])
    errors.register(app)
    init_rate_limit(app, settings.rate_limit)
    metrics.init_app(app)
    health.init_app(app)

    app.before_request(schema.retry)

    app.register_blueprint(est.bp)
    app.register_blueprint(revocation_views.bp)
    exempt(app, revocation_views.bp)  # FreeRADIUS asks for every pump from one address
    init_admin(app, settings, store)
    app.cli.add_command(cli.est)
    return app


def inline_paths(authorities: Authorities) -> tuple[str, ...]:
    """Paths whose requests est-server runs on the connection's greenlet, without the hand-off to an app thread.

    Only requests whose every wait lets the worker's other connections go on, since while
    one computes no other connection of its worker is served: ``/healthz`` always; and when
    every CA's key is in a file, ``/ocsp`` and the EST operations. There an enrollment's
    commit waits for its turn and its batch cooperatively, and so do PostgreSQL's round
    trips, its connects (or their timeout while it is down) and its pool (est_app/hub.py); a
    password hash or a server-generated key runs on the hub's thread pool. Handing a request
    to an app thread and back, and the interpreter lock passing between that thread and the
    hub, cost an enrollment about a third of its server CPU on SQLite, and on PostgreSQL
    7% (8 connections) to 30% (32) of its CPU with the database's (docs/DEPLOYMENT.md). A
    PKCS#11 token's calls block, so with a key in one these requests stay on app threads.
    """
    paths = ["/healthz"]
    if all(ca.key is None for ca in authorities.settings.values()):
        paths += ["/ocsp", "/.well-known/est"]
    return tuple(paths)


class SchemaCheck:
    """The start-up schema check (:meth:`Store.create_schema`), tried again at requests while the database is down.

    A worker that starts with the database down still serves what needs none (cacerts,
    the CRL held, OCSP ``tryLater``, 503s, /readyz failing) rather than failing to boot,
    which would make gunicorn stop the whole server; the first request after the database
    answers again checks (or, on an empty one, creates) the schema.
    """

    RETRY_SECONDS = 5  # while the database is down, at most one request per worker in this time pays a connection attempt

    def __init__(self, store: Store) -> None:
        self.store = store
        self.done = False
        self._next_try = 0.0
        self._lock = threading.Lock()

    def run(self) -> None:
        """Check the schema; SchemaOutdated raises, a database that is down is logged and left for a later request."""
        try:
            self.store.create_schema()
        except OperationalError as exc:
            self._next_try = time.monotonic() + self.RETRY_SECONDS
            shown = self.store.engine.url.render_as_string(hide_password=True)
            logging.getLogger(__name__).warning(
                "database %s unavailable (%s): enrollment answers 503 and /readyz fails until it answers",
                shown, " ".join(str(exc.orig or exc).split())[:300],
            )
            return
        self.done = True

    def retry(self) -> None:
        """Before a request: check the schema once the database answers (SchemaOutdated: a 503 naming the fix)."""
        if self.done or time.monotonic() < self._next_try or not self._lock.acquire(blocking=False):
            return
        try:
            self.run()
        except SchemaOutdated as exc:
            logging.getLogger(__name__).error("database schema: %s (docs/DEPLOYMENT.md)", exc)
            raise errors.ServiceUnavailable("the database is not at this version's schema; the operator's log says what to do") from None
        finally:
            self._lock.release()


def config_path(config: str | os.PathLike | None = None) -> Path:
    """The configuration file: ``config``, else ``$EST_CONFIG``, else the instance folder's config.yaml."""
    if config is not None:
        return Path(config)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return instance_path() / "config.yaml"


def _config_path(config: str | os.PathLike | None) -> Path:
    path = config_path(config)
    if config is None and not os.environ.get(CONFIG_ENV) and not path.is_file():
        raise ConfigError(
            f"no configuration: pass --config FILE or set {CONFIG_ENV}=FILE (a production server keeps it in /etc/est/config.yaml, "
            f"see docs/DEPLOYMENT.md); for a development setup `est-admin init` creates {path}"
        )
    return path


def _configure_logging(level: str) -> None:
    """stdlib logging to stderr (journald under systemd); gunicorn's own handlers are left alone."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("est_app").setLevel(level)
