"""Two est-server hosts behind HAProxy on one PostgreSQL database, rate limits shared in Redis.

Everything is real: a throwaway PostgreSQL cluster (tests/postgres.py), redis-server
(tests/redis_server.py), HAProxy running deploy/haproxy.cfg as shipped with loopback
addresses swapped in (tests/haproxy.py), and two `est-server` instances (own instance
directories and ports, the same CA files, the same database). The proxy reaches the
hosts from 127.0.0.2 (their trusted proxy) for terminated TLS and from 127.0.0.3 (not
trusted) for passed-through TLS. Through the proxy this proves: enrollments land on both
hosts; a revocation made on one host is in the other's OCSP answers and CRL at once; one
device enrolled on both hosts at once stays one device; `kill -9` of a host under load
loses no certificate and the proxy routes around it, and back when it returns; the client
certificate reaches the hosts as HAProxy forwards it and cannot be forged; tls-unique
proof of possession works on the passthrough port; one client's rate limit is counted
once across both hosts, and enrollment goes on when Redis is down; with PostgreSQL down
the proxy still reaches the hosts (none is ready, all are alive) and they recover alone.
"""

from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from prometheus_client.parser import text_string_to_metric_families

from est_app.store import Store

from .benchmarks.bench_enroll import process_tree
from .conftest import PASSWORD, USER, run_cli
from .haproxy import TRUSTED_SOURCE, HAProxy
from .pki import der, ec_key, make_csr
from .postgres import database_section
from .redis_server import RedisServer
from .server import RunningServer, _answers, _launch, start_server, write_config
from .test_e2e_ra import mint_client_certificate, pop_csr, post_on_one_connection

pytestmark = pytest.mark.e2e

ADMIN, ADMIN_PASSWORD = "operator", "operator password for the HA test"
LABELS = {"pumps": {"auth": ["cert"]}, "pop": {"require_pop": True}, "unique": {"duplicate_policy": "reject"}}
RETRYABLE = (502, 503, 504)  # the proxy's answers while a host dies, the host's while it cannot commit


# --- the cluster -------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """Where a client connects: a host directly, the proxy, or the proxy's passthrough port."""

    port: int
    ca_file: Path


