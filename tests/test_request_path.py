"""The per-request path of est-server (issue 11): TLS session resumption across workers, OCSP and /healthz
answered on the connection's greenlet, and a revocation in the very next OCSP answer whichever worker answers.

Real est-server over TLS on loopback, real clients: ``openssl s_client`` for resumption, curl for
enrollment and OCSP, ``est-admin`` for the revocation, ``sqlite3``'s write lock held from this process.
"""

from __future__ import annotations

import socket
import sqlite3
import ssl
import threading
import time

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from .conftest import PASSWORD, USER, run_cli
from .e2e_clients import call, curl, openssl_csr, pkcs7_certs, response_format, run
from .server import start_server
from .test_e2e import payload
from .test_revocation import ocsp_request, serial
from .test_slow_clients import serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_workers(pki_dir, tmp_path_factory):
    """est-server as `est init` configures it (two workers) with the test user."""
    server = serve(pki_dir, tmp_path_factory.mktemp("two-workers"), workers=2)
    yield server
    server.stop()


def s_client(server, session, *args: str) -> str:
    """One `openssl s_client` connection with ``-sess_in`` (when ``session`` exists) and ``-sess_out``; its report."""
    resume = ["-sess_in", str(session)] if session.exists() else []
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    result = run("openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-CAfile", server.ca_file, "-ign_eof",
                 *resume, "-sess_out", session, *args, input=request, check=False)  # fmt: skip
    # gunicorn closes after "Connection: close" without a TLS close_notify, which s_client reports as an
    # error exit; the answer and the session are what count.
    return result.stdout.decode(errors="replace")


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_a_reconnecting_client_resumes_its_tls_session_on_either_worker(two_workers, tmp_path, version):
    first = s_client(two_workers, tmp_path / "session.pem", version)
    assert "New, " in first and "HTTP/1.1 200" in first
    # With a context (and ticket keys) per worker, a reconnection landing on the other worker could not
    # resume: 8 in a row on one of two workers by chance is 1 in 256.
    for attempt in range(8):
        again = s_client(two_workers, tmp_path / "session.pem", version)
        assert "Reused, " in again, f"reconnection {attempt + 1} did not resume:\n{again}"
        assert "HTTP/1.1 200" in again


def enroll(server, cn: str) -> x509.Certificate:
    reply = call(server, "simpleenroll", "-u", f"{USER}:{PASSWORD}", "-H", "Content-Type: application/pkcs10", body=openssl_csr("ec", cn))
    (certificate,) = pkcs7_certs(payload(reply, response_format(server)))
    return certificate


