"""Schema migrations (Alembic, est_app/store/migrations/) on both backends: a real SQLite file and PostgreSQL.

- A database at revision 0001 filled with every kind of row, upgraded by `est-admin db upgrade`,
  keeps every row, and a real server on it enrolls, answers OCSP and lists and filters devices.
- A database made before migrations (tests/data/schema-before-migrations.*.sql: the DDL the last
  version's Store.create_schema() wrote, dumped from it) is refused at start-up in one line naming
  the command, and upgrades in place; one lacking a column is refused, untouched.
- The head matches schema.py (Alembic's compare_metadata), down to 0001 and back.
- The device row's copy of its current certificate's status and expiry follows every write,
  and the indexed search and filters give what the plain scan gives.
- Processes starting on one empty database, or upgrading one at once, take turns.
"""

from __future__ import annotations

import json
import sqlite3
import ssl
import threading
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from werkzeug.security import generate_password_hash

from est_app import create_app
from est_app.ca import load_authority
from est_app.ca.crl import build_crl
from est_app.config import ConfigError, load_config
from est_app.store import AuditEvent, CertificateRecord, Store, migrations
from est_app.store.migrations import baseline
from est_app.store.reports import Reports
from est_app.store.schema import certificates, devices, metadata

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .e2e_clients import openssl_csr
from . import postgres
from .pki import der
from .server import start_server
from .test_admin_api import mint_client_certificate
from .test_e2e import enroll, issued

DATA = Path(__file__).parent / "data"
HEAD = migrations.head()
ADMIN, ADMIN_PASSWORD = "admin1", "an admin password for the tests"
# Not est_app's: the FTS5 table and its shadow tables (SQLite), the trigram index (PostgreSQL), Alembic's own.
NOT_IN_SCHEMA_PY = ("devices_search", "ix_devices_device_key_trgm", "alembic_version")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'est.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def database_section(tmp_path):
    """``database_section(url)``: the YAML ``database`` section for a URL (a password goes to a file)."""
    return lambda url: postgres.database_section(url, tmp_path)


@pytest.fixture
def config_for(make_config, database_section):
    """``config_for(url)``: `est init`'s configuration on that database."""
    return lambda url: make_config(database=database_section(url))


def migrate(url: str, revision: str, action=command.upgrade) -> None:
    """Alembic's own command on the database, as a developer would run it: up (or ``action``) to ``revision``."""
    store = Store(url)
    with store.engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(Path(migrations.__file__).parent))
        config.attributes["connection"] = conn
        action(config, revision)
    store.engine.dispose()


def schema_differences(url: str, target: sa.MetaData) -> list:
    """What Alembic's autogenerate would change to make the database ``target`` (the search index aside)."""

    def ours(obj, name, type_, reflected, compare_to) -> bool:
        return not (name or "").startswith(NOT_IN_SCHEMA_PY)

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = compare_metadata(MigrationContext.configure(conn, opts={"include_object": ours}), target)
    engine.dispose()
    return found


def snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table of revision 0001, in its columns, ordered by primary key."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = {
            table.name: [tuple(row) for row in conn.execute(sa.select(*table.c).order_by(*table.primary_key.columns))]
            for table in baseline.metadata.sorted_tables
        }
    engine.dispose()
    return rows


