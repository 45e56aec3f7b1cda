"""Connections opened together are spread over est-server's workers (est_app/balance.py), on the real server over TLS."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from est_app.balance import ConnectionCounts

from .server import RunningServer, start_server

pytestmark = pytest.mark.e2e

ROUNDS = 5
CONNECTIONS = 8


def held_by_worker(server: RunningServer) -> Counter[int]:
    """Established connections on the server's port, by the pid of the worker holding them (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if local_port == server.port and state == "01":  # ESTABLISHED
                inodes.add(f"socket:[{inode}]")
    workers = [int(pid) for pid in Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()]
    held: Counter[int] = Counter({pid: 0 for pid in workers})
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    held[pid] += 1
            except OSError:
                pass  # closed meanwhile
    return held


def open_together(server: RunningServer, count: int) -> list[ssl.SSLSocket]:
    """``count`` TLS connections opened at the same moment, each kept alive after one answered request."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    start, opened, errors = threading.Barrier(count), [], []

    def connect() -> None:
        try:
            start.wait()
            conn = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=30), server_hostname="127.0.0.1")
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200 ")
            opened.append(conn)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return opened


def wait_for(condition, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_workers(pki_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("balance")
    server = start_server(pki_dir, workdir, database={"url": f"sqlite:///{workdir / 'est.db'}"}, server={"workers": 2})
    yield server
    server.stop()


def test_connections_opened_together_are_split_between_the_workers(two_workers):
    # Both workers must be serving before the first round (the second may still be loading the app).
    wait_for(lambda: len(held_by_worker(two_workers)) == 2, 60)
    wait_for(lambda: _both_serving(two_workers), 60)
    splits = []
    for _ in range(ROUNDS):
        wait_for(lambda: sum(held_by_worker(two_workers).values()) == 0)
        connections = open_together(two_workers, CONNECTIONS)
        try:
            wait_for(lambda: sum(held_by_worker(two_workers).values()) == CONNECTIONS)
            splits.append(sorted(held_by_worker(two_workers).values()))
        finally:
            for conn in connections:
                conn.close()
    # Without the balance, splits of 8-0 and 7-1 were common; a sibling busy for more than
    # balance.MAX_WAIT may let one connection more go to the other.
    assert all(high - low <= 2 for low, high in splits), splits
    assert sum(high - low for low, high in splits) <= ROUNDS, splits


def _both_serving(server: RunningServer) -> bool:
    """Whether both workers took some of four connections opened together."""
    connections = open_together(server, 4)
    try:
        wait_for(lambda: sum(held_by_worker(server).values()) == 4)
        return min(held_by_worker(server).values()) > 0
    finally:
        for conn in connections:
            conn.close()


def test_a_slot_of_a_dead_worker_is_given_again_and_free_slots_hold_nobody_back():
    counts = ConnectionCounts()
    first, second = counts.reserve(), counts.reserve()
    assert first != second
    assert counts.fewest_elsewhere(first) is None  # reserved, not yet serving: not counted
    counts.take(second)
    counts.add(second, 3)
    assert counts.fewest_elsewhere(first) == 3
    assert counts.fewest_elsewhere(second) is None
    counts.release(second)
    assert counts.fewest_elsewhere(first) is None
    assert counts.reserve() == second  # released: given again
    worker = os.fork()
    if worker == 0:  # a worker that takes its slot and dies without releasing it (SIGKILL, a crash)
        try:
            counts.take(first)
            counts.add(first, 1)
        finally:
            os._exit(0)
    os.waitpid(worker, 0)  # reaped, as gunicorn's master does before it forks the replacement
    assert counts.reserve() == first
