"""SQLite's writers take turns through ``<file>-writer`` (est_app.store.engine.WriterTurn): across processes too."""

import fcntl
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from est_app.config import DatabaseSettings
from est_app.store import Store, UserExists
from est_app.store.engine import Checkpointer, WriterTurn


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
        try:
            with turn:
                os._exit(0 if turn._descriptor != parent else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- one connection for a process's writes (est_app.store.connections.WriteConnection) ---


def checkouts(store: Store) -> list[int]:
    """A list that grows by one with each connection the store's pool hands this thread from now on
    (not the checkpoint thread's)."""
    handed, here = [], threading.get_ident()
    sa.event.listen(store.engine.pool, "checkout", lambda *_args: handed.append(1) if threading.get_ident() == here else None)
    return handed


def test_a_process_writes_through_one_connection(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'est.db'}")
    store.create_schema()
    handed = checkouts(store)
    for number in range(20):
        store.add_user(f"user{number}", "hash")
    assert len(handed) == 0  # the connection the schema was written through serves them all
    assert len(store.list_users()) == 20


def test_a_write_whose_transaction_failed_leaves_the_next_a_fresh_connection(tmp_path):
    database = tmp_path / "est.db"
    store = Store(f"sqlite:///{database}", DatabaseSettings(statement_timeout=1))
    store.create_schema()
    store.add_user("before", "hash")
    handed = checkouts(store)
    with pytest.raises(UserExists):  # fails inside its transaction
        store.add_user("before", "hash")
    other = sqlite3.connect(database, isolation_level=None)  # another program holds SQLite's write lock
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):  # fails to begin at all
        store.add_user("refused", "hash")
    other.execute("ROLLBACK")
    other.close()
    store.add_user("after", "hash")
    store.add_user("later", "hash")
    assert len(handed) == 2  # a fresh connection after each of the two failures, then kept
    assert [u.name for u in store.list_users()] == ["after", "before", "later"]


def test_a_forked_process_writes_through_a_connection_of_its_own(tmp_path):
    database = tmp_path / "est.db"
    store = Store(f"sqlite:///{database}")
    store.create_schema()
    store.add_user("parent-before", "hash")
    child = os.fork()
    if child == 0:
        try:
            store.add_user("child", "hash")
            os._exit(0 if store.get_user("child") is not None else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.add_user("parent-after", "hash")
    assert [u.name for u in store.list_users()] == ["child", "parent-after", "parent-before"]
    check = sqlite3.connect(database)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()


# --- each thread's reads on a connection of its own (est_app.store.connections.ReadConnections) ---


def test_a_thread_reads_through_one_connection_that_sees_every_commit_at_once(tmp_path):
    database = tmp_path / "est.db"
    store = Store(f"sqlite:///{database}")
    store.create_schema()
    handed = checkouts(store)
    other = sqlite3.connect(database, isolation_level=None)  # another program writing the file
    for number in range(10):
        store.add_user(f"user{number}", "hash")
        insert = "INSERT INTO users (name, password_hash, role, created_at) VALUES (?, 'hash', 'est', '2026-01-01')"
        other.execute(insert, (f"other{number}",))
        assert store.get_user(f"user{number}") is not None and store.get_user(f"other{number}") is not None
    assert len(handed) == 1  # the first read's, kept for the rest
    # No read leaves a snapshot open: a checkpoint can copy the whole log and start it afresh.
    assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    other.close()
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(store.get_user("user3")))
    counted = []
    sa.event.listen(store.engine.pool, "checkout", lambda *_args: counted.append(threading.get_ident()))
    thread.start()
    thread.join()
    assert elsewhere[0] is not None and counted == [thread.ident]  # another thread reads on a connection of its own


def test_a_read_that_failed_and_a_disposed_engine_leave_the_next_read_a_fresh_connection(tmp_path):
    database = tmp_path / "est.db"
    store = Store(f"sqlite:///{database}")
    store.create_schema()
    store.add_user("kept", "hash")
    handed = checkouts(store)
    store.engine.dispose()
    assert store.get_user("kept") is not None and store.get_user("kept") is not None
    assert len(handed) == 1
    other = sqlite3.connect(database, isolation_level=None)
    other.execute("ALTER TABLE users RENAME TO users_away")
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError, match="no such table"):
            store.get_user("kept")
    other.execute("ALTER TABLE users_away RENAME TO users")
    other.close()
    assert store.get_user("kept") is not None and store.get_user("kept") is not None
    assert len(handed) == 3  # after the dispose and after each failure, a fresh one, then kept