def current_copies(url: str) -> list[tuple]:
    """(device, its row's current_status and current_not_after, its current certificate's status and notAfter)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(devices.c.device_key, devices.c.current_status, devices.c.current_not_after, certificates.c.status, certificates.c.not_after)
            .select_from(devices.outerjoin(certificates, certificates.c.serial == devices.c.current_serial))
            .order_by(devices.c.id)
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]


# --- revision 0001, filled the way the last version wrote, then upgraded -------------------------


def fill_revision_1(url: str, config: Path) -> dict[str, tuple[x509.Certificate, datetime]]:
    """Users, an RA, devices with valid, superseded and revoked certificates, an orphan, a CRL,
    audit events, a dashboard session and a back-off, written to revision 0001's tables."""
    settings = load_config(config)
    authority = load_authority(settings.ca)
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    names = {"valid": "NPPVALID1", "old": "NPPRENEW2", "renewed": "NPPRENEW2", "revoked": "NPPREVOKED3", "orphan": "NPPGONE4"}
    certs = {name: mint_client_certificate(settings.ca.cert_file.parent, cn) for name, cn in names.items()}
    serial = {name: f"{cert.serial_number:x}" for name, cert in certs.items()}
    # As recorded: only the renewed one expires within 30 days (OCSP and CRLs go by serial and issuer alone).
    not_after = {name: now + timedelta(days=20 if name == "renewed" else 300) for name in names}

    def certificate(name: str, device_id, status: str, issuer=authority.issuer_id, revoked_at=None, revocation_reason=None) -> dict:
        cert = certs[name]
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return dict(serial=serial[name], device_id=device_id, common_name=cn, subject=f"CN={cn}", label="default",
                    requester=f"user:{USER}", operation="simpleenroll", not_before=cert.not_valid_before_utc.replace(tzinfo=None),
                    not_after=not_after[name], status=status, issued_at=now, der=der(cert),
                    issuer=issuer, revoked_at=revoked_at, revocation_reason=revocation_reason)  # fmt: skip

    def device(device_id: int, key: str, current: str) -> dict:
        return dict(id=device_id, label="default", device_key=key, first_enrolled=now - timedelta(days=90), last_enrolled=now,
                    current_serial=serial[current], requester=f"user:{USER}", client_address="10.0.0.5")  # fmt: skip

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        tables = baseline.metadata.tables
        conn.execute(tables["users"].insert(), [
            dict(id=1, name=USER, password_hash=generate_password_hash(PASSWORD), role="est", created_at=now),
            dict(id=2, name=ADMIN, password_hash=generate_password_hash(ADMIN_PASSWORD), role="admin", created_at=now),
        ])  # fmt: skip
        conn.execute(tables["ra_clients"].insert(), [dict(id=1, fingerprint="ab" * 32, subject="CN=IQE gateway", labels="", created_at=now)])
        conn.execute(tables["devices"].insert(), [device(1, "NPPVALID1", "valid"), device(2, "NPPRENEW2", "renewed"), device(3, "NPPREVOKED3", "revoked")])
        conn.execute(tables["certificates"].insert(), [
            certificate("valid", 1, "valid", issuer=None),  # recorded before issuers were
            certificate("old", 2, "superseded"),
            certificate("renewed", 2, "valid"),
            certificate("revoked", 3, "revoked", revoked_at=now, revocation_reason="keyCompromise"),
            certificate("orphan", None, "valid"),  # its device was deleted with --keep-certificate
        ])  # fmt: skip
        this_update, next_update, crl = build_crl(authority, [(serial["revoked"], now, "keyCompromise")], 1, now, timedelta(hours=24))
        conn.execute(tables["crls"].insert(), [dict(number=1, this_update=this_update.replace(tzinfo=None),
                                                    next_update=next_update.replace(tzinfo=None), der=crl, issuer=authority.issuer_id)])  # fmt: skip
        conn.execute(tables["audit_events"].insert(), [
            dict(id=i, at=now, event=event, outcome="ok", actor=f"user:{USER}", client_address="10.0.0.5", label="default",
                 device=key, serial=serial[name], detail="") for i, (event, key, name) in enumerate(
                [("enroll", "NPPVALID1", "valid"), ("reenroll", "NPPRENEW2", "renewed"), ("revoke", "NPPREVOKED3", "revoked")], 1)
        ])  # fmt: skip
        conn.execute(tables["admin_sessions"].insert(), [dict(token_hash="cd" * 32, user_id=2, data="{}", created_at=now, last_seen=now)])
        conn.execute(tables["auth_failures"].insert(), [dict(subject="address:10.9.9.9", failures=3, last_failure=now, blocked_until=now)])
        if conn.dialect.name == "postgresql":  # the ids were given: move the sequences past them, as the inserts would have
            for table in ("users", "ra_clients", "devices", "audit_events"):
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
    engine.dispose()
    return {name: (cert, not_after[name]) for name, cert in certs.items()}


def ocsp_status(server, cert: x509.Certificate, ca_cert: x509.Certificate) -> ocsp.OCSPCertStatus:
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, ca_cert, hashes.SHA1()).build()
    post = urllib.request.Request(f"{server.url}/ocsp", data=request.public_bytes(serialization.Encoding.DER),
                                  headers={"Content-Type": "application/ocsp-request"})  # fmt: skip
    with urllib.request.urlopen(post, context=ssl.create_default_context(cafile=str(server.ca_file)), timeout=30) as reply:
        answer = ocsp.load_der_ocsp_response(reply.read())
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return answer.certificate_status


