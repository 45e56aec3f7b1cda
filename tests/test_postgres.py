"""The ``database`` section for PostgreSQL: where the password comes from, and the time bounds.

The password never lives in the YAML: a URL holding one is refused at validation with a line
saying where it goes; ``database.password_file`` (a systemd credential) is read as the CA key's
passphrase file is. A lock held by another transaction costs a writer at most
``statement_timeout``, then the store raises OperationalError (the app's 503).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from est_app.config import ConfigError, DatabaseSettings, parse_config
from est_app.store import Store
from est_app.store.connections import ReadConnections
from est_app.store.schema import devices

from .conftest import open_store
from .test_races import record


def settings_with(pki_dir: Path, **database) -> object:
    return parse_config({"ca": {"cert_file": "ca.pem", "key_file": "ca.key"}, "database": database}, base_dir=pki_dir)


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://est:s3cret@db.example/est",
    "postgresql+psycopg://est@db.example/est?password=s3cret",
])
def test_a_url_with_a_password_is_refused_in_one_line(pki_dir, url):
    with pytest.raises(ConfigError) as caught:
        settings_with(pki_dir, url=url)
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message
    assert "database: url holds a password" in message and "database.password_file" in message and "~/.pgpass" in message


def test_password_file_is_for_postgresql_only(pki_dir):
    with pytest.raises(ConfigError, match="password_file is for a postgresql"):
        settings_with(pki_dir, url="sqlite:////tmp/est.db", password_file="password")


@pytest.mark.parametrize("key", ["connect_timeout", "statement_timeout"])
def test_timeouts_are_positive(pki_dir, key):
    with pytest.raises(ConfigError, match=f"{key} must be at least 1"):
        settings_with(pki_dir, url="postgresql+psycopg://est@db.example/est", **{key: 0})


def test_an_unreadable_password_file_is_one_line_naming_it(pki_dir, tmp_path):
    settings = settings_with(pki_dir, url="postgresql+psycopg://est@127.0.0.1/est", password_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"^database.password_file .*absent: cannot read it \(No such file or directory\)$"):
        Store(settings.database.url, settings.database)


def test_the_password_comes_from_password_file(postgres_cluster, tmp_path):
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name, password=False)
    with pytest.raises(sa.exc.OperationalError, match="password"):  # none given: the server asks for one
        Store(url).count_certificates()
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        Store(url, DatabaseSettings(url=url, password_file=wrong)).count_certificates()
    store = Store(url, DatabaseSettings(url=url, password_file=postgres_cluster.password_file))
    store.create_schema()
    assert store.count_certificates() == 0


def test_a_held_lock_costs_a_writer_statement_timeout_then_operational_error(make_config, postgres_cluster, tmp_path):
    """Another session holds the device's row lock: enroll_device gives up after statement_timeout (1 s), not never."""
    store = open_store(make_config(database={
        "url": postgres_cluster.url(postgres_cluster.create_database(), password=False),
        "password_file": str(postgres_cluster.password_file), "statement_timeout": 1,
    }))
    store.create_schema()
    store.enroll_device(record(), "NPPLOCK1", "renew", "")
    holder = store.engine.connect()
    holder.begin()
    holder.execute(sa.select(devices.c.id).where(devices.c.device_key == "NPPLOCK1").with_for_update()).all()
    try:
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
            store.enroll_device(record(), "NPPLOCK1", "renew", "")
        assert 0.9 <= time.monotonic() - started < 10
    finally:
        holder.rollback()
        holder.close()
    store.enroll_device(record(), "NPPLOCK1", "renew", "")  # and the lock once released is no obstacle


def test_a_thread_reads_through_one_connection_left_idle_and_sees_every_commit(postgres_cluster):
    """The per-request reads (est_app.store.connections.ReadConnections): no check-out, ping or transaction for each."""
    url = postgres_cluster.url(postgres_cluster.create_database())
    store = Store(url)
    store.create_schema()
    for number in range(5):
        store.add_user(f"user{number}", "hash")
    handed = []
    sa.event.listen(store.engine.pool, "checkout", lambda *_args: handed.append(1))
    other = sa.create_engine(url, poolclass=sa.pool.NullPool).connect()  # another host's session
    for number in range(5):
        insert = "INSERT INTO users (name, password_hash, role, created_at) VALUES (:name, 'hash', 'est', now())"
        other.execute(sa.text(insert), {"name": f"other{number}"})
        other.commit()
        assert store.get_user(f"user{number}") is not None and store.get_user(f"other{number}") is not None
    assert len(handed) == 1  # the first read's connection, kept
    # Each SELECT ran alone (autocommit): no session of the store's is left inside a transaction.
    waiting = other.execute(sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
    )).scalar_one()
    assert waiting == 0
    other.close()


