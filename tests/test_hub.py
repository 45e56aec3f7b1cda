"""Store writes and password checks from greenlets on est-server's hub (est_app/hub.py), on a real SQLite file.

est-server answers EST requests on the greenlet that read them (PostgreSQL's waits
there: tests/test_postgres.py). There a greenlet waiting for a writer's turn, a batch
or a password hash must let the others run: blocking the thread on a real lock held by
a sleeping greenlet would stop the worker for good. Each scenario runs on a hub in a
thread of its own and must end within a deadline, so a hang fails the test instead of
stopping the run.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import Callable

import gevent
import gevent.event
import pytest
from werkzeug.security import generate_password_hash

from est_app import hub
from est_app.auth import VerifiedCredentials
from est_app.store import AuditEvent, Store, User

from .test_group_commit import count_commits
from .test_races import only_valid_is_current, record

DEADLINE = 60


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'est.db'}")
    store.create_schema()
    return store


def on_a_hub(scenario: Callable[[], object]) -> object:
    """``scenario()`` in a thread whose greenlets est_app treats as est-server's, as the worker does."""
    outcome: dict[str, object] = {}

    def run() -> None:
        hub.run_greenlets_here()
        try:
            outcome["value"] = scenario()
        except BaseException as exc:  # reported by the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    hub._hub_thread = None
    assert not thread.is_alive(), "the hub's thread was blocked: a greenlet waited on a real lock"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


def test_greenlets_queued_behind_a_batch_commit_together_in_the_next(store):
    commits = count_commits(store)
    records = [record(cn=f"NPPHUB{i}") for i in range(12)]

    def scenario() -> list:
        entered, release = gevent.event.Event(), gevent.event.Event()

        def held(conn) -> None:
            entered.set()
            release.wait()  # cooperatively: the others run and queue meanwhile

        leader = gevent.spawn(store._certificate_writes.run, held)
        entered.wait()
        writers = [gevent.spawn(store.enroll_device, r, r.common_name, "renew", "127.0.0.1") for r in records]
        while len(store._certificate_writes._queue) < len(records):
            gevent.sleep(0.001)
        release.set()
        gevent.joinall([leader, *writers], raise_error=True)
        return [w.value for w in writers]

    devices = on_a_hub(scenario)

    assert len(commits) == 2  # the held write's, then one for all that queued behind it
    assert [d.current_serial for d in devices] == [r.serial for r in records]
    for r in records:
        assert only_valid_is_current(store, r.common_name).serial == r.serial