def test_a_forked_process_reads_through_a_connection_of_its_own(tmp_path):
    database = tmp_path / "est.db"
    store = Store(f"sqlite:///{database}")
    store.create_schema()
    store.add_user("before", "hash")
    assert store.get_user("before") is not None  # the parent's read connection is open
    assert len(store.list_users()) == 1  # and its pool holds one of its connections
    child = os.fork()
    if child == 0:
        try:
            connected, here = [], threading.get_ident()  # connections this thread opened, none of the parent's reused
            sa.event.listen(store.engine, "connect", lambda *_args: connected.append(1) if threading.get_ident() == here else None)
            store.add_user("child", "hash")
            os._exit(0 if store.get_user("child") is not None and len(connected) == 2 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    handed = checkouts(store)
    assert store.get_user("child") is not None and len(handed) == 0  # the parent's, untouched by the child
    check = sqlite3.connect(database)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()


def log_frames(database: str) -> tuple[int, int]:
    """(frames in the write-ahead log, frames of it copied into the file), from the log's index in
    ``<file>-shm`` (sqlite.org/walformat.html: mxFrame at byte 16, nBackfill at byte 96)."""
    index = open(f"{database}-shm", "rb").read(100)
    return int.from_bytes(index[16:20], sys.byteorder), int.from_bytes(index[96:100], sys.byteorder)


def test_commits_leave_the_log_to_a_checkpoint_thread(tmp_path):
    database = str(tmp_path / "est.db")
    store = Store(f"sqlite:///{database}")
    store.create_schema()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0  # no commit stops to copy the log
    for number in range(300):  # past SQLite's own threshold of 1,000 pages, one commit each
        store.add_user(f"user{number:04d}-" + "x" * 200, "hash" * 500)
    frames, _ = log_frames(database)
    assert frames > 0
    deadline = time.monotonic() + 10
    while log_frames(database)[1] < log_frames(database)[0]:
        assert time.monotonic() < deadline, f"log not checkpointed: {log_frames(database)}"
        time.sleep(0.05)
    assert [t.name for t in threading.enumerate()].count(f"checkpoint {database}-writer") == 1  # one thread, for all the writes


def test_sqlite_in_memory_keeps_its_own_checkpoints(tmp_path):
    store = Store("sqlite://")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000


def test_the_log_starts_afresh_while_writes_go_on(tmp_path):
    """The checkpoint takes the writer's turn: beside writers that kept appending, it copied all it found
    but the log never restarted and grew without bound."""
    database = str(tmp_path / "est.db")
    store = Store(f"sqlite:///{database}")
    store.create_schema()
    frames = []
    deadline = time.monotonic() + 4 * Checkpointer.INTERVAL + 2
    number = 0
    while time.monotonic() < deadline and not (frames and max(frames) > frames[-1] + 50):
        store.add_user(f"user{number:05d}", "hash" * 100)
        store.get_user(f"user{number:05d}")
        number += 1
        frames.append(log_frames(database)[0])
    assert max(frames) > frames[-1] + 50, f"the log only grew: {frames[::50]}"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs to fill (mounting needs root, as CI runs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_checkpoint_that_fails_is_logged_once_and_so_is_its_recovery(small_disk, caplog):
    """A failed checkpoint leaves the log growing: the operator hears of it, once, not at every try."""
    database = str(small_disk / "est.db")
    store = Store(f"sqlite:///{database}")
    store.create_schema()
    checkpointer = store._write_lock.checkpointer
    for number in range(40):  # the log's file grows to hold ~160 KB, then is all copied into the file
        store.add_user(f"first{number:02d}", "h" * 4000)
    checkpointer.checkpoint()
    assert log_frames(database)[1] == log_frames(database)[0]
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # the disk full: the log's file has room for new pages, the database none
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
    for number in range(8):
        store.add_user(f"second{number}", "h" * 4000)
    for _ in range(3):
        checkpointer.checkpoint()
    warnings = [r.getMessage() for r in caplog.records if r.name == "est_app.store.engine"]
    assert len(warnings) == 1 and warnings[0].startswith(f"cannot checkpoint {database}: database or disk is full"), warnings
    filler.unlink()
    checkpointer.checkpoint()
    checkpointer.checkpoint()
    warnings = [r.getMessage() for r in caplog.records if r.name == "est_app.store.engine"]
    assert warnings[1:] == [f"checkpoints of {database} succeed again"]
    assert log_frames(database)[1] == log_frames(database)[0]  # all of it copied in the end
    assert len(store.list_users()) == 48


def test_a_process_forked_while_a_thread_holds_the_turn_takes_turns_of_its_own(tmp_path):
    """gunicorn forks workers from a master whose checkpoint thread may hold the turn at that moment."""
    turn = WriterTurn(str(tmp_path / "est.db"), timeout=5)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with turn:
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    child = os.fork()
    if child == 0:
        try:
            with turn:  # after the parent's thread lets go of the flock
                os._exit(0)
        finally:
            os._exit(2)
    time.sleep(0.2)
    release.set()
    holder.join()
    deadline = time.monotonic() + 10
    while (ended := os.waitpid(child, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(child, 9)
            os.waitpid(child, 0)
            pytest.fail("the child waited for a lock only its parent's thread could release")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(ended[1]) == 0
