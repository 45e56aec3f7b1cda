"""Operations benchmark: the CRL with many revoked certificates, the admin lists with many devices, OCSP.

Run from the repository root (pytest does not collect it: the name is bench_*.py):

    python -m tests.benchmarks.bench_operations                            # 100,000 devices, 100,000 revoked, 10 s wrk runs
    python -m tests.benchmarks.bench_operations --devices 100000 1000000   # also a million devices
    python -m tests.benchmarks.bench_operations --skip crl ocsp --database sqlite postgresql   # the lists on both backends
    python -m tests.benchmarks.bench_operations --revoked 100000 --seconds 5 --skip devices
    python -m tests.benchmarks.bench_operations --explain                  # query plans and per-statement times for every page
    python -m tests.benchmarks.bench_operations --wait-quiet 60            # shared machine: wait for idle cores before each part

Everything happens in one temporary directory, removed at the end (``--keep``
keeps it), each store in its own directory made by ``est-admin init --dir``;
servers are the real thing (``tests.server.start_server``: gunicorn over TLS on a
free loopback port) with rate limiting off. Every wrk run lasts ``--seconds``.

1. CRL. ``--revoked`` revoked certificate rows (random 159-bit serials as the CA
   draws them, reasons in a realistic mix, revoked over the past year, still
   within validity) go into the ``certificates`` table with executemany. Then:
   ``CRLCache.regenerate()`` (median of 3; its parts timed apart: the store
   query, ``build_crl``, and how long another writer waits for the store's
   write lock meanwhile), the DER size, the same CRL made by ``openssl ca
   -gencrl`` from an index.txt of the same entries (C reference for time and
   size), the cached path ``CRLCache.current()`` (p50 us) and ``GET /crl`` over
   the server with wrk at 8 connections keep-alive, checking that no CRL was
   signed during the run (served from each worker's cache, not rebuilt).
2. OCSP, on the same store. A certificate is enrolled through the server and
   checked by hand; then a fleet of ``--ocsp-fleet`` known certificates (10,000,
   one in 97 revoked) goes into the store, and OCSPRequestBuilder requests for
   random ones of them (DER, SHA-1 CertID as OpenSSL sends, no nonce) are POSTed
   to ``/ocsp`` by wrk with a Lua script at 8 connections keep-alive, twice: the
   workers' caches of signed answers cold, then warm; against the target
   (3,000/s, p99 < 20 ms). Beside it the in-process floor of
   ``OCSPResponder.respond()`` over the fleet (cache cold, warm, nonce requests
   signed every time, signing alone, the store lookup alone), and ``GET /healthz``
   under the same load (what gunicorn, TLS and Flask cost with no work).
3. Admin lists, for each ``--devices`` N and each ``--database`` (sqlite; postgresql:
   a throwaway cluster from tests/postgres.py, VACUUM ANALYZE after the fill as
   autovacuum would do) in a fresh store at the newest schema revision: ``fill`` (devices,
   their certificates, an enroll event each, executemany in chunks, bulk-load
   pragmas on its own connection; timed, stopped at ``--max-fill-seconds``),
   then 20 requests of each page -- first page, a deep keyset page, CN
   substring search, numeric-id search, status=revoked, expiry window, the
   statistics/overview, one device -- through the JSON API over gunicorn TLS
   (HTTP Basic, one keep-alive connection) and through the dashboard with the
   Flask test client (session sign-in). p50 and p99 (of 20 requests the p99 is
   the slowest); search, status and expiry pages against their own 50 ms
   target (the indexes of schema revision 0002). Then keyset against OFFSET at
   the same deep page, in SQL. Pages over the target get their SQL statements
   timed one by one and their query plans printed (``--explain`` does it for every page).

The load generator shares the machine's cores with the server; each wrk row
says when other processes used more than 0.3 cores meanwhile.
Exit status: 0 when every check passed (responses 200, statuses as expected,
no CRL signed while serving), 1 otherwise; targets missed are reported, not
failed on.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a path: make `tests` and `est_app` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sqlalchemy as sa  # noqa: E402
import yaml  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.serialization import pkcs7  # noqa: E402
from cryptography.x509 import ocsp  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from tests.benchmarks.bench_enroll import (  # noqa: E402
    WRK, base64_body, busy_cpu_seconds, cpu_seconds, make_csr_der, process_tree, wait_until_quiet,
)
from tests.server import BIN, RunningServer, start_server  # noqa: E402

ADMIN = "admin1"
ADMIN_PASSWORD = "bench admin password, not a secret"
USER = "bench-gateway"
PASSWORD = "bench password, not a secret"
REQUESTS_PER_PAGE = 20
PAGE_TARGET_MS = 100.0  # an admin page (list, search, overview) should answer within this, p50
INDEXED_TARGET_MS = 50.0  # substring search and the status/expiry filters at 1M devices (schema revision 0002), p50
FILL_BUDGET_S = 300.0  # a fill that would take longer than this is not run (see --max-fill-seconds)
CURRENT_TARGET_US = 1000.0
OCSP_TARGET_RPS = 3_000  # issue 11: keep-alive OCSP for a fleet of 10,000 certificates, with p99 under 20 ms
OCSP_P99_TARGET_MS = 20.0
WRITER_WAIT_TARGET_MS = 100.0  # how long a revocation may hold up an enrollment's write  # the cached CRL path: one small query, well under a millisecond
REASON_MIX = (  # what hospitals revoke for, roughly: decommissioned pumps, replacements, lost ones
    ("cessationOfOperation", 45), ("superseded", 25), ("keyCompromise", 10), ("affiliationChanged", 8),
    ("unspecified", 7), ("privilegeWithdrawn", 5),
)  # fmt: skip


# --------------------------------------------------------------------------- small helpers


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: of 20 values p50 is the 10th smallest and p99 the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def fmt_ms(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_s(seconds: float) -> str:
    return fmt_ms(seconds * 1000) if seconds < 1 else f"{seconds:,.2f} s"


def run(cmd: list[str], *, input: Optional[str] = None, timeout: float = 300, cwd: Optional[Path] = None) -> str:
    result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return result.stdout


def init_store(pki_dir: Path, database_url: Optional[str] = None) -> Path:
    """`est-admin init --dir`, a Basic EST user and an admin (through the real CLI); the config's path.

    ``database_url``: use that (empty) database instead of init's SQLite file.
    """
    run([str(BIN / "est-admin"), "init", "--dir", str(pki_dir)])
    config = pki_dir / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["rate_limit"] = {"enabled": False}  # for the in-process app; the servers get the same override
    if database_url is not None:
        data["database"] = {"url": database_url}
    config.write_text(yaml.safe_dump(data))
    from tests.conftest import run_cli  # imported here: it pulls in pytest

    for name, password, extra in ((USER, PASSWORD, ()), (ADMIN, ADMIN_PASSWORD, ("--admin",))):
        result = run_cli("user", "add", name, *extra, input=password + "\n", config=config)
        if result.exit_code != 0:
            raise RuntimeError(f"est-admin user add {name}: {result.output}")
    return config


def make_app(config: Path):
    from est_app import create_app

    app = create_app(config)
    app.config["TESTING"] = True
    return app


def db_path(engine: Engine) -> Path:
    return Path(engine.url.database)


def db_size(engine: Engine) -> int:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one()
    path = db_path(engine)
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


@dataclass
class Row:
    """One line of the final table."""

    section: str
    what: str
    result: str
    compared: str = ""
    verdict: str = ""  # PASS / MISS / OK / FAIL / "" (a reference only)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failed checks: exit 1
    notes: list[str] = field(default_factory=list)  # profiles, explanations: printed after the table
    data: dict = field(default_factory=dict)

    def add(self, section: str, what: str, result: str, compared: str = "", verdict: str = "") -> None:
        self.rows.append(Row(section, what, result, compared, verdict))
        print(f"  {what:<52} {result:>18}   {compared}{'  ' + verdict if verdict else ''}", flush=True)

    def check(self, ok: bool, problem: str) -> str:
        if not ok:
            self.problems.append(problem)
        return "OK" if ok else "FAIL"

    def print_table(self) -> None:
        widths = [max(len(getattr(r, f)) for r in self.rows) for f in ("what", "result", "compared")]
        widths = [max(w, len(h)) for w, h in zip(widths, ("measurement", "result", "compared to"))]
        line = f"{'measurement':<{widths[0]}}  {'result':>{widths[1]}}  {'compared to':<{widths[2]}}  verdict"
        print("\n" + "=" * len(line) + "\nRESULTS\n" + "=" * len(line))
        section = None
        for r in self.rows:
            if r.section != section:
                section = r.section
                print(f"\n[{section}]\n{line}\n{'-' * len(line)}")
            print(f"{r.what:<{widths[0]}}  {r.result:>{widths[1]}}  {r.compared:<{widths[2]}}  {r.verdict}")


def quiet(args) -> None:
    """With ``--wait-quiet``: wait (bounded) for other processes to leave the shared cores idle."""
    if args.wait_quiet > 0:
        wait_until_quiet(args.wait_quiet)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --------------------------------------------------------------------------- bulk data


@dataclass
class FillStats:
    devices: int
    certificates: int
    events: int
    seconds: float

    @property
    def devices_per_second(self) -> float:
        return self.devices / self.seconds

    @property
    def rows_per_second(self) -> float:
        return (self.devices + self.certificates + self.events) / self.seconds


def device_key(i: int, width: int = 6) -> str:
    return f"NPP{i:0{width}d}"


def key_width(n: int) -> int:
    return max(6, len(str(n)))


def fill(
    engine: Engine,
    n: int,
    *,
    start: int = 1,
    label: str = "default",
    renewed_every: int = 5,
    revoked_every: int = 97,
    events: bool = True,
    chunk: int = 20_000,
    seed: int = 7,
    der_size: int = 700,
    now: Optional[datetime] = None,
    budget_s: Optional[float] = None,
    bulk_pragmas: bool = True,
) -> FillStats:
    """``n`` devices (ids ``start``..``start+n-1``, keys NPP000001...) fast, straight into the store's tables.

    One in ``renewed_every`` renewed once (a superseded certificate before its current
    one), one in ``revoked_every`` with its current certificate revoked (keyCompromise),
    issue times over the past 400 days (more of them recent), an enroll audit event
    each (ids in time order, as the server writes them). executemany in chunks of
    ``chunk`` devices, one transaction each, so memory and the WAL stay small; the
    events go in last, sorted by time. Certificate bodies are ``der_size`` random bytes.

    ``bulk_pragmas``: the fill's SQLite connections get a 512 MB page cache and
    ``synchronous=OFF`` (a bulk load: give it an engine of its own, not a server's).
    ``budget_s``: stop after the chunk that passes it; the stats say how far it got.
    """
    rng, blob = random.Random(seed), os.urandom(der_size)
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    width = key_width(start + n - 1)
    from est_app.store import schema

    def cert(serial, device_id, key, issued, status, operation):
        revoked = status == "revoked"
        return dict(serial=serial, device_id=device_id, common_name=key, subject=f"CN={key}", label=label,
                    requester="user:gateway", operation=operation, not_before=issued, not_after=issued + timedelta(days=365),
                    status=status, revoked_at=now if revoked else None, revocation_reason="keyCompromise" if revoked else None,
                    issued_at=issued, der=blob)  # fmt: skip

    began = time.perf_counter()
    certificates, event_keys, done = 0, [], 0

    def begin():
        conn = engine.connect()
        if bulk_pragmas and engine.dialect.name == "sqlite":  # on the driver's connection, outside any transaction
            for pragma in ("cache_size=-524288", "synchronous=OFF"):
                conn.connection.driver_connection.execute(f"PRAGMA {pragma}")
        return conn

    for first_id in range(start, start + n, chunk):
        if budget_s is not None and time.perf_counter() - began > budget_s:
            break
        device_rows, cert_rows = [], []
        for i in range(first_id, min(first_id + chunk, start + n)):
            key, serial = device_key(i, width), f"{rng.getrandbits(159):x}"
            issued = now - timedelta(days=rng.random() ** 2 * 400, seconds=rng.randrange(86400))
            renewed = renewed_every and i % renewed_every == 0
            first = issued - timedelta(days=rng.randrange(1, 200)) if renewed else issued
            if renewed:
                cert_rows.append(cert(f"{rng.getrandbits(159):x}", i, key, first, "superseded", "simpleenroll"))
            status = "revoked" if revoked_every and i % revoked_every == 0 else "valid"
            cert_rows.append(cert(serial, i, key, issued, status, "simplereenroll" if renewed else "simpleenroll"))
            device_rows.append(dict(id=i, label=label, device_key=key, first_enrolled=first, last_enrolled=issued,
                                    current_serial=serial, requester="user:gateway", client_address="10.0.0.5"))  # fmt: skip
            if events:
                event_keys.append((issued, key, serial))
        with begin() as conn, conn.begin():
            conn.execute(schema.devices.insert(), device_rows)
            conn.execute(schema.certificates.insert(), cert_rows)
        certificates += len(cert_rows)
        done += len(device_rows)
    event_keys.sort()
    for offset in range(0, len(event_keys), chunk * 2):
        rows = [dict(at=at, event="enroll", outcome="ok", actor="user:gateway", client_address="10.0.0.5", label=label,
                     device=key, serial=serial, detail="") for at, key, serial in event_keys[offset : offset + chunk * 2]]  # fmt: skip
        with begin() as conn, conn.begin():
            conn.execute(schema.audit_events.insert(), rows)
    return FillStats(done, certificates, len(event_keys), time.perf_counter() - began)


@dataclass
class RevokedFill:
    serials: list[str]
    reasons: dict[str, int]
    seconds: float


def fill_revoked(engine: Engine, n: int, *, chunk: int = 20_000, seed: int = 11, der_size: int = 700) -> RevokedFill:
    """``n`` revoked certificates (no device rows): 159-bit serials, revoked over the past year, still valid."""
    from est_app.store import schema

    rng, blob = random.Random(seed), os.urandom(der_size)
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    names, weights = zip(*REASON_MIX)
    serials, reasons = [], {name: 0 for name in names}
    began = time.perf_counter()
    for first in range(0, n, chunk):
        rows = []
        for i in range(first, min(first + chunk, n)):
            serial = f"{rng.getrandbits(159) | 1 << 158:x}"  # 40 hex digits, like x509.random_serial_number()
            issued = now - timedelta(days=rng.uniform(30, 360))
            revoked_at = issued + timedelta(days=rng.uniform(0, (now - issued).days), seconds=rng.randrange(86400))
            revoked_at = min(revoked_at, now).replace(microsecond=0)
            reason = rng.choices(names, weights)[0]
            reasons[reason] += 1
            key = f"NPPR{i:06d}"
            rows.append(dict(serial=serial, device_id=None, common_name=key, subject=f"CN={key}", label="default",
                             requester="user:gateway", operation="simpleenroll", not_before=issued,
                             not_after=issued + timedelta(days=400), status="revoked", revoked_at=revoked_at,
                             revocation_reason=reason, issued_at=issued, der=blob))  # fmt: skip
            serials.append(serial)
        with engine.begin() as conn:
            conn.execute(schema.certificates.insert(), rows)
    return RevokedFill(serials, reasons, time.perf_counter() - began)


# --------------------------------------------------------------------------- wrk


LUA = r"""-- generated by tests/benchmarks/bench_operations.py
wrk.method = "{method}"
{body}
{headers}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) ok, non2xx, bytes = 0, 0, 0 end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else non2xx = non2xx + 1 end
  bytes = bytes + #body