@dataclass
class Cluster:
    """Two hosts (est-a, est-b) on one database behind the proxy; ``store`` reads that database directly."""

    pki_dir: Path
    database_url: str
    hosts: list[RunningServer]
    workdirs: list[Path]
    overrides: dict
    proxy: HAProxy
    store: Store = field(init=False)

    def __post_init__(self) -> None:
        self.store = Store(self.database_url)

    @property
    def front(self) -> Endpoint:
        return Endpoint(self.proxy.port, self.pki_dir / "ca.pem")

    @property
    def passthrough(self) -> Endpoint:
        return Endpoint(self.proxy.passthrough_port, self.pki_dir / "ca.pem")

    def host(self, index: int) -> Endpoint:
        return Endpoint(self.hosts[index].port, self.pki_dir / "ca.pem")

    def kill(self, index: int) -> None:
        """``kill -9`` of the host's gunicorn master and every worker, as if the machine died."""
        server = self.hosts[index]
        for pid in process_tree(server.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.process.wait()

    def restart(self, index: int) -> None:
        """Start the host again on its port, with its configuration (the proxy knows it by its port)."""
        old = self.hosts[index]
        server = _launch(self.pki_dir, self.workdirs[index], old.port, False, None, (), self.overrides)
        assert _answers(server), f"host {index} could not take its port back:\n{server.log.read_text()}"
        self.hosts[index] = server

    def stop(self) -> None:
        self.proxy.stop()
        for server in self.hosts:
            server.stop()
        self.store.engine.dispose()


def start_cluster(pki_dir: Path, workdir: Path, database_url: str, users: dict[tuple[str, ...], str], **overrides) -> Cluster:
    """Two hosts and the proxy; ``users`` ({(name, *options): password}) are added through the CLI first.

    The CLI also creates the schema, in one process: hosts whose workers all start on an empty
    PostgreSQL database race to create it (Store.create_schema serialises only within a process).
    """
    overrides = {
        "database": database_section(database_url, workdir),
        "trusted_proxies": [TRUSTED_SOURCE],
        "labels": LABELS,
        "server": {"workers": 2},
        "rate_limit": {"enabled": False},
        **overrides,
    }
    cli_config = write_config(pki_dir, workdir / "cli.yaml", 8445, **overrides)
    for args, secret in users.items():
        result = run_cli("user", "add", *args, input=secret + "\n", config=cli_config)
        assert result.exit_code == 0, result.output
    workdirs = [workdir / "est-a", workdir / "est-b"]
    hosts: list[RunningServer] = []
    proxy = None
    try:
        for directory in workdirs:
            directory.mkdir()
            hosts.append(start_server(pki_dir, directory, **overrides))
        proxy = HAProxy(pki_dir, workdir, (hosts[0].port, hosts[1].port))
        proxy.start()
    except BaseException:
        for server in hosts:
            server.stop()
        if proxy is not None:
            proxy.stop()
        raise
    return Cluster(pki_dir, database_url, hosts, workdirs, overrides, proxy)


@pytest.fixture(scope="module")
def client_certs(pki_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("ha-client-certs")
    return {"ra": mint_client_certificate(pki_dir, out, "IQE-Gateway-HA")}


@pytest.fixture(scope="module")
def cluster(pki_dir, postgres_cluster, tmp_path_factory, client_certs):
    database_url = postgres_cluster.url(postgres_cluster.create_database())
    users = {(USER,): PASSWORD, (ADMIN, "--admin"): ADMIN_PASSWORD}
    running = start_cluster(pki_dir, tmp_path_factory.mktemp("ha"), database_url, users)
    try:
        result = run_cli("ra", "add", str(client_certs["ra"][0]), "--label", "pumps", config=running.hosts[0].config)
        assert result.exit_code == 0, result.output
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# --- clients -----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes


def request(endpoint: Endpoint, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            auth: tuple[str, str] | None = (USER, PASSWORD), cert: tuple[Path, Path] | None = None, timeout: float = 60,
            source: str = "127.0.0.1") -> Answer:
    """One request on a new TLS connection (so the proxy balances each one), from the loopback address ``source``."""
    context = ssl.create_default_context(cafile=str(endpoint.ca_file))
    if cert:
        context.load_cert_chain(*map(str, cert))
    conn = http.client.HTTPSConnection("127.0.0.1", endpoint.port, context=context, timeout=timeout, source_address=(source, 0))
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.read())
    finally:
        conn.close()


def enroll(endpoint: Endpoint, cn: str, label: str = "", **kwargs) -> Answer:
    body = base64.b64encode(der(make_csr(cn, key=ec_key())))
    path = f"/.well-known/est/{label + '/' if label else ''}simpleenroll"
    return request(endpoint, "POST", path, body, {"Content-Type": "application/pkcs10"}, **kwargs)


def certificate(answer: Answer) -> x509.Certificate:
    assert answer.status == 200, answer
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.body))
    return cert


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def issued_count(endpoint: Endpoint, label: str = "default") -> float:
    """``est_certificates_issued_total`` for simpleenroll on ``label``, from this host's /metrics (loopback may read it)."""
    answer = request(endpoint, "GET", "/metrics", auth=None)
    assert answer.status == 200, answer
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            if sample.name == "est_certificates_issued_total" and sample.labels == {"operation": "simpleenroll", "label": label}:
                return sample.value
    return 0.0


def requests_answered(endpoint: Endpoint, operation: str, status: int) -> float:
    answer = request(endpoint, "GET", "/metrics", auth=None)
    total = 0.0
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            if sample.name == "est_requests_total" and sample.labels.get("operation") == operation and sample.labels.get("status") == str(status):
                total += sample.value
    return total


# --- load balancing, shared database -----------------------------------------------------------