# est-server's worker as it uses PostgreSQL: gevent's patches, EST and OCSP on the hub, an app thread beside it.
PATCHED_WORKER = """
import sys, threading, time
from gevent import monkey
monkey.patch_all(thread=False)
import gevent
import sqlalchemy as sa
from est_app import hub
from est_app.store import Store

hub.run_greenlets_here()
store = Store(sys.argv[1])
store.add_user("gateway", "hash")

def read_on_the_hub():
    for _ in range(10):
        assert store.get_user("gateway") is not None

ticks = []
def tick():
    while True:
        ticks.append(1)
        gevent.sleep(0)

def sessions():  # the database's client sessions, counted from one more
    with sa.create_engine(sys.argv[1], poolclass=sa.pool.NullPool).connect() as other:
        return other.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'"
        )).scalar_one() - 1

ticker = gevent.spawn(tick)
before = sessions()  # the pool's connection that added the user
readers = [gevent.spawn(read_on_the_hub) for _ in range(8)]  # more than the hub's read connections: the rest wait their turn
gevent.joinall(readers, raise_error=True)
reading = sessions() - before

def hold_a_pooled_connection():  # past the pool's 15 (5 + 10 overflow): those after wait for one, cooperatively
    with store.engine.connect() as connection:
        connection.execute(sa.text("SELECT pg_sleep(0.2)"))

started = time.monotonic()
holders = [gevent.spawn(hold_a_pooled_connection) for _ in range(20)]
gevent.joinall(holders, raise_error=True)
pooled = time.monotonic() - started
ticker.kill()

iterations = []
def app_thread():
    assert store.get_user("gateway") is not None  # connects (cooperatively: a hub of its own)
    loop = gevent.get_hub().loop
    before = loop.iteration
    for _ in range(20):
        assert store.get_user("gateway") is not None
    iterations.append(loop.iteration - before)
thread = threading.Thread(target=app_thread)
thread.start()
thread.join()
print(len(ticks), iterations[0], reading, pooled)
"""


def test_reads_wait_for_postgresql_cooperatively_on_the_hub_and_natively_on_app_threads(postgres_cluster):
    """psycopg's wait under gevent's patches ran a gevent loop on every app thread for each round trip;
    on the hub, greenlets reading at once must not share one connection (a blocked thread, for good),
    and a greenlet waiting for a pooled connection must not block the thread that its holders need."""
    url = postgres_cluster.url(postgres_cluster.create_database())
    Store(url).create_schema()
    result = subprocess.run([sys.executable, "-c", PATCHED_WORKER, url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ticks, iterations, reading, pooled = result.stdout.split()
    assert int(ticks) >= 20  # the hub's other greenlets ran while its reads waited for the database (none blocked it)
    assert int(iterations) == 0  # the app thread's reads waited in psycopg's C wait, no gevent loop turning
    assert 1 <= int(reading) <= ReadConnections.HUB_READERS  # eight readers at once, on the hub's few connections
    # Two rounds of pg_sleep(0.2): QueuePool's own wait blocked the thread until its 30 s timeout.
    assert float(pooled) < 5


# The first requests of a worker that started with nothing connected, all at once on the hub.
FIRST_CONNECTS = """
import sys
from gevent import monkey
monkey.patch_all(thread=False)
import gevent
from est_app import hub
from est_app.store import Store

hub.run_greenlets_here()
store = Store(sys.argv[1])
readers = [gevent.spawn(store.get_user, "nobody") for _ in range(8)]
gevent.joinall(readers, raise_error=True)
print(sum(reader.value is None for reader in readers))
"""


def test_greenlets_connecting_first_at_once_do_not_block_the_hub(postgres_cluster):
    """SQLAlchemy sets its dialect up on a pool's first connection, with queries, under a real lock: a second
    greenlet connecting meanwhile waited on that lock, in the thread its holder needed, for good."""
    url = postgres_cluster.url(postgres_cluster.create_database())
    Store(url).create_schema()
    result = subprocess.run([sys.executable, "-c", FIRST_CONNECTS, url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8"]

