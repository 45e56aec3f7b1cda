"""Group commit (est_app/store/batch.py), on SQLite and PostgreSQL: one Store shared by many threads, as a
gunicorn worker's app threads share it. Writes queued while a batch commits go in the next one, in one
transaction; a refused write is refused alone; a failed commit fails every write of its batch.

Each test holds the first write (the leader's) until the others have queued behind it, so the next
batch holds all of them whatever the machine's load, then counts the transactions committed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest
import sqlalchemy as sa

from est_app.store import DeviceExists, SerialTaken, Store, utcnow
from est_app.store.batch import is_deadlock

from .test_races import only_valid_is_current, record, stores  # noqa: F401 (stores: the fixture)

pytestmark = pytest.mark.both_databases

QUEUED = 12


def behind_a_held_batch(store: Store, jobs: list[Callable[[], object]]) -> list[object]:
    """Run ``jobs`` (each its result or the exception it raised) while a first write holds the batch open,
    and release it once every job has queued, in order: the jobs then commit as one batch."""
    entered, release = threading.Event(), threading.Event()

    def held(conn) -> None:
        entered.set()
        assert release.wait(timeout=60)

    def run(job: Callable[[], object]) -> object:
        try:
            return job()
        except Exception as exc:  # the outcome under test
            return exc

    writes = store._certificate_writes
    with ThreadPoolExecutor(max_workers=len(jobs) + 1) as pool:
        leader = pool.submit(writes.run, held)
        assert entered.wait(timeout=60)
        results = []
        for job in jobs:  # one at a time: they queue, and run, in the order given
            results.append(pool.submit(run, job))
            deadline = time.monotonic() + 60
            while len(writes._queue) < len(results):
                assert time.monotonic() < deadline, "the write never queued"
                time.sleep(0.005)
        release.set()
        leader.result(timeout=60)
        return [r.result(timeout=60) for r in results]


def count_commits(store: Store) -> list[int]:
    commits: list[int] = []
    sa.event.listen(store.engine, "commit", lambda conn: commits.append(1))
    return commits


def test_writes_queued_while_a_batch_commits_commit_together(stores):
    store = stores()
    commits = count_commits(store)
    records = [record(cn=f"NPPGROUP{i}") for i in range(QUEUED)]
    jobs = [lambda r=r: store.enroll_device(r, r.common_name, "renew", "127.0.0.1") for r in records]

    devices = behind_a_held_batch(store, jobs)

    assert len(commits) == 2  # the held write's, then one for all the others
    assert [d.current_serial for d in devices] == [r.serial for r in records]
    for r in records:
        assert only_valid_is_current(store, r.common_name).serial == r.serial


def test_a_refused_write_is_refused_alone_and_the_batch_commits(stores):
    store = stores()
    known = record(cn="NPPKNOWN")
    store.enroll_device(known, "NPPKNOWN", "renew", "127.0.0.1")
    fresh = [record(cn=f"NPPFRESH{i}") for i in range(4)]
    twice = [record(cn="NPPTWICE"), record(cn="NPPTWICE")]
    taken = record(cn="NPPTAKEN", serial=known.serial)
    commits = count_commits(store)

    def enroll(r, policy="reject"):
        return lambda: store.enroll_device(r, r.common_name, policy, "127.0.0.1")

    jobs = [enroll(fresh[0]), enroll(record(cn="NPPKNOWN")), enroll(fresh[1]), enroll(twice[0]), enroll(taken),
            enroll(fresh[2]), enroll(twice[1]), enroll(fresh[3])]
    outcomes = behind_a_held_batch(store, jobs)

    assert isinstance(outcomes[1], DeviceExists) and outcomes[1].device.current_serial == known.serial
    assert isinstance(outcomes[6], DeviceExists)  # the same device earlier in the batch: seen under its lock
    assert outcomes[6].device.current_serial == twice[0].serial
    assert isinstance(outcomes[4], SerialTaken)
    assert all(o.current_serial == r.serial for o, r in zip([outcomes[i] for i in (0, 2, 3, 5, 7)], [*fresh[:2], twice[0], *fresh[2:]]))
    # The refused writes left nothing, and the batch went on: the held write's commit, then the batch's.
    assert len(commits) == 2
    for r in [*fresh, twice[0], known]:
        assert only_valid_is_current(store, r.common_name).serial == r.serial
    assert store.get_certificate(twice[1].serial) is None
    assert store.get_certificate(known.serial).common_name == "NPPKNOWN"
    assert [e.device for e in store.audit_events()] == []  # no audit events were given: none appeared


def test_a_failed_commit_fails_every_write_of_its_batch(stores):
    store = stores()
    records = [record(cn=f"NPPLOST{i}") for i in range(QUEUED)]
    jobs = [lambda r=r: store.enroll_device(r, r.common_name, "renew", "127.0.0.1") for r in records]
    failing = {"commits": 0}

    def fail_the_second_commit(conn) -> None:
        failing["commits"] += 1
        if failing["commits"] == 2:
            raise sa.exc.OperationalError("COMMIT", None, OSError("disk full"))

    sa.event.listen(store.engine, "commit", fail_the_second_commit)
    outcomes = behind_a_held_batch(store, jobs)

    assert all(isinstance(o, sa.exc.OperationalError) and "disk full" in str(o) for o in outcomes), outcomes
    assert all(store.get_certificate(r.serial) is None for r in records)
    assert store.find_devices(search="NPPLOST") == []
    # The store is fine afterwards: the same writes commit.
    assert [store.enroll_device(r, r.common_name, "renew", "127.0.0.1").current_serial for r in records] == [r.serial for r in records]



def test_two_hosts_batches_waiting_on_each_other_both_commit(stores, database, request):
    """Two stores (two hosts) each run a batch that locks device A then renews B, and B then A: the batches
    deadlock, PostgreSQL refuses one write, and its store runs it again; every write commits."""
    if database == "sqlite":
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE: two batches never hold locks at once")
    first, second = stores(), stores()
    for cn in ("NPPCROSSA", "NPPCROSSB"):
        first.enroll_device(record(cn=cn), cn, "renew", "127.0.0.1")
    deadlocks_before = _deadlocks(request, first)
    both_locked = threading.Barrier(2)

    def lock_then_renew(store: Store, locked: str, renewed: str) -> list[Callable[[], object]]:
        def lock(conn) -> None:
            store._enrollment.lock_device_key(conn, locked)
            both_locked.wait(timeout=60)

        return [lambda: store._certificate_writes.run(lock), lambda: store.enroll_device(record(cn=renewed), renewed, "renew", "127.0.0.1")]

    with ThreadPoolExecutor(max_workers=2) as pool:
        one = pool.submit(behind_a_held_batch, first, lock_then_renew(first, "NPPCROSSA", "NPPCROSSB"))
        two = pool.submit(behind_a_held_batch, second, lock_then_renew(second, "NPPCROSSB", "NPPCROSSA"))
        outcomes = one.result(timeout=120) + two.result(timeout=120)

    assert not [o for o in outcomes if isinstance(o, Exception)]
    for cn, renewal in (("NPPCROSSA", outcomes[3]), ("NPPCROSSB", outcomes[1])):
        assert only_valid_is_current(first, cn).serial == renewal.current_serial
    deadline = time.monotonic() + 30  # statistics reach the view within a second or so
    while _deadlocks(request, first) == deadlocks_before:
        assert time.monotonic() < deadline, "PostgreSQL counted no deadlock: the batches did not cross"
        time.sleep(0.2)


def _deadlocks(request, store: Store) -> int:
    cluster = request.getfixturevalue("postgres_cluster")
    return int(cluster.psql(f"SELECT deadlocks FROM pg_stat_database WHERE datname = '{store.engine.url.database}'"))


def test_a_write_that_fills_the_disk_fails_its_whole_batch(stores, database):
    """SQLite answers SQLITE_FULL (as IOERR, NOMEM) by rolling the whole transaction back, savepoints and all: the
    writes before it in the batch are gone, so none of them may be told it committed, and the writes after it must
    not run outside any transaction (each statement committing alone)."""
    if database != "sqlite":
        pytest.skip("PostgreSQL rolls a failed statement back to its savepoint, not the whole transaction")
    store = stores()
    store.enroll_device(record(cn="NPPWARM"), "NPPWARM", "renew", "127.0.0.1")  # tables and indexes have their pages
    with store.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
    sa.event.listen(store.engine, "connect", lambda dbapi, _: dbapi.execute(f"PRAGMA max_page_count={pages + 8}"))
    store.engine.dispose()  # the next connections get the cap: the file may grow by 8 pages only

    def fill_the_disk(conn) -> None:
        for _ in range(64):  # far past the 8 pages left
            conn.exec_driver_sql(
                "INSERT INTO audit_events (at, event, outcome, actor, client_address, label, device, serial, detail) "
                "VALUES (?, 'filler', 'ok', 'test', '', '', '', '', hex(randomblob(4000)))", (utcnow().isoformat(" "),)
            )

    before, after = record(cn="NPPBEFORE"), record(cn="NPPAFTER")
    jobs = [
        lambda: store.enroll_device(before, before.common_name, "renew", "127.0.0.1"),
        lambda: store._certificate_writes.run(fill_the_disk),
        lambda: store.enroll_device(after, after.common_name, "renew", "127.0.0.1"),
    ]
    outcomes = behind_a_held_batch(store, jobs)

    assert isinstance(outcomes[1], sa.exc.OperationalError), outcomes
    for r, outcome in ((before, outcomes[0]), (after, outcomes[2])):
        recorded = store.get_certificate(r.serial)
        # Told it committed only if it did, and all of it: certificate and device together.
        if isinstance(outcome, Exception):
            assert recorded is None and store.find_devices(search=r.common_name) == [], (r.common_name, outcome)
        else:
            assert recorded is not None, f"{r.common_name} was told it committed, but its certificate is not on record"
            assert only_valid_is_current(store, r.common_name).serial == r.serial


def test_a_write_refused_as_a_deadlock_every_time_ends_as_the_database_error(stores):
    """PostgreSQL may pick the same write to break a deadlock on each try (two hosts' batches crossing again and
    again): after the last try the caller gets that OperationalError (503 + Retry-After), not an internal error."""
    import psycopg

    store = stores()
    tries = []

    def deadlocked(conn) -> None:
        tries.append(1)
        raise sa.exc.OperationalError("SELECT pg_advisory_xact_lock(%(key)s)", {}, psycopg.errors.DeadlockDetected("deadlock detected"))

    with pytest.raises(sa.exc.OperationalError) as raised:
        store._write_certificate(deadlocked, "1234")
    assert len(tries) == 3 and is_deadlock(raised.value)
