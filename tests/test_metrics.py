"""/metrics, /healthz and /readyz: through the test client, then over the real server with two workers.

The test client runs in one process, so prometheus_client's ordinary registry
answers; its counters are global to the test process, so these tests compare
scrapes before and after (exact deltas). The end-to-end tests run gunicorn with
two workers, where every worker keeps its counts in the multiprocess directory
the master made and each scrape must sum them exactly.
"""

from __future__ import annotations

import base64
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from est_app.ca.signers import FileSigner
from est_app.metrics import OCSP_STATUSES
from est_app.state import state
from est_app.store.schema import crls

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, make_csr
from .server import BIN, RunningServer, start_server

EST = "/.well-known/est"
REQUESTS = "est_requests_total"
ISSUED = "est_certificates_issued_total"
ENROLL_COUNT = "est_enrollment_seconds_count"
ENROLL_SUM = "est_enrollment_seconds_sum"
REVOKED = "est_certificates_revoked_total"
EXPIRING = "est_certificates_expiring_30d"


# --- helpers -----------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return parse(response.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def enroll(client, cn: str, label: str | None = None, body: bytes | None = None, auth: bool = True):
    path = f"{EST}/{label}/simpleenroll" if label else f"{EST}/simpleenroll"
    headers = {"Content-Type": "application/pkcs10", **(basic_auth() if auth else {})}
    return client.post(path, data=body if body is not None else base64.b64encode(der(make_csr(cn))), headers=headers)


def serial_of(response) -> str:
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.get_data()))
    return format(cert.serial_number, "x")


# --- counters through the test client ------------------------------------------------------------


def test_request_counters_move_by_exactly_what_was_asked(client):
    before = scrape(client)
    assert enroll(client, "NPPBBB1").status_code == 200
    assert enroll(client, "NPPBBB2").status_code == 200
    assert enroll(client, "NPPBBB3", auth=False).status_code == 401
    assert enroll(client, "NPPBBB3", body=b"this is not a CSR").status_code == 400
    assert client.get(f"{EST}/cacerts").status_code == 200
    csrattrs = client.get(f"{EST}/csrattrs").status_code
    assert client.get(f"{EST}/no-such-label/cacerts").status_code == 404
    assert client.get(f"{EST}/simpleenroll").status_code == 405
    after = scrape(client)

    expected = {
        ("simpleenroll", "default", "200"): 2,
        ("simpleenroll", "default", "401"): 1,
        ("simpleenroll", "default", "400"): 1,
        ("cacerts", "default", "200"): 1,
        ("csrattrs", "default", str(csrattrs)): 1,
        ("cacerts", "unknown", "404"): 1,
        ("simpleenroll", "default", "405"): 1,
    }
    for (operation, label, status), n in expected.items():
        assert delta(before, after, REQUESTS, operation=operation, label=label, status=status) == n, (operation, label, status)
    # Nothing else was counted: not the scrapes themselves, nothing twice.
    assert total(after, REQUESTS) - total(before, REQUESTS) == sum(expected.values())

    assert delta(before, after, ISSUED, operation="simpleenroll", label="default") == 2
    assert delta(before, after, ENROLL_COUNT, operation="simpleenroll", label="default") == 2
    assert delta(before, after, ENROLL_SUM, operation="simpleenroll", label="default") > 0
    assert total(after, ISSUED) - total(before, ISSUED) == 2


def test_issued_counter_names_the_label_a_certificate_was_issued_on(make_app):
    client = make_app(labels={"pumps": {"response_format": "der"}}).test_client()
    before = scrape(client)
    response = enroll(client, "NPPBBB4", label="pumps")
    assert response.status_code == 200
    after = scrape(client)
    assert delta(before, after, ISSUED, operation="simpleenroll", label="pumps") == 1
    assert delta(before, after, ENROLL_COUNT, operation="simpleenroll", label="pumps") == 1
    assert delta(before, after, REQUESTS, operation="simpleenroll", label="pumps", status="200") == 1
    # Every configured label's issued counters exist from the start, at zero or more.
    assert ((ISSUED, frozenset({"operation": "serverkeygen", "label": "pumps"}.items()))) in after


def test_revoked_counter_comes_from_the_store_so_cli_revocations_count(client, tmp_path):
    config = tmp_path / "config.yaml"  # the file make_app's app was built from
    serials = [serial_of(enroll(client, f"NPPBBB{i}")) for i in range(3)]
    before = scrape(client)
    assert value(before, REVOKED, reason="keyCompromise") == 0  # every reason is there from the start

    result = run_cli("cert", "revoke", serials[0], "--reason", "keyCompromise", config=config)
    assert result.exit_code == 0, result.output
    after = scrape(client)
    assert delta(before, after, REVOKED, reason="keyCompromise") == 1
    assert total(after, REVOKED) - total(before, REVOKED) == 1

    # est-admin in a process of its own, as an operator runs it: a counter kept in that
    # process would die with it; the store's count is what every worker reports.
    env = {**os.environ, "EST_CONFIG": str(config)}
    subprocess.run([str(BIN / "est-admin"), "cert", "revoke", serials[1]], env=env, check=True, capture_output=True, timeout=60)
    later = scrape(client)
    assert delta(after, later, REVOKED, reason="unspecified") == 1
    assert total(later, REVOKED) - total(before, REVOKED) == 2