def admin_get(server, path: str) -> dict:
    headers = basic_auth(ADMIN, ADMIN_PASSWORD)
    request = urllib.request.Request(f"{server.url}{path}", headers=headers)
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(server.ca_file)), timeout=30) as reply:
        return json.loads(reply.read())


@pytest.mark.e2e
def test_a_filled_revision_1_database_upgrades_and_serves(database_url, config_for, database_section, pki_dir, tmp_path):
    config = config_for(database_url)
    migrate(database_url, "0001")
    certs = fill_revision_1(database_url, config)
    before = snapshot(database_url)
    assert [len(before[t]) for t in ("users", "ra_clients", "devices", "certificates", "crls", "audit_events", "admin_sessions", "auth_failures")] == [2, 1, 3, 5, 1, 3, 1, 1]

    # est-server refuses it in one line naming the command; `db current` says the same, exit 1.
    with pytest.raises(ConfigError, match=rf"at schema revision 0001, this version needs {HEAD}: back it up, then run `est-admin db upgrade`") as refused:
        create_app(config)
    assert "\n" not in str(refused.value)
    current = run_cli("db", "current", config=config)
    assert current.exit_code == 1 and f"schema revision 0001, this version's is {HEAD}" in current.output

    upgraded = run_cli("db", "upgrade", config=config)
    assert upgraded.exit_code == 0, upgraded.output
    assert f"upgraded from schema revision 0001 to {HEAD}" in upgraded.output
    assert snapshot(database_url) == before  # every row, every column, as it was
    assert [(key, status, not_after) for key, status, not_after, *_ in current_copies(database_url)] == [
        ("NPPVALID1", "valid", certs["valid"][1]), ("NPPRENEW2", "valid", certs["renewed"][1]), ("NPPREVOKED3", "revoked", certs["revoked"][1])
    ]
    assert run_cli("db", "current", config=config).exit_code == 0
    assert "nothing to do" in run_cli("db", "upgrade", config=config).output

    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    server = start_server(pki_dir, tmp_path, database=database_section(database_url), rate_limit={"enabled": False})
    try:
        # The upgraded users sign in: the gateway enrolls a new pump, the admin lists and filters.
        cert = issued(enroll(server, openssl_csr("ec", "NPPNEW5")), "base64", pki_dir / "ca.pem")
        assert cert.subject.rfc4514_string() == "CN=NPPNEW5"
        assert ocsp_status(server, certs["revoked"][0], ca_cert) == ocsp.OCSPCertStatus.REVOKED
        assert ocsp_status(server, certs["valid"][0], ca_cert) == ocsp.OCSPCertStatus.GOOD
        assert ocsp_status(server, cert, ca_cert) == ocsp.OCSPCertStatus.GOOD
        listed = admin_get(server, "/api/v1/devices")
        assert [(d["name"], d["status"]) for d in listed["items"]] == [
            ("NPPNEW5", "valid"), ("NPPREVOKED3", "revoked"), ("NPPRENEW2", "valid"), ("NPPVALID1", "valid")
        ]
        assert [d["name"] for d in admin_get(server, "/api/v1/devices?status=revoked")["items"]] == ["NPPREVOKED3"]
        assert [d["name"] for d in admin_get(server, "/api/v1/devices?status=valid&expires_within_days=30")["items"]] == ["NPPRENEW2"]
        assert [d["name"] for d in admin_get(server, "/api/v1/devices?search=RENEW")["items"]] == ["NPPRENEW2"]
        assert admin_get(server, "/api/v1/statistics")["certificates"] == {"valid": 4, "superseded": 1, "revoked": 1}
    finally:
        server.stop()


# --- a database made before migrations ---------------------------------------------------------


