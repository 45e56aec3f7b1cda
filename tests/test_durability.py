"""Durability under crashes (issue 11), on SQLite and PostgreSQL: a certificate a client received is on record.

Real gunicorn over TLS (tests/server.py), two workers of four app threads, several clients
enrolling a new device on every request over kept-alive connections and keeping every
certificate they receive. Under that load each worker is SIGKILLed in turn (the master
starts new ones), then the whole server, master and workers at once; a new server starts
on the same database and serves again. Then every certificate any client received must be
in the store: its serial with the same DER, its device (pointing at it) and its audit row;
serials are unique, and the database is intact (SQLite ``PRAGMA integrity_check``;
PostgreSQL's amcheck on every index of the tables written).

The test fails if an answer ever leaves before its rows are committed: a kill between the
two loses rows a client holds. A SIGKILL leaves what the process wrote to the OS in place,
so this proves the order of commit and answer, not what ``synchronous=FULL`` adds against
power loss.
"""

from __future__ import annotations

import base64
import http.client
import os
import signal
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from .conftest import PASSWORD, USER, open_store, run_cli
from .pki import der, make_csr
from .server import RunningServer, start_server

pytestmark = [pytest.mark.both_databases, pytest.mark.e2e]

CLIENTS = 6
PROGRESS_SECONDS = 60  # for a server (re)started or a worker replaced to answer again; generous: the machine is shared
TABLES = ("devices", "certificates", "audit_events")


@dataclass
class Received:
    """What the clients were answered: every certificate (DER) by device, and any status other than 200."""

    certificates: dict[str, bytes] = field(default_factory=dict)
    other_statuses: list[tuple[int, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.certificates)


class Clients:
    """``CLIENTS`` threads, each enrolling NPPDUR<client>-<n> devices in turn on a kept-alive TLS connection to
    ``server`` (replaced by :meth:`aim`), reconnecting after any connection error."""

    def __init__(self, server: RunningServer, received: Received) -> None:
        self.server, self.received = server, received
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]
        self.token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        for thread in self.threads:
            thread.start()

    def aim(self, server: RunningServer) -> None:
        self.server = server

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=PROGRESS_SECONDS)

    def _run(self, client: int) -> None:
        conn, n = None, 0
        while not self.stopped.is_set():
            n += 1
            device = f"NPPDUR{client}-{n}"
            body = base64.b64encode(der(make_csr(device)))
            try:
                if conn is None:
                    server = self.server
                    context = ssl.create_default_context(cafile=str(server.ca_file))
                    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
                headers = {"Content-Type": "application/pkcs10", "Authorization": f"Basic {self.token}"}
                conn.request("POST", "/.well-known/est/simpleenroll", body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):  # the worker or server was killed: no answer, nothing to check
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
                continue
            with self.received.lock:
                if response.status == 200:
                    (certificate,) = pkcs7.load_der_pkcs7_certificates(answer)
                    self.received.certificates[device] = der(certificate)
                else:
                    self.received.other_statuses.append((response.status, answer))
        if conn is not None:
            conn.close()


def workers_of(master: int) -> list[int]:
    """The gunicorn workers: the master's child processes."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == master:
            children.append(int(stat.parent.name))
    return children


def wait_for_more(received: Received, than: int, what: str) -> None:
    deadline = time.monotonic() + PROGRESS_SECONDS
    while received.count() < than + 2 * CLIENTS:
        assert time.monotonic() < deadline, f"no enrollments for {PROGRESS_SECONDS} s {what}"
        time.sleep(0.05)


def start(pki_dir: Path, workdir: Path, database: dict) -> RunningServer:
    workdir.mkdir(exist_ok=True)
    return start_server(
        pki_dir, workdir, server={"workers": 2, "threads": 4}, database=database, rate_limit={"enabled": False}, response_format="der"
    )


def assert_intact(request, config: Path, database: str) -> None:
    settings_url = open_store(config).engine.url
    if database == "sqlite":
        with sqlite3.connect(settings_url.database) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        return
    cluster = request.getfixturevalue("postgres_cluster")
    name = settings_url.database
    cluster.psql("CREATE EXTENSION IF NOT EXISTS amcheck", name)
    # Every B-tree index of the tables, heap included (bt_index_check raises on corruption); CASE keeps it off the others.
    checked = cluster.psql(
        "SELECT count(CASE WHEN a.amname = 'btree' THEN bt_index_check(i.indexrelid::regclass, true)::text || 'ok' END) "
        "FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
        f"WHERE t.relname IN {TABLES!r}", name
    )
    assert int(checked) >= len(TABLES)


def test_nothing_a_client_received_is_lost_when_workers_and_then_the_server_are_killed(pki_dir, tmp_path, new_database, database, request):
    section = new_database(tmp_path)
    received = Received()
    server = start(pki_dir, tmp_path / "first", section)
    clients = None
    try:
        result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config)
        assert result.exit_code == 0, result.output
        clients = Clients(server, received)
        wait_for_more(received, 0, "after start")

        for worker in workers_of(server.process.pid):  # one at a time, each under load; the master replaces it
            before = received.count()
            os.kill(worker, signal.SIGKILL)
            wait_for_more(received, before, f"after worker {worker} was killed")

        doomed = [server.process.pid, *workers_of(server.process.pid)]
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        server.process.wait(timeout=PROGRESS_SECONDS)
        killed_at = received.count()

        server = start(pki_dir, tmp_path / "second", section)  # the same database, as systemd would restart it
        clients.aim(server)
        wait_for_more(received, killed_at, "after the restart")
    finally:
        if clients is not None:
            clients.stop()
        server.stop()

    assert received.other_statuses == []
    store = open_store(server.config)
    devices = {d.device_key: d for d in store.find_devices(search="NPPDUR", limit=10**6)}
    audited = {(e.device, e.serial) for e in store.audit_events() if e.event == "enroll"}
    lost = []
    for device, certificate in received.certificates.items():
        serial = format(x509.load_der_x509_certificate(certificate).serial_number, "x")
        record = store.get_certificate(serial)
        if record is None or record.der != certificate or devices.get(device) is None or devices[device].current_serial != serial:
            lost.append(device)
        elif (device, serial) not in audited:
            lost.append(f"{device} (audit row)")
    assert lost == [], f"{len(lost)} of {len(received.certificates)} certificates the clients received are not on record: {lost[:5]}"
    assert len(received.certificates) > 4 * CLIENTS
    serials = [format(x509.load_der_x509_certificate(c).serial_number, "x") for c in received.certificates.values()]
    assert len(set(serials)) == len(serials)
    assert store.count_certificates() >= len(serials)  # plus those answered to no one: killed before the response left
    assert_intact(request, server.config, database)