def test_expiring_gauge_counts_valid_certificates_ending_within_30_days(make_app, tmp_path):
    client = make_app(labels={"short": {"cert_validity_days": 10}}).test_client()
    assert value(scrape(client), EXPIRING) == 0
    assert enroll(client, "LONG-LIVED").status_code == 200  # the default 365 days
    short = [enroll(client, f"SHORT{i}", label="short") for i in range(3)]
    assert all(r.status_code == 200 for r in short)
    assert value(scrape(client), EXPIRING) == 3

    result = run_cli("cert", "revoke", serial_of(short[0]), config=tmp_path / "config.yaml")
    assert result.exit_code == 0, result.output
    assert enroll(client, "SHORT1", label="short").status_code == 200  # supersedes SHORT1's first certificate
    assert value(scrape(client), EXPIRING) == 2


def test_metrics_carry_no_device_data(client):
    cn = "NPPSECRET9"
    response = enroll(client, cn)
    assert response.status_code == 200
    serial = serial_of(response)
    text = client.get("/metrics").get_data(as_text=True)
    for secret in (cn, serial, USER, "127.0.0.1"):
        assert secret.lower() not in text.lower()
    # Label values come from fixed sets (EST labels from configurations, which the test process
    # shares with every other test's app, so those are only checked above).
    operations = {"cacerts", "simpleenroll", "simplereenroll", "serverkeygen", "csrattrs", "fullcmc", "bootstrap", "unknown"}
    for (name, labels), _ in parse(text).items():
        if name.startswith("est_"):
            labels = dict(labels)
            assert labels.get("operation", "cacerts") in operations, (name, labels)
            assert labels.get("status", "200").isdigit(), (name, labels)
            assert set(labels) <= {"operation", "label", "status", "reason", "surface", "le", "response_status"}, (name, labels)
            assert labels.get("response_status", "successful") in OCSP_STATUSES.values(), (name, labels)
            assert labels.get("surface", "est") in {"dashboard", "api", "est"}, (name, labels)


def test_metrics_speak_openmetrics_when_asked(client):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.mimetype == "application/openmetrics-text"
    assert response.get_data(as_text=True).endswith("# EOF\n")


def test_single_process_metrics_include_the_library_process_collectors(client):
    samples = scrape(client)
    assert any(name == "python_info" for name, _ in samples)
    assert any(name.startswith("process_") for name, _ in samples)  # Linux /proc
    assert value(samples, "est_store_up") == 1


# --- probes ----------------------------------------------------------------------------------------


def test_healthz_is_ok(client):
    response = client.get("/healthz")
    assert (response.status_code, response.get_data(as_text=True)) == (200, "ok\n")
    assert response.mimetype == "text/plain"


def test_readyz_signs_the_first_crl_and_then_leaves_it_alone(app, client):
    with app.app_context():
        store = state().store
        assert store.current_crl_number() is None  # a fresh database: nothing has asked for a CRL yet
    response = client.get("/readyz")
    assert (response.status_code, response.get_data(as_text=True)) == (200, "ready\n")
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        assert store.current_crl_number() == 1


def test_readyz_renews_an_expired_crl(app, client):
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        store = state().store
        with store.engine.begin() as conn:
            conn.execute(crls.update().values(next_update=sa.func.datetime("now", "-1 hour")))
        assert not state().crl.is_fresh()
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        assert store.current_crl_number() == 2 and state().crl.is_fresh()


def test_readyz_is_503_when_the_store_is_unreachable_and_recovers(make_app, tmp_path):
    """The database's directory disappears, as when its volume is lost.

    Why not chmod the file: these tests run as root, whom permissions do not stop,
    and an open SQLite connection keeps working on a renamed file, so the pool is
    emptied first: every connection the check opens afterwards really fails.
    """
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    app = make_app(database={"url": f"sqlite:///{db_dir / 'est.db'}"})
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        engine = state().store.engine
    db_dir.rename(tmp_path / "db-gone")
    engine.dispose()
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_data(as_text=True)
    assert body == "not ready: store failed (OperationalError)\n"
    assert client.get("/healthz").status_code == 200  # the process itself is fine
    metrics = client.get("/metrics")  # still served: the request counters matter most now
    assert metrics.status_code == 200 and value(parse(metrics.get_data(as_text=True)), "est_store_up") == 0

    (tmp_path / "db-gone").rename(db_dir)
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_ca_key_does_not_match(app, client):
    with app.app_context():
        state().authority._signer = FileSigner(ec.generate_private_key(ec.SECP384R1()))  # as if the key file had been swapped
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_data(as_text=True) == "not ready: ca key does not match the CA certificate\n"