def test_enrollments_reach_both_hosts(cluster):
    before = [issued_count(cluster.host(i)) for i in (0, 1)]
    certificates = [certificate(enroll(cluster.front, f"NPPHA{i:03d}")) for i in range(12)]
    gained = [issued_count(cluster.host(i)) - before[i] for i in (0, 1)]
    assert all(g > 0 for g in gained), f"enrollments per host {gained}: the proxy sent everything to one host"
    assert sum(gained) == 12
    for cert in certificates:
        record = cluster.store.get_certificate(serial(cert))
        assert record is not None and record.der == cert.public_bytes(serialization.Encoding.DER)


def ocsp_status(endpoint: Endpoint, cert: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPCertStatus:
    request_der = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)
    answer = request(endpoint, "POST", "/ocsp", request_der, {"Content-Type": "application/ocsp-request"}, auth=None)
    assert answer.status == 200, answer
    response = ocsp.load_der_ocsp_response(answer.body)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return response.certificate_status


def crl_of(endpoint: Endpoint) -> x509.CertificateRevocationList:
    answer = request(endpoint, "GET", "/crl", auth=None)
    assert answer.status == 200, answer
    return x509.load_der_x509_crl(answer.body)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_revocation_on_one_host_is_served_by_the_other_at_once(cluster):
    host_a, host_b = cluster.host(0), cluster.host(1)
    ca = x509.load_pem_x509_certificate((cluster.pki_dir / "ca.pem").read_bytes())
    cert = certificate(enroll(cluster.front, "NPPHAREVOKE"))
    # Host B has served the CRL (and cached it) and vouched for the certificate before the revocation.
    cached = crl_of(host_b)
    assert cached.get_revoked_certificate_by_serial_number(cert.serial_number) is None
    assert ocsp_status(host_b, cert, ca) == ocsp.OCSPCertStatus.GOOD

    answer = request(host_a, "POST", f"/api/v1/certificates/{serial(cert)}/revoke", b'{"reason": "keyCompromise"}',
                     {"Content-Type": "application/json"}, auth=(ADMIN, ADMIN_PASSWORD))
    assert answer.status == 200, answer

    assert ocsp_status(host_b, cert, ca) == ocsp.OCSPCertStatus.REVOKED
    crl_b = crl_of(host_b)
    assert crl_b.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl_number(crl_b) > crl_number(cached)
    assert crl_number(crl_b) == crl_number(crl_of(host_a)) == cluster.store.current_crl_number()
    assert crl_b.is_signature_valid(ca.public_key())


@pytest.mark.parametrize("label, policy", [("", "renew"), ("unique", "reject")])
def test_one_device_enrolled_on_both_hosts_at_once_is_one_device(cluster, label, policy):
    cn = f"NPPHARACE{policy.upper()}"
    endpoints = [cluster.host(i % 2) for i in range(8)]
    start = threading.Barrier(len(endpoints))

    def attempt(endpoint: Endpoint) -> Answer:
        start.wait(timeout=60)
        return enroll(endpoint, cn, label)

    with ThreadPoolExecutor(len(endpoints)) as pool:
        answers = list(pool.map(attempt, endpoints))
    statuses = sorted(a.status for a in answers)
    (device,) = [d for d in cluster.store.find_devices(label=label or "default") if d.device_key == cn]
    records = cluster.store.device_certificates(device.id)
    if policy == "renew":
        assert statuses == [200] * 8, [(a.status, a.body[:200]) for a in answers]
        assert len(records) == 8
        assert [r.status for r in records].count("valid") == 1  # the others superseded
        assert device.current_serial == next(r.serial for r in records if r.status == "valid")
    else:
        assert statuses == [200] + [409] * 7, [(a.status, a.body[:200]) for a in answers]
        (record,) = records
        assert record.serial == serial(certificate(next(a for a in answers if a.status == 200)))


# --- a host dies -------------------------------------------------------------------------------