end
function done(summary, latency, requests)
  local o, n, b = 0, 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); n = n + t:get("non2xx"); b = b + t:get("bytes") end
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d ok=%d non2xx=%d body_bytes=%d errors=%d "
    .. "p50_us=%d p90_us=%d p99_us=%d max_us=%d\n", summary.requests, summary.duration, o, n, b,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def lua_bytes(data: bytes) -> str:
    """A Lua string literal of any bytes (decimal escapes)."""
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def write_lua(path: Path, method: str = "GET", body: Optional[bytes] = None, headers: Optional[dict[str, str]] = None) -> Path:
    path.write_text(LUA.format(
        method=method,
        body=f"wrk.body = {lua_bytes(body)}" if body is not None else "",
        headers="\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items()),
    ))  # fmt: skip
    return path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    ok: int
    non2xx: int
    errors: int
    body_bytes: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    other_cpu_s: float  # everything but the server and wrk during the run: other load on the shared cores

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def server_us_per_request(self) -> float:
        return self.server_cpu_s / self.requests * 1e6 if self.requests else float("nan")

    @property
    def load_note(self) -> str:
        other = self.other_cpu_s / self.seconds
        return f"; OTHER LOAD {other:.2f} cores: understated" if other > 0.3 else ""


def run_wrk(server: RunningServer, path: str, script: Path, seconds: float, connections: int = 8, threads: int = 2) -> WrkResult:
    if not server.alive():
        raise RuntimeError(f"server died:\n{server.log.read_text()[-3000:]}")
    cmd = [WRK, "-t", str(min(threads, connections)), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "30s",
           "--latency", "-s", str(script), server.url + path]  # fmt: skip
    pids = process_tree(server.process.pid)
    before, busy_before, wrk_before = cpu_seconds(pids), busy_cpu_seconds(), os.times()
    out = run(cmd, timeout=seconds + 60)
    server_cpu, busy, wrk_after = cpu_seconds(pids) - before, busy_cpu_seconds() - busy_before, os.times()
    wrk_cpu = (wrk_after.children_user + wrk_after.children_system) - (wrk_before.children_user + wrk_before.children_system)
    line = next((l for l in out.splitlines() if l.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {' '.join(cmd)}\n{out}")
    raw = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    return WrkResult(raw["requests"], raw["duration_us"] / 1e6, raw["ok"], raw["non2xx"], raw["errors"], raw["body_bytes"],
                     raw["p50_us"] / 1000, raw["p90_us"] / 1000, raw["p99_us"] / 1000, raw["max_us"] / 1000, server_cpu,
                     max(0.0, busy - server_cpu - wrk_cpu))  # fmt: skip


# --------------------------------------------------------------------------- 1. CRL


def median_time(fn: Callable[[], object], repeat: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def openssl_crl_reference(pki_dir: Path, workdir: Path, engine: Engine) -> Optional[tuple[float, int, int]]:
    """``openssl ca -gencrl`` from an index.txt of the store's revoked certificates: (seconds, DER bytes, entries)."""
    openssl = shutil.which("openssl")
    if not openssl:
        return None
    from est_app.store import schema

    ref = workdir / "openssl-ca"
    ref.mkdir()
    stamp = lambda t: t.strftime("%y%m%d%H%M%SZ")  # noqa: E731
    query = sa.select(schema.certificates.c.serial, schema.certificates.c.not_after, schema.certificates.c.revoked_at,
                      schema.certificates.c.revocation_reason).where(schema.certificates.c.status == "revoked")  # fmt: skip
    lines = []
    with engine.connect() as conn:
        for serial, not_after, revoked_at, reason in conn.execute(query):
            # openssl ca knows no privilegeWithdrawn: another reason of the same encoded size stands in
            reason = "affiliationChanged" if reason == "privilegeWithdrawn" else reason
            when = stamp(revoked_at) + ("" if reason in (None, "unspecified") else f",{reason}")
            hexserial = serial.upper().rjust(len(serial) + len(serial) % 2, "0")
            lines.append(f"R\t{stamp(not_after)}\t{when}\t{hexserial}\tunknown\t/CN=x\n")
    (ref / "index.txt").write_text("".join(lines))
    (ref / "index.txt.attr").write_text("unique_subject = no\n")
    (ref / "crlnumber").write_text("1000\n")
    (ref / "openssl.cnf").write_text(
        "[ca]\ndefault_ca = bench\n[bench]\n"
        f"database = {ref / 'index.txt'}\ncrlnumber = {ref / 'crlnumber'}\n"
        f"certificate = {pki_dir / 'ca.pem'}\nprivate_key = {pki_dir / 'ca.key'}\n"
        "default_md = sha256\ndefault_crl_hours = 24\ncrl_extensions = crl_ext\n[crl_ext]\nauthorityKeyIdentifier = keyid:always\n"
    )
    out = ref / "crl.der"
    cmd = [openssl, "ca", "-gencrl", "-config", str(ref / "openssl.cnf"), "-out", str(ref / "crl.pem")]
    try:
        began = time.perf_counter()
        run(cmd, timeout=600)
        seconds = time.perf_counter() - began
        run([openssl, "crl", "-in", str(ref / "crl.pem"), "-outform", "DER", "-out", str(out)])
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"  (openssl reference failed: {str(exc)[:300]})")
        return None
    return seconds, out.stat().st_size, len(x509.load_der_x509_crl(out.read_bytes()))


def writer_wait_during(store, action: Callable[[], object], delay: float) -> float:
    """Run ``action``; ``delay`` s in, another writer (an audit row, as an enrollment writes) asks for the write lock.

    Returns how long that writer waited; infinity when it gave up (SQLite's busy timeout).
    """
    from est_app.store import AuditEvent

    waited: list[float] = []

    def writer() -> None:
        time.sleep(delay)
        began = time.perf_counter()
        try:
            store.add_audit(AuditEvent("bench-probe", actor="bench", detail="write-lock probe during CRL regeneration"))
            waited.append(time.perf_counter() - began)
        except sa.exc.OperationalError:
            waited.append(float("inf"))

    probe = threading.Thread(target=writer)
    probe.start()
    action()
    probe.join()
    return waited[0]


def bench_crl(args, report: Report, workdir: Path, pki_dir: Path, server: RunningServer, app) -> None:
    from est_app.ca.crl import build_crl
    from est_app.store import schema

    section = f"CRL, {args.revoked:,} revoked certificates"
    print(f"\n== {section}")
    app_state = app.extensions["est_app"]
    store, crl = app_state.store, app_state.crl
    filled = fill_revoked(store.engine, args.revoked)
    report.add(section, "bulk insert of revoked rows (executemany)", f"{args.revoked / filled.seconds:,.0f} rows/s",
               f"{args.revoked:,} rows in {fmt_s(filled.seconds)}")  # fmt: skip
    report.data["revoked_serials_sample"] = filled.serials[:3]

    quiet(args)
    # The parts: the store query, then building and signing.
    query_s, revoked = median_time(store.revoked_certificates)
    entries = len(revoked)
    report.check(entries >= args.revoked, f"CRL: the store lists {entries} revoked certificates, expected at least {args.revoked}")
    now = datetime.now(timezone.utc)
    build_s, built = median_time(lambda: build_crl(app_state.authority, revoked, 999_999, now, crl.lifetime))
    regen_s, record = median_time(crl.regenerate)
    der_size = len(record.der)
    parsed = x509.load_der_x509_crl(record.der)
    report.check(len(parsed) == entries, f"CRL holds {len(parsed)} entries, the store {entries}")
    # Ask for the lock once the query is done and the build under way.
    wait_s = writer_wait_during(store, crl.regenerate, delay=query_s + 0.1 * build_s)
    report.data["crl"] = {"entries": entries, "der_bytes": der_size, "regenerate_s": regen_s, "query_s": query_s, "build_s": build_s}

    reference = openssl_crl_reference(pki_dir, workdir, store.engine) if not args.no_openssl else None
    ref_text = (f"openssl ca -gencrl, same entries: {fmt_s(reference[0])} (x{regen_s / reference[0]:.1f})" if reference else "")
    report.add(section, "CRLCache.regenerate() (median of 3)", fmt_s(regen_s),
               (ref_text + "; target within x2") if reference else "", verdict(regen_s < 2 * reference[0]) if reference else "")  # fmt: skip
    report.add(section, "  of which: store.revoked_certificates()", fmt_s(query_s), f"{entries:,} rows")
    report.add(section, "  of which: build_crl() (build + sign, Python)", fmt_s(build_s), f"{build_s / entries * 1e6:.1f} us per entry")
    report.add(section, "  an enrollment's write waits meanwhile", fmt_s(wait_s),
               f"target < {WRITER_WAIT_TARGET_MS:g} ms; SQLite busy_timeout 10 s = the enrollment fails",
               verdict(wait_s * 1000 < WRITER_WAIT_TARGET_MS))  # fmt: skip
    ref_size = f"openssl: {reference[1]:,} B ({reference[2]:,} entries)" if reference else ""
    report.add(section, "CRL size (DER)", f"{der_size:,} B", f"{der_size / entries:.1f} B/entry; {ref_size}".rstrip("; "))

    # The cached path: what every GET /crl costs once a worker holds the newest CRL.
    crl.current()
    samples = []
    for _ in range(2000):
        began = time.perf_counter()
        current = crl.current()
        samples.append((time.perf_counter() - began) * 1e6)
    report.check(current.der == store.current_crl().der, "CRLCache.current() is not the newest CRL")
    p50 = percentile(samples, 50)
    report.add(section, "CRLCache.current(), cached (p50 of 2,000)", f"{p50:,.0f} us",
               f"target < {CURRENT_TARGET_US:,.0f} us; regenerate is x{regen_s * 1e6 / p50:,.0f} slower",
               verdict(p50 < CURRENT_TARGET_US))  # fmt: skip

    # GET /crl over the server: warm each worker's cache, then count CRLs signed during the run.
    context = ssl.create_default_context(cafile=str(server.ca_file))
    for _ in range(8):
        with urllib.request.urlopen(f"{server.url}/crl", context=context, timeout=60) as r:
            served = r.read()
    report.check(served == crl.current().der, "GET /crl does not serve the newest CRL")
    def count_crls() -> int:
        with store.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(schema.crls)).scalar_one()

    before = count_crls()
    quiet(args)
    result = run_wrk(server, "/crl", write_lua(workdir / "crl.lua"), args.seconds)
    signed = count_crls() - before
    mb_s = result.body_bytes / result.seconds / 1e6
    ok = report.check(result.ok == result.requests and not result.errors and signed == 0,
                      f"GET /crl: {result.non2xx} non-200, {result.errors} socket errors, {signed} CRLs signed during the run")  # fmt: skip
    report.add(section, "GET /crl, wrk 8 conns keep-alive", f"{result.rps:,.0f} req/s",
               f"{mb_s:,.0f} MB/s; rebuilding per request would cap it at {2 / regen_s:,.1f} req/s on 2 cores{result.load_note}")  # fmt: skip
    report.add(section, "GET /crl p50 / p99", f"{fmt_ms(result.p50_ms)} / {fmt_ms(result.p99_ms)}",
               f"regenerate: {fmt_s(regen_s)}; server CPU {result.server_us_per_request / 1000:.2f} ms/request")  # fmt: skip
    report.add(section, "CRLs signed during the GET /crl run", f"{signed}", "0 = served from the workers' caches", ok)


# --------------------------------------------------------------------------- 2. OCSP


def enroll_over_tls(server: RunningServer, cn: str) -> x509.Certificate:
    body = base64_body(make_csr_der("ec", cn)).encode()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        f"{server.url}/.well-known/est/simpleenroll", data=body, method="POST",
        headers={"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64", "Authorization": f"Basic {token}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(server.ca_file)), timeout=30) as r:
        data = r.read()
        if r.headers.get("Content-Transfer-Encoding") == "base64":
            data = base64.b64decode(data)
    (certificate,) = pkcs7.load_der_pkcs7_certificates(data)
    return certificate


def ocsp_request(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """What OpenSSL and FreeRADIUS send: one SHA-1 CertID, no nonce (cached responses stay valid)."""
    return ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)


def ocsp_request_by_serial(serial: int, issuer: x509.Certificate, nonce: Optional[bytes] = None) -> bytes:
    probe = ocsp.load_der_ocsp_request(ocsp_request(issuer, issuer))
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(probe.issuer_name_hash, probe.issuer_key_hash, serial, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def write_fleet_lua(path: Path, bodies: list[bytes]) -> Path:
    """``write_lua``'s counting, each request a POST /ocsp of one of ``bodies`` drawn at random."""
    table = ",\n".join(lua_bytes(body) for body in bodies)
    script = write_lua(path, "POST", None, {"Content-Type": "application/ocsp-request"}).read_text()
    path.write_text(script + f"local bodies = {{\n{table}\n}}\n"
                    "function request() return wrk.format(nil, nil, nil, bodies[math.random(#bodies)]) end\n")  # fmt: skip
    return path


def bench_ocsp(args, report: Report, workdir: Path, server: RunningServer, app, revoked_serial: Optional[str]) -> None:
    from est_app.ca.ocsp import OCSPResponder

    section = f"OCSP, a fleet of {args.ocsp_fleet:,} certificates"
    print(f"\n== {section}")
    app_state = app.extensions["est_app"]
    ca = app_state.authority.certificate
    certificate = enroll_over_tls(server, "NPPOCSP1")
    request_der = ocsp_request(certificate, ca)

    # One answer checked by hand before the load.
    post = urllib.request.Request(f"{server.url}/ocsp", data=request_der, method="POST", headers={"Content-Type": "application/ocsp-request"})
    with urllib.request.urlopen(post, context=ssl.create_default_context(cafile=str(server.ca_file)), timeout=30) as r:
        answer = ocsp.load_der_ocsp_response(r.read())
    good = answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    report.check(good, f"POST /ocsp for the enrolled certificate: {answer.response_status}")

    # The fleet: known certificates (one in 97 revoked), requested at random by SHA-1 CertID as OpenSSL and FreeRADIUS send.
    fill(app_state.store.engine, args.ocsp_fleet, start=10_000_000, label="ocsp-fleet", events=False, seed=13, bulk_pragmas=False)
    with app_state.store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT serial, status FROM certificates WHERE label = 'ocsp-fleet' AND status != 'superseded'")).all()
    fleet = [ocsp_request_by_serial(int(serial, 16), ca) for serial, _ in rows]
    chosen = random.Random(5).sample(rows, 200)
    sample = [ocsp_request_by_serial(int(serial, 16), ca) for serial, _ in chosen]

    # The in-process floor, over the fleet: with the store lookup as served (cache cold, then warm), with
    # signing alone (a constant lookup, nonce requests: no cache), and the store lookup alone.
    now = datetime.now(timezone.utc)
    respond = app_state.ocsp.respond
    nonce_sample = [ocsp_request_by_serial(int(serial, 16), ca, os.urandom(16)) for serial, _ in chosen]
    signing_only = OCSPResponder(app_state.authorities, lambda serial: ("valid", None, None, None))
    serials = [serial for serial, _ in chosen]

    def per_call_us(fn, items) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        for item in items:
            fn(item)
        return (time.perf_counter() - wall) / len(items) * 1e6, (time.thread_time() - cpu) / len(items) * 1e6

    floors = {
        "respond(), cache cold (signs)": per_call_us(lambda der: respond(der, now), sample),
        "respond(), cache warm": per_call_us(lambda der: respond(der, now), sample * max(1, args.ocsp_iterations // len(sample))),
        "respond(), nonce requests (always signed)": per_call_us(lambda der: respond(der, now), nonce_sample),
        "respond(), signing only (constant lookup)": per_call_us(lambda der: signing_only.respond(der, now), nonce_sample),
        "store.certificate_status() alone": per_call_us(app_state.store.certificate_status, serials * 5),
    }
    wrong = 0
    for der, (_, status) in zip(sample, chosen):
        want = ocsp.OCSPCertStatus.REVOKED if status == "revoked" else ocsp.OCSPCertStatus.GOOD
        wrong += ocsp.load_der_ocsp_response(respond(der, now)).certificate_status != want
    report.check(not wrong, f"OCSP: {wrong} of {len(sample)} fleet answers have the wrong status")
    if revoked_serial:
        revoked_der = ocsp_request_by_serial(int(revoked_serial, 16), ca)
        status = ocsp.load_der_ocsp_response(respond(revoked_der, now)).certificate_status
        report.check(status == ocsp.OCSPCertStatus.REVOKED, f"OCSP for a bulk-revoked serial says {status}")
    floor_us = floors["respond(), cache warm"][1]
    ceiling = 2 * 1e6 / floor_us

    script = write_fleet_lua(workdir / "ocsp-fleet.lua", fleet)
    runs = {}
    for name in ("first run (workers' caches cold)", "second run (caches warm)"):
        quiet(args)
        runs[name] = result = run_wrk(server, "/ocsp", script, args.seconds)
        report.check(result.ok == result.requests and not result.errors, f"POST /ocsp under wrk: {result.non2xx} non-200, {result.errors} socket errors")
    quiet(args)
    floor = run_wrk(server, "/healthz", write_lua(workdir / "healthz.lua"), args.seconds)
    report.check(floor.ok == floor.requests and not floor.errors, f"GET /healthz under wrk: {floor.non2xx} non-200, {floor.errors} socket errors")
    for name, result in runs.items():
        report.add(section, f"POST /ocsp random of fleet, wrk 8 conns, {name}", f"{result.rps:,.0f} req/s",
                   f"target >= {OCSP_TARGET_RPS:,}/s; in-process ceiling on 2 cores {ceiling:,.0f}/s; "
                   f"GET /healthz (server + TLS + Flask, no work) {floor.rps:,.0f}/s{result.load_note}",
                   verdict(result.rps >= OCSP_TARGET_RPS))  # fmt: skip
        report.add(section, f"  p50 / p99, {name}", f"{fmt_ms(result.p50_ms)} / {fmt_ms(result.p99_ms)}",
                   f"target p99 < {OCSP_P99_TARGET_MS:g} ms; server CPU {result.server_us_per_request:,.0f} us/request, "
                   f"{floor.server_us_per_request:,.0f} us and p99 {fmt_ms(floor.p99_ms)} for /healthz", verdict(result.p99_ms < OCSP_P99_TARGET_MS))  # fmt: skip
    for name, (wall_us, cpu_us) in floors.items():
        report.add(section, f"in-process {name}", f"{cpu_us:,.0f} us", f"CPU time per call ({wall_us:,.0f} us wall)")
    warm = runs["second run (caches warm)"]
    report.data["ocsp"] = {"fleet": len(fleet), "rps": warm.rps, "p50_ms": warm.p50_ms, "p99_ms": warm.p99_ms, "floor_us": floors,
                           "healthz_rps": floor.rps, "cold_rps": runs["first run (workers' caches cold)"].rps}  # fmt: skip


# --------------------------------------------------------------------------- 3. admin lists


class Dashboard:
    """The dashboard through the Flask test client, over https://localhost (the session cookie is Secure)."""

    BASE = "https://localhost"

    def __init__(self, app) -> None:
        self.client = app.test_client()

    def get(self, path: str):
        return self.client.get(path, base_url=self.BASE)

    def login(self, name: str, password: str) -> None:
        import html
        import re

        form = self.get("/admin/login").get_data(as_text=True)
        token = html.unescape(re.search(r'name="csrf" value="([^"]*)"', form).group(1))
        response = self.client.post("/admin/login", base_url=self.BASE, data={"csrf": token, "username": name, "password": password})
        if response.status_code != 302:
            raise RuntimeError(f"dashboard sign-in failed: {response.status_code}")


class Api:
    """The JSON API over the server's TLS, one keep-alive connection, HTTP Basic as an admin."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        context = ssl.create_default_context(cafile=str(server.ca_file))
        self.conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=120)
        token = base64.b64encode(f"{ADMIN}:{ADMIN_PASSWORD}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


@dataclass
class Timed:
    p50_ms: float
    p99_ms: float
    status: int
    body: bytes


def time_requests(get: Callable[[str], tuple[int, bytes]], path: str, n: int = REQUESTS_PER_PAGE) -> Timed:
    get(path)  # warm: credential cache, SQLite page cache, template compilation
    times, status, body = [], 0, b""
    for _ in range(n):
        began = time.perf_counter()
        status, body = get(path)
        times.append((time.perf_counter() - began) * 1000)
    return Timed(percentile(times, 50), percentile(times, 99), status, body)


@dataclass
class StatementTime:
    ms: float
    sql: str
    params: object
    plan: list[str]


def statement_times(engine: Engine, action: Callable[[], object]) -> list[StatementTime]:
    """The SQL one request runs, each re-run alone (median of 3, rows fetched), with its query plan."""
    found: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT"):  # the queries; writes (a session touched) are not re-run
            found.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    out = []
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        for sql, params in found:
            times = []
            for _ in range(3):
                began = time.perf_counter()
                conn.exec_driver_sql(sql, params).fetchall()
                times.append((time.perf_counter() - began) * 1000)
            explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN (ANALYZE, BUFFERS) "
            plan = [row[3] if sqlite else row[0] for row in conn.exec_driver_sql(explain + sql, params)]
            out.append(StatementTime(statistics.median(times), sql, params, plan))
    return out


def explain_text(title: str, times: list[StatementTime]) -> str:
    lines = [f"{title} (each re-run alone, rows fetched, median of 3)"]
    for st in sorted(times, key=lambda s: -s.ms):
        sql = " ".join(st.sql.split())
        lines.append(f"    {st.ms:9.1f} ms  {sql[:220]}{'...' if len(sql) > 220 else ''}")
        lines.append(f"                 params {st.params}")
        plan = st.plan if len(st.plan) <= 12 else [*st.plan[:10], f"... {len(st.plan) - 10} more lines"]
        lines += [f"                 plan: {p}" for p in plan]
    return "\n".join(lines)


def keyset_vs_offset(engine: Engine, n: int, after: int, report: Report, section: str) -> None:
    """The list query as Reports.devices builds it, at the same deep page: WHERE id < after against OFFSET."""
    base = (
        "SELECT devices.*, cur.status, cur.not_after FROM devices "
        "LEFT OUTER JOIN certificates AS cur ON cur.serial = devices.current_serial "
    )
    with engine.connect() as raw:
        offset = raw.execute(sa.text("SELECT count(*) FROM devices WHERE id >= :after"), {"after": after}).scalar_one()
        queries = {
            "keyset": (base + "WHERE devices.id < :after ORDER BY devices.id DESC LIMIT 51", {"after": after}),
            "offset": (base + "ORDER BY devices.id DESC LIMIT 51 OFFSET :offset", {"offset": offset}),
            "count(*) every list page runs": ("SELECT count(*) FROM devices", {}),
        }
        results = {}
        for name, (sql, params) in queries.items():
            raw.execute(sa.text(sql), params).fetchall()
            times = []
            for _ in range(5):
                began = time.perf_counter()
                rows = raw.execute(sa.text(sql), params).fetchall()
                times.append((time.perf_counter() - began) * 1000)
            results[name] = (statistics.median(times), rows)
    keyset_ids = [r[0] for r in results["keyset"][1]]
    offset_ids = [r[0] for r in results["offset"][1]]
    report.check(keyset_ids == offset_ids, f"keyset and OFFSET disagree at the deep page ({keyset_ids[:3]} vs {offset_ids[:3]})")
    k, o, c = results["keyset"][0], results["offset"][0], results["count(*) every list page runs"][0]
    report.add(section, f"SQL deep page, keyset (id < {after:,})", fmt_ms(k), f"OFFSET {offset:,}: {fmt_ms(o)} (x{o / k:,.0f} slower)")
    report.add(section, "SQL count(*) of devices (each list page)", fmt_ms(c), f"keyset page query alone: {fmt_ms(k)}")


def bench_devices(args, report: Report, workdir: Path, n: int, cluster=None) -> None:
    """The admin lists at ``n`` devices, on SQLite or, with ``cluster`` (tests.postgres.PostgresCluster), PostgreSQL."""
    backend = "PostgreSQL" if cluster else "SQLite"
    section = f"Admin, {n:,} devices, {backend}"
    print(f"\n== {section}")
    pki_dir = workdir / f"devices-{n}-{backend.lower()}"
    url = cluster.url(cluster.create_database()) if cluster else f"sqlite:///{pki_dir / 'est.db'}"
    config = init_store(pki_dir, url if cluster else None)
    from est_app.store import Store

    store = Store(url)  # the fill's own engine (bulk-load pragmas)
    stats = fill(store.engine, n, budget_s=args.max_fill_seconds)
    if cluster:  # what autovacuum does after a load like this, done now so the planner and index-only scans see it
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    if stats.devices < n:
        rate = stats.devices_per_second
        report.add(section, "fill (stopped: over budget)", f"{stats.devices:,} of {n:,}",
                   f"{rate:,.0f} devices/s after {fmt_s(stats.seconds)}: all {n:,} would take ~{fmt_s(n / rate)} "
                   f"(budget {args.max_fill_seconds:g} s)", "MISS")  # fmt: skip
        report.problems.append(f"{section}: fill over budget; pages not timed")
        store.engine.dispose()
        shutil.rmtree(pki_dir, ignore_errors=True)
        return
    size = db_size(store.engine)
    report.add(section, "fill: devices + certificates + events", fmt_s(stats.seconds),
               f"{stats.devices_per_second:,.0f} devices/s, {stats.rows_per_second:,.0f} rows/s; "
               f"1M devices at this rate: {1e6 / stats.devices_per_second:,.0f} s (budget {FILL_BUDGET_S:g} s)",
               verdict(1e6 / stats.devices_per_second < FILL_BUDGET_S))  # fmt: skip
    report.add(section, "rows written / database size", f"{stats.devices + stats.certificates + stats.events:,}",
               f"{stats.devices:,} devices, {stats.certificates:,} certificates, {stats.events:,} events; {size / 1e6:,.0f} MB")  # fmt: skip
    report.data.setdefault("fill", {})[n] = {"seconds": stats.seconds, "devices_per_s": stats.devices_per_second,
                                             "rows_per_s": stats.rows_per_second, "bytes": size}  # fmt: skip

    width = key_width(n)
    substring = device_key(n // 3, width)[:-2]  # 100 devices match
    deep = 1001  # the last pages: ids 1000 down to 951
    revoked_every = 97
    pages = [  # (what, api path, dashboard path, expected total or None)
        ("first page", "/api/v1/devices", "/admin/devices", n),
        (f"deep keyset page (after={deep:,}, page ~{(n - deep) // 50 + 1:,})", f"/api/v1/devices?after={deep}", f"/admin/devices?after={deep}", n),
        (f"search CN substring '{substring}'", f"/api/v1/devices?search={substring}", f"/admin/devices?q={substring}", None),
        (f"search numeric id {n // 2}", f"/api/v1/devices?search={n // 2}", f"/admin/devices?q={n // 2}", None),
        ("status=revoked", "/api/v1/devices?status=revoked", "/admin/devices?status=revoked", n // revoked_every),
        ("status=valid, expiring within 30 days", "/api/v1/devices?status=valid&expires_within_days=30",
         "/admin/devices?status=valid&expiring=30", None),
        ("statistics / overview", "/api/v1/statistics", "/admin/", None),
        (f"one device ({n // 2})", f"/api/v1/devices/{n // 2}", f"/admin/devices/{n // 2}", None),
    ]  # fmt: skip

    app = make_app(config)
    dashboard = Dashboard(app)
    dashboard.login(ADMIN, ADMIN_PASSWORD)
    server = start_server(pki_dir, workdir, rate_limit={"enabled": False})
    slow: list[tuple[str, str]] = []
    try:
        api = Api(server)
        try:
            for what, api_path, page_path, expected in pages:
                quiet(args)
                a = time_requests(api.get, api_path)
                d = time_requests(lambda p: (lambda r: (r.status_code, r.get_data()))(dashboard.get(p)), page_path)
                report.check(a.status == 200, f"{section}: GET {api_path} answered {a.status}: {a.body[:200]!r}")
                report.check(d.status == 200, f"{section}: GET {page_path} answered {d.status}")
                body = json.loads(a.body) if a.status == 200 else {}
                total = body.get("total")
                if expected is not None and total is not None:
                    report.check(total == expected, f"{section}: {api_path} total {total}, expected {expected}")
                found = f"total {total:,}; " if isinstance(total, int) else ""
                worst = max(a.p50_ms, d.p50_ms)
                target = INDEXED_TARGET_MS if what.startswith(("search", "status")) else PAGE_TARGET_MS
                report.add(section, f"API  {what}", f"{fmt_ms(a.p50_ms)} / {fmt_ms(a.p99_ms)}",
                           f"{found}target p50 < {target:g} ms", verdict(a.p50_ms < target))  # fmt: skip
                report.add(section, f"page {what}", f"{fmt_ms(d.p50_ms)} / {fmt_ms(d.p99_ms)}",
                           f"target p50 < {target:g} ms", verdict(d.p50_ms < target))  # fmt: skip
                report.data.setdefault("pages", {}).setdefault(f"{n} {backend}", {})[what] = {"api": [a.p50_ms, a.p99_ms], "dashboard": [d.p50_ms, d.p99_ms]}
                if worst >= target or args.explain:
                    slow.append((what, page_path))
        finally:
            api.close()
    finally:
        server.stop()
    keyset_vs_offset(store.engine, n, deep, report, section)
    for what, page_path in slow:
        times = statement_times(app.extensions["est_app"].store.engine, lambda: dashboard.get(page_path))
        report.notes.append(explain_text(f"{section} -- {what} ({page_path}): statements of one request, slowest first", times))
    if not args.keep:
        app.extensions["est_app"].store.engine.dispose()
        store.engine.dispose()
        shutil.rmtree(pki_dir, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_operations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100_000], metavar="N", help="device counts to fill and time (default 100000)")
    parser.add_argument("--revoked", type=int, default=100_000, help="revoked certificates in the CRL (default 100000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--ocsp-iterations", type=int, default=2000, help="iterations of the in-process OCSP floor (default 2000)")
    parser.add_argument("--ocsp-fleet", type=int, default=10_000, metavar="N", help="known certificates OCSP requests are drawn from (default 10000)")
    parser.add_argument("--max-fill-seconds", type=float, default=FILL_BUDGET_S,
                        help=f"skip a device count whose fill is estimated to take longer (default {FILL_BUDGET_S:g})")  # fmt: skip
    parser.add_argument("--skip", nargs="+", choices=("crl", "ocsp", "devices"), default=(), help="parts not to run")
    parser.add_argument("--database", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"],
                        help="backends for the admin lists (default sqlite; postgresql: a throwaway cluster, tests/postgres.py)")  # fmt: skip
    parser.add_argument("--explain", action="store_true", help="print statement times and query plans for every page, not only slow ones")
    parser.add_argument("--no-openssl", action="store_true", help="skip the openssl ca -gencrl reference")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed part, wait up to SECONDS for other processes to leave the cores idle (shared machines)")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (stores, server logs)")
    args = parser.parse_args(argv)
    if not Path(WRK).exists():
        parser.error(f"wrk not found ({WRK})")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally blocks
    workdir = Path(tempfile.mkdtemp(prefix="est-bench-ops-"))
    report = Report()
    began = time.monotonic()
    try:
        if "crl" not in args.skip or "ocsp" not in args.skip:
            pki_dir = workdir / "revocation"
            config = init_store(pki_dir)
            app = make_app(config)
            server = start_server(pki_dir, workdir, rate_limit={"enabled": False})
            try:
                revoked_serial = None
                if "crl" not in args.skip:
                    bench_crl(args, report, workdir, pki_dir, server, app)
                    revoked_serial = (report.data.get("revoked_serials_sample") or [None])[0]
                if "ocsp" not in args.skip:
                    bench_ocsp(args, report, workdir, server, app, revoked_serial)
            finally:
                server.stop()
                app.extensions["est_app"].store.engine.dispose()
        if "devices" not in args.skip:
            cluster = None
            if "postgresql" in args.database:
                from tests.postgres import PostgresCluster

                cluster = PostgresCluster()
                cluster.start()
            try:
                for n in args.devices:
                    for database in args.database:
                        bench_devices(args, report, workdir, n, cluster if database == "postgresql" else None)
            finally:
                if cluster:
                    cluster.remove()
        report.print_table()
        print(f"\np50 / p99 of {REQUESTS_PER_PAGE} sequential requests per page (nearest rank: the p99 of 20 is the slowest); "
              "API over gunicorn TLS, one keep-alive connection; dashboard in-process (Flask test client). "
              f"Machine: {os.cpu_count()} cores shared with the load generator; load average at the end "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}. Total run {time.monotonic() - began:,.0f} s.")  # fmt: skip
        for note in report.notes:
            print("\n" + note)
        if args.json:
            args.json.write_text(json.dumps({"rows": [r.__dict__ for r in report.rows], "data": report.data, "problems": report.problems},
                                            indent=2, default=str))  # fmt: skip
        if report.problems:
            print("\nCHECKS FAILED:\n" + "\n".join(f"  {p}" for p in report.problems))
            return 1
        print("\nall checks passed")
        return 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
