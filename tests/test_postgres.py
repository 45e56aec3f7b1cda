"""The ``database`` section for PostgreSQL: where the password comes from, and the time bounds.

The password never lives in the YAML: a URL holding one is refused at validation with a line
saying where it goes; ``database.password_file`` (a systemd credential) is read as the CA key's
passphrase file is. A lock held by another transaction costs a writer at most
``statement_timeout``, then the store raises OperationalError (the app's 503).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from est_app.config import ConfigError, DatabaseSettings, parse_config
from est_app.store import Store
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