class EnrollmentLoad:
    """Client threads enrolling through the proxy, each retrying what a dying host left unanswered."""

    def __init__(self, endpoint: Endpoint, clients: int) -> None:
        self.endpoint = endpoint
        self.clients = clients
        self.received: list[tuple[float, x509.Certificate]] = []
        self.failures: list[tuple[float, int, bytes]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, client: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                answer = enroll(self.endpoint, f"NPPLOAD{client:02d}{n:05d}", timeout=30)
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
                continue
            with self._lock:
                if answer.status == 200:
                    self.received.append((time.monotonic(), certificate(answer)))
                else:
                    self.failures.append((time.monotonic(), answer.status, answer.body[:200]))
            if answer.status != 200:
                time.sleep(0.1)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def received_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for at, _ in self.received if at > moment)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.2)


def test_kill_9_of_a_host_under_load_loses_nothing_and_it_rejoins(cluster):
    proxy = cluster.proxy
    load = EnrollmentLoad(cluster.front, clients=6)
    load.start()
    try:
        wait_until(lambda: load.received_since(0) >= 20, 120, "20 enrollments before the kill")
        cluster.kill(0)
        killed_at = time.monotonic()
        proxy.wait_for(lambda s: s[("est_hosts", "est-a")].startswith("DOWN"), 60, "est-a marked DOWN")
        down_at = time.monotonic()
        # Clients carry on through host B.
        wait_until(lambda: load.received_since(down_at) >= 20, 120, "20 enrollments through host B after est-a went down")
    finally:
        load.stop()
    assert not any(t.is_alive() for t in load._threads)

    # Whatever went wrong was the dying host's: only while it died, and only retryable answers.
    assert all(status in RETRYABLE for _, status, _ in load.failures), load.failures
    assert all(at < down_at + 5 for at, _, _ in load.failures), (killed_at, down_at, load.failures)
    # Every certificate a client received is in PostgreSQL, byte for byte; no serial twice.
    serials = [serial(cert) for _, cert in load.received]
    assert len(serials) == len(set(serials)), "a serial was issued twice"
    for _, cert in load.received:
        record = cluster.store.get_certificate(serial(cert))
        assert record is not None, f"certificate {serial(cert)} was returned but is not in the database"
        assert record.der == cert.public_bytes(serialization.Encoding.DER)

    # Host A comes back: the proxy marks it up and sends it requests again.
    cluster.restart(0)
    proxy.wait_for(lambda s: s[("est_hosts", "est-a")] == "UP", 60, "est-a UP again")
    for i in range(6):
        certificate(enroll(cluster.front, f"NPPHABACK{i}"))
    assert issued_count(cluster.host(0)) > 0, "the restarted host was given no enrollment"


# --- what crosses the proxy: client certificates, tls-unique ---------------------------------------