def test_greenlets_waiting_for_the_writer_turn_let_the_others_run(store, tmp_path):
    # Another process's turn, as a worker's commit: an flock on the same file, another descriptor.
    other = os.open(f"{tmp_path / 'est.db'}-writer", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    event = AuditEvent(event="user-add", actor="cli", client_address="", label="", device="", serial="")
    first = record(cn="NPPTURN1")

    def scenario() -> int:
        ticks = 0
        # One greenlet takes the thread's turn and waits for the file's; the next waits for the thread's.
        writers = [gevent.spawn(store.add_audit, event), gevent.spawn(store.enroll_device, first, "NPPTURN1", "renew", "127.0.0.1")]
        for _ in range(50):  # runs only if neither writer blocks the thread
            gevent.sleep(0.002)
            ticks += 1
        fcntl.flock(other, fcntl.LOCK_UN)
        gevent.joinall(writers, raise_error=True)
        return ticks

    try:
        assert on_a_hub(scenario) == 50
    finally:
        os.close(other)
    assert [e.event for e in store.audit_events()] == ["user-add"]
    assert only_valid_is_current(store, "NPPTURN1").serial == first.serial


def test_writes_queued_while_the_leader_waits_for_its_turn_commit_with_it(store, tmp_path):
    commits = count_commits(store)
    other = os.open(f"{tmp_path / 'est.db'}-writer", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # another worker committing
    records = [record(cn=f"NPPTURN{i}") for i in range(6)]

    def scenario() -> None:
        writers = [gevent.spawn(store.enroll_device, r, r.common_name, "renew", "127.0.0.1") for r in records]
        while len(store._certificate_writes._queue) < len(records) - 1:  # the first leads and waits for the turn
            gevent.sleep(0.001)
        gevent.sleep(0.01)
        fcntl.flock(other, fcntl.LOCK_UN)
        gevent.joinall(writers, raise_error=True)

    try:
        on_a_hub(scenario)
    finally:
        os.close(other)
    assert len(commits) == 1  # one transaction, one fsync, for the leader's write and all that queued behind it
    for r in records:
        assert only_valid_is_current(store, r.common_name).serial == r.serial


def test_a_greenlet_killed_while_queued_leaves_the_batches_going(store):
    kept, dropped = record(cn="NPPKEPT"), record(cn="NPPDROPPED")

    def scenario() -> None:
        entered, release = gevent.event.Event(), gevent.event.Event()

        def held(conn) -> None:
            entered.set()
            release.wait()

        leader = gevent.spawn(store._certificate_writes.run, held)
        entered.wait()
        gone = gevent.spawn(store.enroll_device, dropped, "NPPDROPPED", "renew", "127.0.0.1")
        while not store._certificate_writes._queue:
            gevent.sleep(0.001)
        gone.kill()  # as the worker stopping kills its connections' greenlets
        release.set()
        leader.get()
        store.enroll_device(kept, "NPPKEPT", "renew", "127.0.0.1")  # a leader is found: nothing waits for the dead one

    on_a_hub(scenario)

    assert only_valid_is_current(store, "NPPKEPT").serial == kept.serial
    assert store.get_certificate(dropped.serial) is None  # left the queue with its caller
    assert not store._certificate_writes._leading and not store._certificate_writes._queue


def test_a_password_hash_on_the_hub_lets_the_other_greenlets_run():
    password = "pw-Hub-123456"
    user = User(id=1, name="gateway", password_hash=generate_password_hash(password), role="est", created_at=None)
    credentials = VerifiedCredentials(ttl_seconds=0)  # every check hashes

    def scenario() -> tuple[bool, int]:
        ticks = 0
        check = gevent.spawn(credentials.check, user, password)
        while not check.ready():
            gevent.sleep(0.001)
            ticks += 1
        return check.get(), ticks

    matched, ticks = on_a_hub(scenario)

    assert matched
    assert ticks >= 5  # the hash (tens of ms) ran on the hub's thread pool while this greenlet kept going


@pytest.mark.both_databases
def test_est_requests_run_on_the_greenlet_where_every_wait_lets_the_others_go_on(make_app, database):
    # SQLite's turn and batch, PostgreSQL's round trips, connects and pool: all cooperative on the hub (CA key in a file).
    assert make_app().extensions["est_inline_paths"] == ("/healthz", "/ocsp", "/.well-known/est")


def test_greenlets_presenting_the_same_password_together_share_one_hash(monkeypatch):
    from est_app import auth

    password = "pw-Hub-123456"
    stored = generate_password_hash(password)
    user = User(id=1, name="gateway", password_hash=stored, role="est", created_at=None)
    renamed = User(id=1, name="gateway", password_hash=generate_password_hash(password), role="est", created_at=None)
    credentials = VerifiedCredentials(ttl_seconds=0)  # nothing remembered: only checks in progress are shared
    hashed: list[str] = []
    real = auth.check_password_hash

    def counted(password_hash: str, presented: str) -> bool:  # werkzeug's check, counted
        hashed.append(password_hash)
        return real(password_hash, presented)

    monkeypatch.setattr(auth, "check_password_hash", counted)

    def scenario() -> list[bool]:
        checks = [gevent.spawn(credentials.check, user, password) for _ in range(8)]
        checks.append(gevent.spawn(credentials.check, user, "wrong-password"))  # another pair: hashed apart
        checks.append(gevent.spawn(credentials.check, renamed, password))  # a changed stored hash: hashed apart
        gevent.joinall(checks, raise_error=True)
        return [c.value for c in checks]

    assert on_a_hub(scenario) == [True] * 8 + [False, True]
    assert sorted(hashed) == sorted([stored, stored, renamed.password_hash])
    assert not credentials._checking
