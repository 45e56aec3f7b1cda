"""Prometheus metrics at ``/metrics``: EST requests, enrollments, issued and revoked certificates, refused passwords, OCSP answers.

Under gunicorn every worker is its own process, so each keeps its counts in
prometheus_client's multiprocess files under ``PROMETHEUS_MULTIPROC_DIR`` and
a scrape, whichever worker answers it, sums them all (MultiProcessCollector).
The gunicorn master makes that directory, fresh and private (0700), when it
starts, tells the library when a worker exits, and removes the directory when
it stops: :func:`gunicorn_hooks`, installed by ``est_app.server``. Counts of a
worker that exited stay in the sum (counters never go back). Without the
variable (the Flask test client, ``flask run``, the CLI) the library's
ordinary registry is used, with its process and platform collectors.

prometheus_client picks between the two when it is first imported, so this
module imports it only inside functions: gunicorn's master imports est_app
before its ``on_starting`` hook has set the variable.

Two numbers come from the store at scrape time instead, so they are the same
whichever worker answers and count what `est-admin` did in its own process:
``est_certificates_expiring_30d`` and ``est_certificates_revoked_total``
(revocations are permanent and certificates are never deleted, so the count
only grows: a counter).

Nothing here identifies a device: operation names come from the code, EST
labels from the configuration (anything else is ``unknown``), statuses and
revocation reasons from fixed sets.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from datetime import timedelta

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app, g, has_request_context, request

from .ca.crl import REASONS
from .ratelimit import exempt
from .state import state
from .store import utcnow
from .store.schema import certificates

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EST_PREFIX = "/.well-known/est/"
ISSUING = ("simpleenroll", "simplereenroll", "serverkeygen", "bootstrap")
OPERATIONS = frozenset(ISSUING + ("cacerts", "csrattrs", "fullcmc"))
UNKNOWN = "unknown"
# RFC 6960 OCSPResponseStatus values by number (4 is unused)
OCSP_STATUSES = {0: "successful", 1: "malformedRequest", 2: "internalError", 3: "tryLater", 5: "sigRequired", 6: "unauthorized"}
EXPIRING_DAYS = 30

bp = Blueprint("metrics", __name__)


# --- the metrics, created on first use (see the module docstring for why not at import) ---------


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "est_requests", "EST requests answered, refusals included, by operation, EST label and HTTP status",
            ["operation", "label", "status"],
        )
        self.enrollment = Histogram(
            "est_enrollment_seconds",
            "Time from the start of an issuing request to its certificate being committed to the store",
            ["operation", "label"],
        )
        self.issued = Counter("est_certificates_issued", "Certificates issued, by operation and EST label", ["operation", "label"])
        self.retried = Counter(
            "est_enrollment_retries",
            "Requests sent again after a lost response, answered with the certificate already issued, by operation and EST label",
            ["operation", "label"],
        )
        self.ocsp = Counter("est_ocsp_responses", "OCSP responses sent, by responseStatus (RFC 6960)", ["response_status"])
        self.password_refusals = Counter(
            "est_password_refusals",
            "Password checks refused, by surface (dashboard, api, est) and reason (wrong_password; backoff: 429 unchecked)",
            ["surface", "reason"],
        )


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


# --- what the rest of the app calls ----------------------------------------------------------------


def certificate_issued(operation: str, label: str) -> None:
    """A certificate is committed: count it, and time the enrollment since its request began."""
    metrics = _get()
    metrics.issued.labels(operation, label).inc()
    started = g.get("_metrics_started") if has_request_context() else None
    if started is not None:
        metrics.enrollment.labels(operation, label).observe(time.perf_counter() - started)


def enrollment_retried(operation: str, label: str) -> None:
    """A request was answered with the certificate already issued for it: no new certificate."""
    _get().retried.labels(operation, label).inc()


def password_refused(surface: str, reason: str) -> None:
    """A password check failed (``wrong_password``) or was refused unchecked while backing off (``backoff``)."""
    _get().password_refusals.labels(surface, reason).inc()


def ocsp_answered(answer: bytes) -> None:
    """An OCSP response is sent: count it by the responseStatus its DER starts with (nothing else is parsed)."""
    # OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED, ... }: 30 <length> 0A 01 <status>
    start = 2 + (answer[1] & 0x7F if len(answer) > 1 and answer[1] & 0x80 else 0)
    status = answer[start + 2] if answer[start : start + 2] == b"\x0a\x01" and len(answer) > start + 2 else None
    _get().ocsp.labels(OCSP_STATUSES.get(status, UNKNOWN)).inc()


def init_app(app: Flask) -> None:
    """Count EST requests, serve ``/metrics`` (exempt from rate limits); call after the limiter exists."""
    metrics = _get()
    if multiprocess() and not _library_is_multiprocess():
        log.error("%s is set but prometheus_client was imported before it was; /metrics shows only one worker", MULTIPROC_ENV)
    # Every label's issued counters exist from the start at 0, so the first issue shows as an increase.
    for profile in app.extensions["est_app"].profiles.values():
        for operation in ISSUING:
            metrics.issued.labels(operation, profile.name)
    for status in OCSP_STATUSES.values():
        metrics.ocsp.labels(status)
    app.before_request_funcs.setdefault(None, []).insert(0, _start_clock)  # before the rate limiter's check
    app.after_request(_count_request)
    app.register_blueprint(bp)
    exempt(app, bp)


def _library_is_multiprocess() -> bool:
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


# --- counting requests -------------------------------------------------------------------------------


def _start_clock() -> None:
    g._metrics_started = time.perf_counter()


def _count_request(response: Response) -> Response:
    try:
        labels = _request_labels()
        if labels is not None:
            _get().requests.labels(*labels, str(response.status_code)).inc()
    except Exception:  # counting must never cost an answer
        log.exception("could not count request %s", request.path)
    return response


def _request_labels() -> tuple[str, str] | None:
    """(operation, label) of an EST request, from the code and the configuration only; None if not EST."""
    if not request.path.startswith(EST_PREFIX):
        return None
    segments = request.path[len(EST_PREFIX):].split("/")
    parts = (request.endpoint or "").split(".")
    if request.url_rule is not None and parts[0] == "est" and len(parts) > 1:
        operation = parts[1]
    else:  # no route matched (404, 405): name the operation only if the path ends in one
        operation = segments[-1] if segments[-1] in OPERATIONS else UNKNOWN
    profile = g.get("profile")
    if profile is not None:
        return operation, profile.name
    profiles = state().profiles
    if len(segments) == 1 and None in profiles:
        return operation, profiles[None].name
    if len(segments) == 2 and segments[0] in profiles:
        return operation, profiles[segments[0]].name
    return operation, UNKNOWN


# --- /metrics ----------------------------------------------------------------------------------------


@bp.get("/metrics")
def metrics_view() -> Response:
    from prometheus_client import REGISTRY, CollectorRegistry, PlatformCollector
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if multiprocess():
        MultiProcessCollector(registry)
        PlatformCollector(registry=registry)  # python_info: the same in every worker
        # No process_* metrics: they would be those of whichever worker answered.
    else:
        registry.register(_Everything(REGISTRY))
    registry.register(_StoreCollector(current_app.extensions["est_app"].store))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), content_type=content_type, headers={"Cache-Control": "no-store"})


class _Everything:
    """Another registry's metrics, collected when this one is."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        return self.registry.collect()