def test_client_certificate_is_forwarded_by_the_proxy_and_cannot_be_forged(cluster, client_certs):
    ra_cert_path, _ = client_certs["ra"]
    ra_der = x509.load_pem_x509_certificate(ra_cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    forged = {"X-SSL-Client-Cert": base64.b64encode(ra_der).decode(), "X-Forwarded-For": "192.0.2.99"}

    # The RA's own TLS client certificate, verified by HAProxy and forwarded as base64 DER.
    cert = certificate(enroll(cluster.front, "NPPHARA1", "pumps", auth=None, cert=client_certs["ra"]))
    record = cluster.store.get_certificate(serial(cert))
    assert record.requester.startswith("ra:")
    (device,) = [d for d in cluster.store.find_devices(label="pumps") if d.device_key == "NPPHARA1"]
    assert device.client_address == "127.0.0.1"  # X-Forwarded-For set by the proxy: the real client

    # A client sending the header itself: the proxy replaces it (terminated port) ...
    body = base64.b64encode(der(make_csr("NPPHAFORGED", key=ec_key())))
    headers = {"Content-Type": "application/pkcs10", **forged}
    answer = request(cluster.front, "POST", "/.well-known/est/pumps/simpleenroll", body, headers, auth=None)
    assert answer.status == 401 and b"authentication required" in answer.body, answer
    # ... and the hosts do not believe it from the passthrough path's address.
    answer = request(cluster.passthrough, "POST", "/.well-known/est/pumps/simpleenroll", body, headers, auth=None)
    assert answer.status == 401 and b"authentication required" in answer.body, answer
    assert not [d for d in cluster.store.find_devices(label="pumps") if d.device_key == "NPPHAFORGED"]


def test_proof_of_possession_label_is_served_through_the_passthrough_port(cluster):
    status, version, body, _ = post_on_one_connection(cluster.passthrough, "pop/simpleenroll", "1.2", pop_csr("NPPHAPOP1", "tls-unique"))
    assert (status, version) == (200, "TLSv1.2"), body
    # Through the terminating port the TLS session is the proxy's: the label refuses.
    status, _, body, _ = post_on_one_connection(cluster.front, "pop/simpleenroll", "1.2", pop_csr("NPPHAPOP2", "tls-unique"))
    assert status == 401 and b"requires proof-of-possession linking" in body, body


def trickle(endpoint: Endpoint, head: bytes, body: bytes, every: float = 1.0) -> tuple[bytes, float]:
    """Send ``head`` at once, then ``body`` one byte every ``every`` seconds (or ``head`` byte by byte when
    ``body`` is empty); return the first bytes of the answer and the seconds until it came."""
    context = ssl.create_default_context(cafile=str(endpoint.ca_file))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", endpoint.port), timeout=90), server_hostname="localhost") as conn:
        started = time.monotonic()
        slow, fast = (body, head) if body else (head, b"")
        conn.sendall(fast)
        try:
            for byte in slow:
                conn.sendall(bytes([byte]))
                time.sleep(every)
        except OSError:
            pass  # cut by the proxy: its answer is waiting
        return conn.recv(64), time.monotonic() - started


def test_slow_clients_are_cut_at_the_proxy(cluster):
    """The proxy's deadlines: headers within 10 s (timeout http-request), a body within 20 s of them
    (wait-for-body); its own 408, the hosts never see the request."""
    before = [requests_answered(cluster.host(i), "simpleenroll", 408) for i in (0, 1)]
    slow_headers = (b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: est.hospital.example\r\nX-Padding: " + b"x" * 60, b"")
    slow_body = (b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: est.hospital.example\r\n"
                 b"Content-Type: application/pkcs10\r\nContent-Length: 100\r\n\r\n", b"A" * 100)
    with ThreadPoolExecutor(2) as pool:
        (headers_answer, headers_after), (body_answer, body_after) = pool.map(lambda hb: trickle(cluster.front, *hb), (slow_headers, slow_body))
    assert headers_answer.startswith(b"HTTP/1.1 408") and 9 < headers_after < 30, (headers_answer, headers_after)
    assert body_answer.startswith(b"HTTP/1.1 408") and 19 < body_after < 45, (body_answer, body_after)
    assert [requests_answered(cluster.host(i), "simpleenroll", 408) for i in (0, 1)] == before


# --- rate limits in Redis -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_cluster(pki_dir, postgres_cluster, redis_server, tmp_path_factory):
    database_url = postgres_cluster.url(postgres_cluster.create_database())
    limit = {"enabled": True, "limit": "10 per hour", "storage_uri": redis_server.url}
    running = start_cluster(pki_dir, tmp_path_factory.mktemp("ha-limited"), database_url, {(USER,): PASSWORD},
                            rate_limit=limit, server={"workers": 1})
    try:
        yield running
    finally:
        running.stop()


def test_rate_limit_is_counted_once_across_hosts_and_redis_down_keeps_enrollment(limited_cluster, redis_server):
    # A client of its own (the start-up probes counted for 127.0.0.1).
    client = "127.0.0.7"
    cacerts = [request(limited_cluster.front, "GET", "/.well-known/est/cacerts", auth=None, source=client).status for _ in range(30)]
    assert cacerts.count(200) == 10 and cacerts.count(429) == 20, cacerts  # 2 hosts counting apart: 20 and 10
    for i in (0, 1):  # both hosts answered, and both refused: they share the count
        host = limited_cluster.host(i)
        assert requests_answered(host, "cacerts", 200) > 0 and requests_answered(host, "cacerts", 429) > 0

    redis_server.stop()
    try:
        # Each worker counts in memory from zero: the client is answered again, and enrollment works.
        answers = [enroll(limited_cluster.front, f"NPPHANOREDIS{i}", source=client) for i in range(4)]
        assert [a.status for a in answers] == [200] * 4, answers
        for answer in answers:
            assert limited_cluster.store.get_certificate(serial(certificate(answer))) is not None
        # The limit still holds, per worker: 2 hosts x 1 worker x 10.
        more = [request(limited_cluster.front, "GET", "/.well-known/est/cacerts", auth=None, source=client).status for _ in range(24)]
        assert more.count(429) >= 4 and 500 not in more, more
    finally:
        redis_server.start()
    logs = "".join(h.log.read_text() for h in limited_cluster.hosts)
    assert "falling back to in-memory storage" in logs


# --- the database is down (last: the hosts' pools hold dead connections afterwards) -----------------


@contextmanager
def database_down(cluster: Cluster, postgres_cluster):
    """PostgreSQL stopped as if it crashed, until the proxy has taken both hosts out of the ready pool;
    afterwards started again, and both hosts ready again, without a restart."""
    ready = ("est_hosts", "est-a"), ("est_hosts", "est-b")
    postgres_cluster.stop("immediate")
    try:
        cluster.proxy.wait_for(lambda s: all(s[k].startswith("DOWN") for k in ready), 60, "both hosts out of the ready pool")
        yield
    finally:
        postgres_cluster.start()
        cluster.store.engine.dispose()  # this test's own pooled connections died with the server
    cluster.proxy.wait_for(lambda s: all(s[k] == "UP" for k in ready), 60, "both hosts ready again")


def test_database_down_the_proxy_still_reaches_the_hosts_and_they_recover(cluster, postgres_cluster):
    with database_down(cluster, postgres_cluster):
        states = cluster.proxy.server_states()
        assert states[("est_hosts_alive", "est-a")] == states[("est_hosts_alive", "est-b")] == "UP"
        # Answered by a host (the CA chain needs no database), not by the proxy's "no server available".
        answer = request(cluster.front, "GET", "/.well-known/est/cacerts", auth=None)
        assert answer.status == 200 and pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.body))
    # Recovery without a restart. (The first query on a connection pooled before the outage may still
    # fail once: the pool's stale connections are the store's to check, est_app/store, "pg" engineer.)
    answers = [enroll(cluster.front, f"NPPHADBBACK{i}") for i in range(3)]
    assert 200 in [a.status for a in answers], answers


def test_database_down_crl_ocsp_and_enrollment_answer_as_designed_through_the_proxy(cluster, postgres_cluster):
    ca = x509.load_pem_x509_certificate((cluster.pki_dir / "ca.pem").read_bytes())
    cert = certificate(enroll(cluster.front, "NPPHADBDOWN"))
    before = [crl_of(cluster.host(i)) for i in (0, 1)]  # each host holds the current CRL
    with database_down(cluster, postgres_cluster):
        assert crl_of(cluster.front).public_bytes(serialization.Encoding.DER) == before[0].public_bytes(serialization.Encoding.DER)
        request_der = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)
        answer = request(cluster.front, "POST", "/ocsp", request_der, {"Content-Type": "application/ocsp-request"}, auth=None)
        assert answer.status == 200 and ocsp.load_der_ocsp_response(answer.body).response_status == ocsp.OCSPResponseStatus.TRY_LATER
        answer = enroll(cluster.front, "NPPHADBDOWN2")
        assert answer.status == 503, answer