def load_before_migrations(url: str) -> None:
    """The DDL the last version without migrations wrote (its Store.create_schema(), dumped)."""
    engine = sa.create_engine(url)
    backend = engine.dialect.name
    script = (DATA / f"schema-before-migrations.{backend}.sql").read_text()
    with engine.begin() as conn:
        for statement in script.split(";\n"):
            if statement.strip() and not statement.startswith("CREATE TABLE sqlite_sequence"):
                conn.exec_driver_sql(statement)
        # What that version's start-up dropped from older databases still: the cookie-signing key.
        conn.exec_driver_sql("CREATE TABLE app_secrets (name VARCHAR(64) PRIMARY KEY, value BYTEA NOT NULL)".replace("BYTEA", "BLOB" if backend == "sqlite" else "BYTEA"))
        conn.exec_driver_sql("INSERT INTO app_secrets VALUES ('session_key', 'x')")
    engine.dispose()


def test_a_database_made_before_migrations_is_refused_then_upgrades_in_place(database_url, config_for):
    config = config_for(database_url)
    load_before_migrations(database_url)
    fill_revision_1(database_url, config)
    before = snapshot(database_url)

    with pytest.raises(ConfigError, match=r"made before schema migrations: back it up, then run `est-admin db upgrade`"):
        create_app(config)
    current = run_cli("db", "current", config=config)
    assert current.exit_code == 1 and "schema revision none (no alembic_version table)" in current.output

    upgraded = run_cli("db", "upgrade", config=config)
    assert upgraded.exit_code == 0, upgraded.output
    assert f"upgraded from schema revision none (no alembic_version table) to {HEAD}" in upgraded.output
    assert snapshot(database_url) == before
    assert [row[1] for row in current_copies(database_url)] == ["valid", "valid", "revoked"]
    assert "app_secrets" not in sa.inspect(sa.create_engine(database_url)).get_table_names()
    assert schema_differences(database_url, metadata) == []
    app = create_app(config)  # starts
    assert [d.device_key for d in Reports(app.extensions["est_app"].store.engine).devices(search="valid").items] == (
        ["NPPVALID1"] if database_url.startswith("sqlite") else []  # LIKE: ASCII case folded on SQLite only, as before
    )


def test_an_older_sqlite_database_gets_its_issuer_columns_and_a_foreign_one_is_refused(tmp_path, config_for):
    url = f"sqlite:///{tmp_path / 'est.db'}"
    config = config_for(url)
    load_before_migrations(url)
    with sqlite3.connect(tmp_path / "est.db") as conn:  # the version before issuers were recorded
        conn.execute("DROP INDEX ix_crls_issuer_number")
        conn.execute("ALTER TABLE certificates DROP COLUMN issuer")
        conn.execute("ALTER TABLE crls DROP COLUMN issuer")
    assert run_cli("db", "upgrade", config=config).exit_code == 0
    assert schema_differences(url, metadata) == []

    foreign = tmp_path / "foreign.db"
    load_before_migrations(f"sqlite:///{foreign}")
    with sqlite3.connect(foreign) as conn:
        conn.execute("ALTER TABLE certificates DROP COLUMN revocation_reason")
        tables_before = conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall()
    config = config_for(f"sqlite:///{foreign}")
    refused = run_cli("db", "upgrade", config=config)
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        f"Error: database sqlite:///{foreign}: table certificates lacks column(s) revocation_reason: "
        "not a database est_app can upgrade in place (restore a backup made by est_app)"
    ]
    with sqlite3.connect(foreign) as conn:  # untouched: app_secrets still there, no alembic_version
        assert conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall() == tables_before
    with pytest.raises(ConfigError, match="lacks column"):
        create_app(config)


# --- the head is schema.py; down and up again ---------------------------------------------------


def test_the_head_is_schema_py_and_0002_goes_down_and_up(database_url, config_for):
    Store(database_url).create_schema()  # as est-server does on an empty database
    assert schema_differences(database_url, metadata) == []
    assert Store(database_url).schema_status().at_head
    migrate(database_url, "0001", command.downgrade)
    assert schema_differences(database_url, baseline.metadata) == []
    with pytest.raises(ConfigError, match="est-admin db upgrade"):
        create_app(config_for(database_url))
    assert run_cli("db", "upgrade", config=config_for(database_url)).exit_code == 0
    assert schema_differences(database_url, metadata) == []


def test_a_newer_revision_is_refused(database_url, config_for):
    Store(database_url).create_schema()
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    with pytest.raises(ConfigError, match="at schema revision 0099, which this version does not know"):
        create_app(config_for(database_url))
    refused = run_cli("db", "upgrade", config=config_for(database_url))
    assert refused.exit_code == 1 and "which this version does not know" in refused.output


