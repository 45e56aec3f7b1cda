"""The database goes down under a running server, and comes back.

A real gunicorn server (TLS, 2 workers) on a PostgreSQL cluster of this module's own (the
session's cluster is shared), which is stopped and started again under it, once as a clean
shutdown and once as a crash. While it is down: enrollment, re-enrollment and admin writes
answer 503 with ``Retry-After`` and one line, quickly, whatever the credentials (never 401, 500
or a hang); ``/readyz`` fails naming the store; ``cacerts`` and the CRL held are served; OCSP
answers ``tryLater``. When it is back the same server process enrolls again, no restart. A worker that starts
during the outage comes up and does the same.

SQLite: a database locked by another writer past ``statement_timeout`` is a 503 as well.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp

from est_app import SchemaCheck, create_app
from est_app.store import Store
from est_app.store.schema import crls

from .conftest import PASSWORD, USER, basic_auth, open_store, run_cli
from .e2e_clients import Reply, call, curl
from .pki import der, make_csr, pem
from .postgres import PostgresCluster
from .server import RunningServer, free_port, start_server, write_config

ADMIN = "operator"
# connect_timeout is 5 s and a stopped server refuses at once; a loaded 2-core machine gets a wide margin.
QUICK_SECONDS = 15


@pytest.fixture(scope="module")
def cluster():
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture(scope="module")
def server(cluster, pki_dir, tmp_path_factory):
    name = cluster.create_database()
    store = Store(cluster.url(name))
    store.create_schema()  # before two workers race to create it
    store.engine.dispose()
    workdir = tmp_path_factory.mktemp("db-down")
    database = {"url": cluster.url(name, password=False), "password_file": str(cluster.password_file)}
    config = write_config(pki_dir, workdir / "admin.yaml", 0, database=database)
    for args in (("user", "add", USER), ("user", "add", ADMIN, "--admin")):
        result = run_cli(*args, input=PASSWORD + "\n", config=config)
        assert result.exit_code == 0, result.output
    result = run_cli("crl", config=config)  # a server in service has its CRL, which each worker reads when it starts
    assert result.exit_code == 0, result.output
    running = start_server(pki_dir, workdir, server={"workers": 2}, rate_limit={"enabled": False}, response_format="der", database=database)
    yield running
    running.stop()


def auth(user: str = USER, password: str = PASSWORD) -> tuple[str, str]:
    return ("--user", f"{user}:{password}")


def enroll(server: RunningServer, key, cn: str, *credentials: str) -> Reply:
    return call(server, "simpleenroll", *(credentials or auth()), "--header", "Content-Type: application/pkcs10", body=der(make_csr(cn, key=key)))


def reenroll(server: RunningServer, cert_file: Path, key_file: Path, key, cn: str) -> Reply:
    return call(server, "simplereenroll", "--cert", str(cert_file), "--key", str(key_file), "--header", "Content-Type: application/pkcs10",
                body=der(make_csr(cn, key=key)))


def issued(reply: Reply) -> x509.Certificate:
    assert reply.status == 200, reply.body
    (cert,) = pkcs7.load_der_pkcs7_certificates(reply.body)
    return cert


def get(server: RunningServer, path: str, *args: str, data: bytes | None = None) -> Reply:
    return curl(f"{server.url}{path}", server.ca_file, *args, data=data)


def ocsp_of(server: RunningServer, cert: x509.Certificate, ca: x509.Certificate) -> ocsp.OCSPResponse:
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)
    reply = get(server, "/ocsp", "--header", "Content-Type: application/ocsp-request", data=request)
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/ocsp-response"
    return ocsp.load_der_ocsp_response(reply.body)


def revoke(server: RunningServer, serial: str) -> Reply:
    """An admin API write: revoke ``serial``."""
    return get(server, f"/api/v1/certificates/{serial}/revoke", *auth(ADMIN), "--header", "Content-Type: application/json", data=b'{"reason": "keyCompromise"}')


def unavailable(reply: Reply, started: float) -> None:
    """A 503 with Retry-After and one line, within QUICK_SECONDS of ``started``."""
    elapsed = time.monotonic() - started
    body = reply.body.decode()
    assert reply.status == 503, (reply.status, body)
    assert int(reply.headers["Retry-After"]) > 0
    assert elapsed < QUICK_SECONDS, elapsed
    assert body.count("\n") == 1 and "database is unavailable" in body, body


@pytest.mark.e2e
@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
def test_a_database_outage_costs_writes_a_503_and_recovers_by_itself(server, cluster, pki_dir, tmp_path, stop_mode):
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cn = f"NPPDOWN{stop_mode.upper()}"
    cert = issued(enroll(server, key, cn))
    cert_file, key_file = tmp_path / "pump.pem", tmp_path / "pump.key"
    cert_file.write_bytes(pem(cert))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open_store(server.config).engine.connect() as conn:  # every CRL signed so far: a worker holds the newest it has seen
        issued_crls = set(conn.execute(sa.select(crls.c.der)).scalars())
    assert ocsp_of(server, cert, ca).certificate_status == ocsp.OCSPCertStatus.GOOD
    cacerts = call(server, "cacerts").body
    serial = format(cert.serial_number, "x")

    cluster.stop(stop_mode)
    try:
        for credentials in (auth(), auth(USER, "wrong password"), ()):  # a down store is not a reason to refuse a password
            started = time.monotonic()
            unavailable(enroll(server, key, cn, *credentials) if credentials else enroll(server, key, cn), started)
        started = time.monotonic()
        unavailable(reenroll(server, cert_file, key_file, key, cn), started)
        started = time.monotonic()
        admin_revoke = revoke(server, serial)
        assert admin_revoke.status == 503 and admin_revoke.headers["Retry-After"], admin_revoke.body
        assert "database is unavailable" in admin_revoke.body.decode() and admin_revoke.headers["Content-Type"].startswith("application/json")
        assert time.monotonic() - started < QUICK_SECONDS

        started = time.monotonic()
        ready = get(server, "/readyz")
        assert ready.status == 503 and ready.body == b"not ready: store failed (OperationalError)\n", ready.body
        assert time.monotonic() - started < QUICK_SECONDS

        for _ in range(6):  # both workers, whichever each request reaches
            assert call(server, "cacerts").body == cacerts
            served = get(server, "/crl")
            assert served.status == 200 and served.body in issued_crls
            answer = ocsp_of(server, cert, ca)
            assert answer.response_status == ocsp.OCSPResponseStatus.TRY_LATER
        malformed = get(server, "/ocsp", "--header", "Content-Type: application/ocsp-request", data=b"\x30\x03\x02\x01\x01")
        assert ocsp.load_der_ocsp_response(malformed.body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    finally:
        cluster.start()

    # The same server process, no restart: every worker's first request after the outage works.
    for _ in range(4):
        assert get(server, "/readyz").status == 200
    new = issued(reenroll(server, cert_file, key_file, key, cn))
    assert open_store(server.config).get_certificate(serial).status == "superseded"
    assert issued(enroll(server, key, f"{cn}B")).subject != new.subject
    assert ocsp_of(server, new, ca).certificate_status == ocsp.OCSPCertStatus.GOOD
    revoked = revoke(server, format(new.serial_number, "x"))
    assert revoked.status == 200, revoked.body
    assert ocsp_of(server, new, ca).certificate_status == ocsp.OCSPCertStatus.REVOKED


def test_a_locked_sqlite_database_is_a_503(make_app, tmp_path):
    """Another writer holds SQLite's write lock past statement_timeout: enrollment waits that long, then 503."""
    app = make_app(database={"statement_timeout": 1})
    client = app.test_client()
    holder = sqlite3.connect(tmp_path / "est.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        response = client.post("/.well-known/est/simpleenroll", data=der(make_csr("NPPLOCK1")),
                               headers={"Content-Type": "application/pkcs10", **basic_auth()})
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503 and response.headers["Retry-After"], response.get_data(as_text=True)
    assert response.get_data(as_text=True) == "the database is unavailable; try again later\n"
    assert 1 <= elapsed < QUICK_SECONDS
    response = client.post("/.well-known/est/simpleenroll", data=der(make_csr("NPPLOCK1")),
                           headers={"Content-Type": "application/pkcs10", **basic_auth()})
    assert response.status_code == 200


