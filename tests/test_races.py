"""Races on the store's writes, on SQLite and on PostgreSQL: many writers at once, each its own Store
(its own engine and connections, as separate gunicorn workers or hosts have), released together.

What must hold whatever the interleaving: one certificate is replaced once; a device id has one
device row on one label; a device has exactly one valid certificate, its current one; serials are
unique. On SQLite ``BEGIN IMMEDIATE`` serialises writers; on PostgreSQL row locks, an advisory lock
on the device id and checked row counts do (est_app/store/__init__.py). The end-to-end race, two
gunicorn servers on one database, is the last test.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from est_app.config import DatabaseSettings
from est_app.store import CertificateRecord, DeviceExists, DeviceOnOtherLabel, NotCurrent, SerialTaken, Store, utcnow

from .conftest import PASSWORD, USER, open_store, run_cli
from .pki import der, make_csr, pem
from .server import start_server
from .test_e2e_ra import fire

pytestmark = pytest.mark.both_databases

WRITERS = 40


@pytest.fixture
def stores(new_database, tmp_path) -> Callable[[], Store]:
    """``stores()``: one more Store on the same new database (its schema made by the first)."""
    section = new_database(tmp_path)
    settings = DatabaseSettings(url=section["url"], password_file=Path(section["password_file"]) if "password_file" in section else None)
    opened: list[Store] = []

    def open_one() -> Store:
        store = Store(settings.url, settings)
        if not opened:
            store.create_schema()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.engine.dispose()


def record(label: str = "default", cn: str = "NPPRACE1", serial: str | None = None) -> CertificateRecord:
    now = utcnow()
    return CertificateRecord(
        serial=serial or secrets.token_hex(16).lstrip("0"), common_name=cn, subject=f"CN={cn}", label=label, requester="user:gateway",
        operation="simpleenroll", not_before=now, not_after=now + timedelta(days=30), der=secrets.token_bytes(64),
    )


def at_once(stores: Callable[[], Store], jobs: list[Callable[[Store], object]]) -> list[object]:
    """Run each job with its own Store, all released by one barrier; each result is the return value or the exception raised."""
    own = [stores() for _ in jobs]
    for store in own:  # connected before the barrier, so the writes, not the connects, race
        store.engine.connect().close()
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> object:
        barrier.wait(timeout=60)
        try:
            return jobs[i](own[i])
        except Exception as exc:  # the outcome under test: which writers were refused, and how
            return exc

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(run, range(len(jobs))))


def only_valid_is_current(store: Store, device_key: str) -> CertificateRecord:
    """The invariant: the id has one device row, and exactly one valid certificate, its current one."""
    (device,) = [d for d in store.find_devices(search=device_key) if d.device_key == device_key]
    valid = [c for c in store.device_certificates(device.id) if c.status == "valid"]
    assert [c.serial for c in valid] == [device.current_serial]
    return valid[0]


def test_one_certificate_is_replaced_once(stores):
    first = stores()
    old = record()
    first.enroll_device(old, "NPPRACE1", "renew", "127.0.0.1")
    replacements = [record() for _ in range(WRITERS)]
    results = at_once(stores, [lambda s, r=r: s.replace_certificate(old.serial, r, "127.0.0.1") for r in replacements])

    winners = [r for r, result in zip(replacements, results) if result is None]
    refused = [result for result in results if isinstance(result, NotCurrent)]
    assert (len(winners), len(refused)) == (1, WRITERS - 1), [r for r in results if r is not None and not isinstance(r, NotCurrent)][:3]
    assert {exc.status for exc in refused} == {"superseded"}
    assert only_valid_is_current(first, "NPPRACE1").serial == winners[0].serial
    assert first.get_certificate(old.serial).status == "superseded"
    assert all(first.get_certificate(r.serial) is None for r in replacements if r is not winners[0])  # losers left nothing


def test_revoking_locks_the_device_before_its_certificate(stores, database):
    # One lock order for every writer, device then certificate: revision 0002's trigger updates the device row when its
    # current certificate's status changes, so a revoke locking the certificate first deadlocks with that device's
    # re-enrollment (replace_certificate locks the device, then the certificate), and one of them gets a 503.
    if database != "postgresql":
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE: no row locks to order")
    first, holder = stores(), stores()
    current = record(cn="NPPLOCK1")
    device = first.enroll_device(current, "NPPLOCK1", "renew", "127.0.0.1")
    with holder.engine.begin() as conn:
        conn.execute(sa.text("SELECT id FROM devices WHERE id = :id FOR UPDATE"), {"id": device.id})  # a re-enrollment's first lock
        revoking = threading.Thread(target=first.revoke, args=(current.serial, "keyCompromise"))
        revoking.start()
        waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        deadline = time.monotonic() + 30
        while not conn.execute(waiting).scalar():  # the revoke is blocked on a lock we hold
            assert time.monotonic() < deadline, "the revoke never waited for the device's lock"
            time.sleep(0.05)
        conn.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
        # The re-enrollment's second lock: free, as the revoke waits for the device before it touches the certificate.
        conn.execute(sa.text("SELECT serial FROM certificates WHERE serial = :serial FOR UPDATE"), {"serial": current.serial})
    revoking.join(30)
    assert first.get_certificate(current.serial).status == "revoked"


@pytest.mark.parametrize("policy", ["renew", "reject"])
def test_first_enrollments_of_one_device(stores, policy):
    records = [record() for _ in range(WRITERS)]
    results = at_once(stores, [lambda s, r=r: s.enroll_device(r, "NPPRACE1", policy, "127.0.0.1") for r in records])

    enrolled = [r for r, result in zip(records, results) if not isinstance(result, Exception)]
    store = stores()
    current = only_valid_is_current(store, "NPPRACE1")
    if policy == "renew":
        assert len(enrolled) == WRITERS, [r for r in results if isinstance(r, Exception)][:3]
        (device,) = {result.id for result in results}
        statuses = sorted(c.status for c in store.device_certificates(device))
        assert statuses == ["superseded"] * (WRITERS - 1) + ["valid"]
    else:
        assert len(enrolled) == 1 and sum(isinstance(r, DeviceExists) for r in results) == WRITERS - 1, results[:3]
        assert current.serial == enrolled[0].serial
        assert [r.serial for r in records if store.get_certificate(r.serial)] == [enrolled[0].serial]


def test_one_device_id_is_never_enrolled_on_two_labels(stores):
    """Half the writers on label ``a``, half on ``b``, one device id: one label wins, the other is told it is taken."""
    records = [record(label="ab"[i % 2]) for i in range(WRITERS)]
    results = at_once(stores, [lambda s, r=r: s.enroll_device(r, "NPPRACE1", "renew", "127.0.0.1") for r in records])

    store = stores()
    devices = [d for d in store.find_devices(search="NPPRACE1")]
    assert len(devices) == 1, [(d.id, d.label) for d in devices]
    winner = devices[0].label
    for r, result in zip(records, results):
        expected = DeviceOnOtherLabel if r.label != winner else type(devices[0])
        assert isinstance(result, expected), (r.label, winner, result)
    only_valid_is_current(store, "NPPRACE1")


def test_renewals_and_reenrollments_at_once_leave_one_valid_certificate(stores):
    """An enrolled device: half the writers renew it by enrolling again, half re-enroll with its current certificate."""
    first = stores()
    old = record()
    first.enroll_device(old, "NPPRACE1", "renew", "127.0.0.1")
    records = [record() for _ in range(WRITERS)]
    jobs = [
        (lambda s, r=r: s.enroll_device(r, "NPPRACE1", "renew", "127.0.0.1")) if i % 2 else (lambda s, r=r: s.replace_certificate(old.serial, r, "127.0.0.1"))
        for i, r in enumerate(records)
    ]
    results = at_once(stores, jobs)

    unexpected = [r for r in results if isinstance(r, Exception) and not isinstance(r, NotCurrent)]
    assert not unexpected, unexpected[:3]  # no deadlock, no timeout: locks are taken in one order
    assert sum(isinstance(r, NotCurrent) for r in results[0::2]) >= WRITERS // 2 - 1  # at most one re-enrollment wins
    only_valid_is_current(first, "NPPRACE1")


def test_a_serial_is_stored_once(stores):
    serial = secrets.token_hex(16).lstrip("0")
    results = at_once(stores, [lambda s, i=i: s.enroll_device(record(cn=f"NPPSER{i}", serial=serial), f"NPPSER{i}", "renew", "") for i in range(8)])
    assert sum(isinstance(r, SerialTaken) for r in results) == 7, results
    assert stores().count_certificates() == 1


# --- end to end: two servers on one database -----------------------------------------------------


@pytest.mark.e2e
def test_two_servers_one_database_reenroll_one_certificate_once(pki_dir, tmp_path, new_database):
    """40 re-enrollments with one certificate, 20 to each of two gunicorn servers (2 workers each) on one database: one 200, 39 403."""
    database = new_database(tmp_path)
    servers = []
    try:
        for name in ("one", "two"):
            workdir = tmp_path / name
            workdir.mkdir()
            servers.append(start_server(pki_dir, workdir, server={"workers": 2}, database=database, rate_limit={"enabled": False}, response_format="der"))
        result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=servers[0].config)
        assert result.exit_code == 0, result.output

        key = ec.generate_private_key(ec.SECP256R1())
        csr = der(make_csr("NPPTWIN1", key=key))
        ((status, _),) = fire(servers[0], [("simpleenroll", csr)])
        assert status == 200
        store = open_store(servers[0].config)
        (device,) = store.find_devices(search="NPPTWIN1")
        old = x509.load_der_x509_certificate(store.get_certificate(device.current_serial).der)
        cert_file, key_file = tmp_path / "old.pem", tmp_path / "old.key"
        cert_file.write_bytes(pem(old))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

        results = fire(servers, [("simplereenroll", csr)] * WRITERS, client_cert=(cert_file, key_file))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] + [403] * (WRITERS - 1), [r for r in results if r[0] not in (200, 403)][:3] or statuses
        old_serial = device.current_serial
        assert all(f"certificate {old_serial} is superseded".encode() in body for status, body in results if status == 403)
        (body,) = [body for status, body in results if status == 200]
        (new,) = pkcs7.load_der_pkcs7_certificates(body)
        current = only_valid_is_current(store, "NPPTWIN1")
        assert current.der == der(new) and store.get_certificate(old_serial).status == "superseded"
        assert store.count_certificates() == 2  # the 39 losers recorded nothing
    finally:
        for server in servers:
            server.stop()