# --- the device row's copy of its current certificate; search and filters ----------------------


def record(serial: str, cn: str, days: int, status: str = "valid") -> CertificateRecord:
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    return CertificateRecord(serial=serial, common_name=cn, subject=f"CN={cn}", label="default", requester="user:t",
                             operation="simpleenroll", not_before=now, not_after=now + timedelta(days=days), der=b"\x30\x00",
                             status=status)  # fmt: skip


def test_the_current_status_and_expiry_follow_every_write(database_url):
    store = Store(database_url)
    store.create_schema()

    def copies_agree() -> list[tuple]:
        rows = current_copies(database_url)
        assert [(key, status, not_after) for key, status, not_after, _, _ in rows] == [(key, s, n) for key, _, _, s, n in rows]
        return [(key, status) for key, status, *_ in rows]

    a = store.enroll_device(record("a1", "NPPA", 30), "NPPA", "renew", "10.0.0.1")
    store.enroll_device(record("b1", "NPPB", 300), "NPPB", "renew", "10.0.0.1")
    assert copies_agree() == [("NPPA", "valid"), ("NPPB", "valid")]
    store.enroll_device(record("a2", "NPPA", 60), "NPPA", "renew", "10.0.0.1")  # enroll again: a1 superseded
    store.replace_certificate("b1", record("b2", "NPPB", 90), "10.0.0.1")  # re-enroll
    assert copies_agree() == [("NPPA", "valid"), ("NPPB", "valid")]
    assert store.get_device(a.id).current_not_after == store.get_certificate("a2").not_after
    store.revoke("a1", "superseded")  # not the current one: the device stays valid
    assert copies_agree() == [("NPPA", "valid"), ("NPPB", "valid")]
    store.revoke("a2", "keyCompromise", AuditEvent(event="revoke"))
    assert copies_agree() == [("NPPA", "revoked"), ("NPPB", "valid")]
    store.delete_device(a.id, revoke_reason="cessationOfOperation")
    assert copies_agree() == [("NPPB", "valid")]
    store.enroll_device(record("a3", "NPPA", 10), "NPPA", "renew", "10.0.0.1")  # the name enrolls again
    assert copies_agree() == [("NPPB", "valid"), ("NPPA", "valid")]
    reports = Reports(store.engine)
    assert [d.device_key for d in reports.devices(status="valid", expires_within_days=20).items] == ["NPPA"]
    assert [d.device_key for d in reports.devices(search="ppa").items] == (["NPPA"] if database_url.startswith("sqlite") else [])


SEARCH_KEYS = ["NPP0001", "npp0002", "NPP0011", "pump-Ä1", "pump-ä2", 'say "hi"', "50%_off", "Straße 7", "x", "AB", "ÀBC"]
SEARCH_TERMS = ["NPP", "npp", "PP00", "0001", "1", "00", "ä", "Ä", "pump-ä", "PUMP", '"hi"', 'y "', "%", "50%_", "_", "traße", "STRASSE",
                "x", "ab", "àbc", "nothing here", "   NPP0011  "]  # fmt: skip