def test_readyz_is_503_when_an_expired_crl_cannot_be_renewed(app, client, monkeypatch):
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        crl = state().crl
        with state().store.engine.begin() as conn:
            conn.execute(crls.update().values(next_update=sa.func.datetime("now", "-1 hour")))

    def broken(now=None):
        raise RuntimeError("signing failed")

    monkeypatch.setattr(crl, "regenerate", broken)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_data(as_text=True) == "not ready: crl failed (RuntimeError)\n"


def test_probes_and_metrics_are_not_rate_limited(make_app):
    client = make_app(rate_limit={"enabled": True, "limit": "2 per minute"}).test_client()
    before = scrape(client)
    statuses = [client.get(f"{EST}/cacerts").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert [client.get(path).status_code for _ in range(5)] == [200] * 5, path
    after = scrape(client)
    assert delta(before, after, REQUESTS, operation="cacerts", label="default", status="429") == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_metrics_are_inside_the_admin_network_gate_and_probes_outside(make_app, enabled):
    client = make_app(admin={"enabled": enabled, "allowed_networks": ["10.0.0.0/8"]}).test_client()
    if enabled:
        assert client.get("/api/v1/statistics").status_code == 403  # the test client comes from 127.0.0.1
    refused = client.get("/metrics")
    assert refused.status_code == 403 and "not available from 127.0.0.1" in refused.get_data(as_text=True)
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.9.8.7"}).status_code == 200
    for path in ("/healthz", "/readyz"):
        assert client.get(path).status_code == 200, path


def test_metrics_answer_only_loopback_by_default(client):
    assert client.get("/metrics").status_code == 200  # the test client comes from 127.0.0.1
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    for address in ("10.1.2.3", "192.168.0.5", "fe80::1"):
        assert client.get("/metrics", environ_base={"REMOTE_ADDR": address}).status_code == 403, address


# --- end to end: gunicorn, two workers, one multiprocess directory ----------------------------------


def _context(server: RunningServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca_file))


def _get(server: RunningServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{server.url}{path}", context=_context(server), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _enroll_over_tls(server: RunningServer, cn: str) -> int:
    """One enrollment on a connection of its own (urllib closes it after the reply)."""
    request = urllib.request.Request(
        f"{server.url}{EST}/simpleenroll",
        data=base64.b64encode(der(make_csr(cn))),
        headers={"Content-Type": "application/pkcs10", **basic_auth()},
        method="POST",
    )
    with urllib.request.urlopen(request, context=_context(server), timeout=60) as r:
        r.read()
        return r.status


def _enrolled(samples: Samples) -> float:
    return value(samples, REQUESTS, operation="simpleenroll", label="default", status="200")


def _scrape_over_tls(server: RunningServer) -> Samples:
    status, text = _get(server, "/metrics")
    assert status == 200
    return parse(text)


def _workers(master: int) -> set[int]:
    result = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


def _enrollments_per_file(metrics_dir: Path) -> dict[int, float]:
    """Each worker's own count, from its counter_<pid>.db file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        counts[pid] = sum(
            s.value
            for metric in MultiProcessCollector.merge([str(path)])
            for s in metric.samples
            if s.name == REQUESTS and s.labels.get("operation") == "simpleenroll" and s.labels.get("status") == "200"
        )
    return counts


def _start(pki_dir, workdir: Path, monkeypatch, **options) -> tuple[RunningServer, Path]:
    """Two workers; TMPDIR points into ``workdir`` so the test can find the master's metrics directory."""
    tmp = workdir / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    server = start_server(
        pki_dir,
        workdir,
        database={"url": f"sqlite:///{workdir / 'est.db'}"},
        server={"workers": 2},
        rate_limit={"enabled": False},
        **options,
    )
    result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config)
    assert result.exit_code == 0, result.output
    (metrics_dir,) = tmp.glob("est-metrics-*")
    assert metrics_dir.stat().st_mode & 0o777 == 0o700
    return server, metrics_dir