def ocsp_status(server, certificate: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPCertStatus:
    """POST /ocsp over a new TLS connection (curl), so consecutive calls land on either worker."""
    reply = curl(f"{server.url}/ocsp", server.ca_file, "-H", "Content-Type: application/ocsp-request", data=ocsp_request(certificate, issuer))
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/ocsp-response"
    answer = ocsp.load_der_ocsp_response(reply.body)
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return answer.certificate_status


def test_a_revocation_shows_in_the_next_ocsp_answer_from_every_worker(two_workers):
    issuer = x509.load_pem_x509_certificate(two_workers.ca_file.read_bytes())
    certificate = enroll(two_workers, "NPPOCSP9")
    # Twelve answers over new connections: both workers have signed and cached "good".
    assert {ocsp_status(two_workers, certificate, issuer) for _ in range(12)} == {ocsp.OCSPCertStatus.GOOD}
    result = run_cli("cert", "revoke", serial(certificate), "--reason", "keyCompromise", config=two_workers.config)
    assert result.exit_code == 0, result.output
    assert [ocsp_status(two_workers, certificate, issuer) for _ in range(12)] == [ocsp.OCSPCertStatus.REVOKED] * 12


def test_ocsp_and_healthz_answer_while_an_enrollment_waits_for_the_database(pki_dir, tmp_path):
    """One worker, one app thread, an enrollment waiting for SQLite's write lock held by another program:
    OCSP and /healthz still answer, as the enrollment waits on its connection's greenlet cooperatively
    (SQLite's own busy handler would stop the worker's thread), and the enrollment completes after."""
    database = {"url": f"sqlite:///{tmp_path / 'est.db'}", "connect_timeout": 60}  # SQLite's busy timeout: the enrollment waits, not fails
    server = start_server(pki_dir, tmp_path, database=database, rate_limit={"enabled": False}, server={"workers": 1, "threads": 1})
    try:
        result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config)
        assert result.exit_code == 0, result.output
        issuer = x509.load_pem_x509_certificate(server.ca_file.read_bytes())
        certificate = enroll(server, "NPPOCSP8")
        assert ocsp_status(server, certificate, issuer) == ocsp.OCSPCertStatus.GOOD
        holder = sqlite3.connect(tmp_path / "est.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock: the next enrollment's commit waits for it
        enrolled: list = []
        waiting = threading.Thread(target=lambda: enrolled.append(enroll(server, "NPPOCSP7")))
        try:
            waiting.start()
            time.sleep(1.0)  # the enrollment has reached its commit and waits for the lock
            assert waiting.is_alive() and not enrolled, "the enrollment did not wait for the write lock"
            started = time.monotonic()
            assert ocsp_status(server, certificate, issuer) == ocsp.OCSPCertStatus.GOOD
            health = curl(f"{server.url}/healthz", server.ca_file)
            assert health.status == 200 and health.body == b"ok\n"
            assert time.monotonic() - started < 3.0  # generous on a loaded machine; an app-thread answer would wait ~s
            assert waiting.is_alive(), "the enrollment finished before the lock was released: the test proved nothing"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            waiting.join(timeout=60)
        assert len(enrolled) == 1  # and the enrollment itself completed once the lock was free
    finally:
        server.stop()


PIPELINED = 1000  # /healthz requests one client sends at once: about a third of a second of the worker's time
ASKS = 10  # single requests another client makes meanwhile, one after the other


def test_a_client_with_requests_queued_does_not_keep_the_worker_from_the_others(pki_dir, tmp_path):
    """One worker. A client sends 1,000 requests at once (pipelined: each is in the worker's buffer when the one
    before is answered); once its first answer is in, another client asks 10 times, one request after the other.
    Those 10 answers take 2-3% of the time the first client's take: an answered connection lets the worker's
    other connections go before its next request is read. With gevent.sleep(0) instead, the hub resumed it
    before polling the others, and the 10 answers took 44-49% of that time, waiting on the first client's."""
    server = serve(pki_dir, tmp_path, workers=1)
    context = ssl.create_default_context(cafile=str(server.ca_file))
    greedy, other = (context.wrap_socket(socket.socket(), server_hostname="127.0.0.1") for _ in range(2))
    try:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # room for its answers, read at the end
        for conn in (greedy, other):
            conn.settimeout(30)
            conn.connect(("127.0.0.1", server.port))
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        other.sendall(request)
        read_answers(other, 1)  # handshaken and answered once: its greenlet now waits for its next request
        started = time.monotonic()
        greedy.sendall(request * PIPELINED)
        first = bytearray(greedy.recv(262144))
        assert first.count(b"HTTP/1.1 200 ") < PIPELINED, "all the first client's answers came at once: nothing was shown"
        asking = time.monotonic()
        for _ in range(ASKS):
            other.sendall(request)
            read_answers(other, 1)
        asked = time.monotonic() - asking
        read_answers(greedy, PIPELINED, first)
        took = time.monotonic() - started
        assert asked < took / 5, f"the other client's {ASKS} answers took {asked * 1000:.0f} ms, the first client's {PIPELINED} took {took * 1000:.0f} ms"
    finally:
        greedy.close()
        other.close()
        server.stop()


def read_answers(conn: ssl.SSLSocket, count: int, into: bytearray | None = None) -> bytearray:
    """Read from ``conn`` until ``into`` (or a new buffer) holds ``count`` /healthz answers (200, body "ok\\n")."""
    data = bytearray() if into is None else into
    marker, found = b"HTTP/1.1 200 ", data.count(b"HTTP/1.1 200 ")
    while found < count or not data.endswith(b"ok\n"):
        chunk = conn.recv(262144)
        assert chunk, f"connection closed after {found} answers"
        found += (data[-len(marker) + 1 :] + chunk).count(marker)  # a marker split between reads counts once
        data += chunk
    return data