def test_indexed_search_and_filters_give_what_the_scan_gives(database_url):
    store = Store(database_url)
    store.create_schema()
    for i, key in enumerate(SEARCH_KEYS):
        store.enroll_device(record(f"s{i}", key, 10 + 40 * i, "valid"), key, "renew", "10.0.0.1")
    store.revoke("s3", "keyCompromise")
    deleted = store.enroll_device(record("gone", "NPP0099", 5), "NPP0099", "renew", "10.0.0.1")
    store.delete_device(deleted.id)
    with store.engine.begin() as conn:  # a rename by hand: the search index follows
        conn.execute(devices.update().where(devices.c.device_key == "x").values(device_key="NPPRENAMED"))
    reports = Reports(store.engine)

    def scan(**where) -> list[str]:
        """The plain scan the lists ran before revision 0002: LIKE over every row, status by joining the certificate."""
        term = where.get("search")
        query = "SELECT d.device_key FROM devices d LEFT JOIN certificates c ON c.serial = d.current_serial WHERE 1=1"
        params = {}
        if term is not None:
            escaped = term.strip().replace("/", "//").replace("%", "/%").replace("_", "/_")
            query += " AND d.device_key LIKE :pattern ESCAPE '/'"
            params["pattern"] = f"%{escaped}%"
        if "status" in where:
            query += " AND c.status = :status"
            params["status"] = where["status"]
        if "days" in where:
            query += " AND c.not_after BETWEEN :now AND :until"
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            params.update(now=now, until=now + timedelta(days=where["days"]))
        with store.engine.connect() as conn:
            return [row[0] for row in conn.execute(sa.text(query + " ORDER BY d.id DESC"), params)]

    for term in SEARCH_TERMS + (["NPP\x00", "\x00\x00\x00"] if database_url.startswith("sqlite") else []):  # PostgreSQL text holds no NUL
        page = reports.devices(search=term, limit=100)
        assert [d.device_key for d in page.items] == scan(search=term), term
        assert page.total == len(page.items)
    assert [d.device_key for d in reports.devices(search="RENAMED").items] == ["NPPRENAMED"]
    assert reports.devices(search="NPP0099").total == 0
    for status in ("valid", "revoked", "superseded"):
        for days in (None, 30, 200):
            where = {"status": status, **({"days": days} if days else {})}
            assert [d.device_key for d in reports.devices(status=status, expires_within_days=days, limit=100).items] == scan(**where)
    assert [d.device_key for d in reports.devices(expires_within_days=100, limit=100).items] == scan(days=100)


# --- processes starting or upgrading at once ----------------------------------------------------


def at_once(n: int, action) -> list:
    """Run ``action(i)`` in ``n`` threads released together, each on its own Store (its own connections)."""
    start, results, errors = threading.Barrier(n), [None] * n, []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = action(i)
        except Exception as exc:  # noqa: BLE001 -- reported below with the rest
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    return results


def test_workers_starting_together_create_the_schema_once(database_url):
    def start(_):
        store = Store(database_url)
        try:
            store.create_schema()
            return store.schema_status().current
        finally:
            store.engine.dispose()

    assert at_once(4, start) == [HEAD] * 4
    assert schema_differences(database_url, metadata) == []


def test_two_upgrades_at_once_take_turns(database_url):
    migrate(database_url, "0001")

    def upgrade(_):
        store = Store(database_url)
        try:
            return store.upgrade_schema().current
        finally:
            store.engine.dispose()

    assert sorted(at_once(2, upgrade)) == ["0001", HEAD]  # the second found nothing to do
    assert Store(database_url).schema_status().at_head


def test_init_creates_at_head_and_db_current_says_so(tmp_path):
    result = run_cli("init", "--dir", str(tmp_path / "pki"))
    assert result.exit_code == 0 and f"created at schema revision {HEAD}" in result.output
    config = tmp_path / "pki" / "config.yaml"
    current = run_cli("db", "current", config=config)
    assert current.exit_code == 0 and f"schema revision {HEAD} (this version's)" in current.output
    data = yaml.safe_load(config.read_text())
    assert Store(data["database"]["url"]).schema_status().at_head
    assert "nothing to do" in run_cli("init", "--dir", str(tmp_path / "pki")).output


def test_a_postgresql_role_that_may_not_create_pg_trgm_gets_one_line_and_no_change(postgres_cluster, config_for):
    database = postgres_cluster.create_database()
    postgres_cluster.psql(f"CREATE ROLE {database}_owner LOGIN PASSWORD 'not a secret, a test'", database)
    postgres_cluster.psql(f'ALTER SCHEMA public OWNER TO {database}_owner; REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC', database)
    url = postgres_cluster.url(database).replace(f"est:{postgres_cluster.password}@", f"{database}_owner:not%20a%20secret%2C%20a%20test@")
    config = config_for(url)
    refused = run_cli("db", "upgrade", config=config)
    assert refused.exit_code == 1
    assert refused.output.splitlines() == [
        f"Error: database {url.split(':not')[0]}@{url.split('@')[1]}: upgrade failed, nothing changed: "
        'permission denied to create extension "pg_trgm"'
    ]
    assert Store(url).schema_status().empty  # revision 0001's tables went with the rest
    postgres_cluster.psql("CREATE EXTENSION pg_trgm", database)  # what the docs tell a superuser to run
    assert run_cli("db", "upgrade", config=config).exit_code == 0