class _StoreCollector:
    """Numbers read from the store at scrape time (the same in every worker)."""

    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("est_store_up", "1 if the store answered this scrape's queries, else 0")
        now = utcnow()
        expiring_where = (
            certificates.c.status == "valid",
            certificates.c.not_after > now,
            certificates.c.not_after <= now + timedelta(days=EXPIRING_DAYS),
        )
        reason = certificates.c.revocation_reason
        try:
            with self.store.engine.connect() as conn:
                expiring = conn.execute(sa.select(sa.func.count()).select_from(certificates).where(*expiring_where)).scalar_one()
                revoked = conn.execute(
                    sa.select(reason, sa.func.count()).where(certificates.c.status == "revoked").group_by(reason)
                ).all()
        except Exception as exc:
            log.warning("metrics: the store did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "est_certificates_expiring_30d", f"Valid certificates whose notAfter falls within the next {EXPIRING_DAYS} days", value=expiring
        )
        family = CounterMetricFamily("est_certificates_revoked", "Certificates revoked, by reason (from the store)", labels=["reason"])
        counts = dict.fromkeys(REASONS, 0)  # every reason from the start, so the first revocation shows as an increase
        for name, count in revoked:
            counts[name or "unspecified"] = counts.get(name or "unspecified", 0) + count
        for name, count in counts.items():
            family.add_metric([name], count)
        yield family


# --- gunicorn master hooks: the multiprocess directory -----------------------------------------------

_owned_dir: str | None = None


def gunicorn_hooks() -> dict:
    """Server hooks for gunicorn's settings (``est_app.server.gunicorn_options``)."""
    return {"on_starting": on_starting, "child_exit": child_exit, "on_exit": on_exit}


def on_starting(server) -> None:
    """In the master, before any worker forks: a fresh private directory for the workers' metric files.

    Always a new one (mkdtemp, mode 0700, under $TMPDIR): files left by an earlier run, or another
    server's, can never be summed in. An inherited PROMETHEUS_MULTIPROC_DIR is replaced.
    """
    global _owned_dir
    _owned_dir = tempfile.mkdtemp(prefix="est-metrics-")
    os.environ[MULTIPROC_ENV] = _owned_dir
    server.log.info("metrics: worker counts in %s", _owned_dir)


def child_exit(server, worker) -> None:
    """In the master, after a worker exits: the library's bookkeeping (drops its ``live*`` gauges).

    Its counters and histograms stay in the directory and in every later scrape's sums.
    """
    if not os.environ.get(MULTIPROC_ENV):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """In the master, on shutdown: remove the directory it made."""
    if _owned_dir:
        shutil.rmtree(_owned_dir, ignore_errors=True)