@pytest.mark.e2e
def test_a_restarted_database_is_used_again_at_once(server, cluster):
    """Pooled connections die with the database; a restart in between requests is not seen by any client."""
    key = ec.generate_private_key(ec.SECP256R1())
    for i in range(6):  # connections pooled in both workers
        issued(enroll(server, key, f"NPPPOOL{i}"))
    cluster.stop("fast")
    cluster.start()
    for i in range(6):
        issued(enroll(server, key, f"NPPPOOL{i}"))
        assert get(server, "/readyz").status == 200


def test_a_worker_started_with_the_database_down_serves_what_it_can_and_recovers(cluster, make_settings, password_hash, monkeypatch):
    # gunicorn stops the whole server when a worker fails to boot: a worker starting during an outage must come up.
    name = cluster.create_database()  # empty: the schema is created once the database answers
    database = {"url": cluster.url(name, password=False), "password_file": str(cluster.password_file)}
    monkeypatch.setattr(SchemaCheck, "RETRY_SECONDS", 0)  # every request tries the database again: no waiting in a test
    cluster.stop("fast")
    try:
        app = create_app(make_settings(database=database, rate_limit={"enabled": False}))
        client = app.test_client()
        assert client.get("/.well-known/est/cacerts").status_code == 200
        assert client.get("/healthz").status_code == 200
        started = time.monotonic()
        refused = client.post("/.well-known/est/simpleenroll", data=der(make_csr("NPPSTART")),
                              headers={"Content-Type": "application/pkcs10", **basic_auth()})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.get_data()
        assert time.monotonic() - started < QUICK_SECONDS
        assert client.get("/readyz").status_code == 503
    finally:
        cluster.start()
    assert client.get("/readyz").status_code == 200, client.get("/readyz").get_data()
    with app.app_context():
        app.extensions["est_app"].store.add_user(USER, password_hash)
    enrolled = client.post("/.well-known/est/simpleenroll", data=der(make_csr("NPPSTART")),
                           headers={"Content-Type": "application/pkcs10", **basic_auth()})
    assert enrolled.status_code == 200, enrolled.get_data()


def test_est_admin_with_the_database_down_says_so_in_one_line(make_config):
    config = make_config(database={"url": f"postgresql+psycopg://est@127.0.0.1:{free_port()}/est"})  # nothing listens there
    for command in (("user", "list"), ("device", "list"), ("audit",)):
        result = run_cli(*command, config=config)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("Error: the database is unavailable (") and "fix database.url" in result.output, result.output
