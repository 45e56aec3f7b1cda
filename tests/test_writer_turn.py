"""SQLite's writers take turns through ``<file>-writer`` (est_app.store.engine.WriterTurn): across processes too."""

import fcntl
import os
import time

import pytest
import sqlalchemy as sa

from est_app.config import DatabaseSettings
from est_app.store import Store
from est_app.store.engine import WriterTurn


def test_a_write_waits_for_another_process_turn_and_goes_as_soon_as_it_ends(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'est.db'}", DatabaseSettings(statement_timeout=1))
    store.create_schema()
    read, write = os.pipe()
    holder = os.fork()
    if holder == 0:  # another worker: takes the turn, holds it until told, then lets go
        descriptor = os.open(tmp_path / "est.db-writer", os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(write, b"held")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(read, 4) == b"held"
        started = time.monotonic()
        # SQLite's own lock is free: only the turn holds this write back, for statement_timeout.
        with pytest.raises(sa.exc.OperationalError, match="database is locked"):
            store.add_user("waited", "hash")
        assert 0.9 < time.monotonic() - started < 2.5
        assert store.get_user("waited") is None
    finally:
        os.waitpid(holder, 0)
    started = time.monotonic()
    store.add_user("after", "hash")  # the holder exited: its turn went with it
    assert time.monotonic() - started < 0.5
    assert store.get_user("after") is not None


def test_each_process_takes_its_turn_on_a_descriptor_of_its_own(tmp_path):
    """A descriptor inherited across fork shares its flock: a forked worker must open the lock file again."""
    turn = WriterTurn(str(tmp_path / "est.db"), timeout=1)
    with turn:
        parent = turn._descriptor
    child = os.fork()
    if child == 0:
        with turn:
            os._exit(0 if turn._descriptor != parent else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0