@pytest.mark.e2e
def test_counts_are_exact_across_workers_and_survive_a_worker_restart(pki_dir, tmp_path, monkeypatch):
    server, metrics_dir = _start(pki_dir, tmp_path, monkeypatch)
    try:
        assert _get(server, "/healthz") == (200, "ok\n")
        assert _get(server, "/readyz") == (200, "ready\n")
        start_count = _enrolled(_scrape_over_tls(server))
        assert start_count == 0

        # Batches of parallel enrollments, each on its own connection, until both workers have served some.
        sent = 0
        with ThreadPoolExecutor(max_workers=16) as pool:
            for batch in range(10):
                names = [f"DEV{batch:02d}{i:03d}" for i in range(24)]
                assert list(pool.map(lambda cn: _enroll_over_tls(server, cn), names)) == [200] * len(names)
                sent += len(names)
                per_worker = _enrollments_per_file(metrics_dir)
                if len([n for n in per_worker.values() if n > 0]) >= 2:
                    break
        assert len([n for n in per_worker.values() if n > 0]) == 2, per_worker
        assert sum(per_worker.values()) == sent

        # Whichever worker answers a scrape, the sum is exact.
        for _ in range(12):
            samples = _scrape_over_tls(server)
            assert _enrolled(samples) == sent
            assert value(samples, ISSUED, operation="simpleenroll", label="default") == sent
            assert value(samples, ENROLL_COUNT, operation="simpleenroll", label="default") == sent
            assert not any(n.startswith("process_") for n, _ in samples)  # they would be one random worker's

        # One worker is stopped; gunicorn replaces it. Its counts stay (counters never go back) and
        # are not counted twice: the replacement starts a file of its own at zero.
        master = server.process.pid
        workers = _workers(master)
        assert len(workers) == 2
        victim = next(pid for pid in workers if per_worker.get(pid))
        os.kill(victim, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            now = _workers(master)
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, f"gunicorn did not replace the worker:\n{server.log.read_text()}"
            time.sleep(0.1)
        assert len(now - workers) == 1, (now, workers, server.log.read_text())
        (replacement,) = now - workers
        assert (metrics_dir / f"counter_{victim}.db").exists()  # mark_process_dead keeps counter files

        for _ in range(12):
            assert _enrolled(_scrape_over_tls(server)) == sent
        with ThreadPoolExecutor(max_workers=16) as pool:
            more = [f"AFTER{i:03d}" for i in range(24)]
            assert list(pool.map(lambda cn: _enroll_over_tls(server, cn), more)) == [200] * len(more)
        for _ in range(12):
            samples = _scrape_over_tls(server)
            assert _enrolled(samples) == sent + len(more)
            assert value(samples, ISSUED, operation="simpleenroll", label="default") == sent + len(more)
        per_worker = _enrollments_per_file(metrics_dir)
        assert per_worker[victim] > 0 and replacement in per_worker
        assert sum(per_worker.values()) == sent + len(more)
        assert "NPP" not in _get(server, "/metrics")[1] and "DEV00" not in _get(server, "/metrics")[1]
    finally:
        server.stop()
    assert not metrics_dir.exists()  # the master removes its directory on the way out


@pytest.mark.e2e
def test_gunicorn_conf_launch_is_multiprocess_too(pki_dir, tmp_path, monkeypatch):
    server, metrics_dir = _start(pki_dir, tmp_path, monkeypatch, use_gunicorn_conf=True)
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            names = [f"CONF{i:03d}" for i in range(32)]
            assert list(pool.map(lambda cn: _enroll_over_tls(server, cn), names)) == [200] * len(names)
        assert len(_workers(server.process.pid)) == 2
        assert sum(_enrollments_per_file(metrics_dir).values()) == len(names)
        for _ in range(8):
            assert _enrolled(_scrape_over_tls(server)) == len(names)
        assert _get(server, "/readyz") == (200, "ready\n")
    finally:
        server.stop()
    assert not metrics_dir.exists()


def test_ocsp_responses_are_counted_by_response_status(client):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509 import ocsp

    with client.application.app_context():
        ca = state().authority.certificate
    known_issuer = ocsp.OCSPRequestBuilder().add_certificate(ca, ca, hashes.SHA1()).build().public_bytes(Encoding.DER)
    other_issuer = ocsp.OCSPRequestBuilder().add_certificate_by_hash(b"\x01" * 20, b"\x02" * 20, 7, hashes.SHA1()).build().public_bytes(Encoding.DER)
    headers = {"Content-Type": "application/ocsp-request"}
    before = scrape(client)
    for body in (known_issuer, known_issuer, known_issuer, b"\x30\x03not", other_issuer):
        assert client.post("/ocsp", data=body, headers=headers).status_code == 200
    after = scrape(client)
    assert delta(before, after, "est_ocsp_responses_total", response_status="successful") == 3
    assert delta(before, after, "est_ocsp_responses_total", response_status="malformedRequest") == 1
    assert delta(before, after, "est_ocsp_responses_total", response_status="unauthorized") == 1
    assert total(after, "est_ocsp_responses_total") - total(before, "est_ocsp_responses_total") == 5
