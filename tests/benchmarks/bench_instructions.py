"""Instructions per enrollment: the app's CPU cost counted by valgrind, so the machine's speed does not blur it.

    python -m tests.benchmarks.bench_instructions [--requests 200] [--warmup 40]

bench_enroll's figures (requests/s, server CPU µs per enrollment) move by 1.5 to 2
times with the hour on a shared machine, so a change worth 5% cannot be told from
noise there. This counts the instructions the processor executes instead (Debian's
``valgrind``, tool callgrind), which repeat to within about 3%: est_app runs in
process, set up as an est-server worker answers EST inline (gevent's patches, the
app on the hub's thread: est_app/worker.py), on a SQLite store and a file CA key made
by ``est-admin init``, with bench_enroll's settings (rate limiting off, no retry
window) and its request: one fixed EC P-256 CSR in base64, Basic auth. Two runs
differ only in how many enrollments follow the warm-up; their difference divided by
the extra enrollments is the cost of one, start-up excluded. The same is done for the
pure-crypto floor (load_csr, issue, certs_only), so the ratio shows what est_app
adds to the cryptography it cannot avoid.

Not counted: gunicorn's HTTP parsing, TLS and the kernel (system calls, the fsync);
bench_enroll measures those with the rest, in time. Counted but not in the server:
werkzeug's test client building the request, the same in every run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.benchmarks.bench_enroll import PASSWORD, USER, base64_body, init_pki
from tests.server import write_config

COLLECTED = re.compile(r"Collected : (\d+)")


def count(config: Path, what: str, repeats: int, warmup: int) -> int:
    """Instructions valgrind counted in a child that does ``warmup`` then ``repeats`` of ``what``."""
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "tests.benchmarks.bench_instructions", "--child", what, str(config), str(warmup), str(repeats),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    found = COLLECTED.search(result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return int(found.group(1))


def per_operation(pki_dir: Path, what: str, requests: int, warmup: int) -> float:
    """Instructions of one ``what``: two runs on copies of the same store, in parallel (one core each)."""
    copies = []
    for name in ("short", "long"):
        copy = pki_dir.parent / f"{what}-{name}"
        shutil.copytree(pki_dir, copy)
        settings = {"rate_limit": {"enabled": False}, "retry_window_minutes": 0, "database": {"url": f"sqlite:///{copy / 'est.db'}"}}
        config = write_config(copy, copy / "bench.yaml", 8445, **settings)
        copies.append(config)
    with ThreadPoolExecutor(2) as pool:
        short, long = pool.map(lambda job: count(*job), [(copies[0], what, 0, warmup), (copies[1], what, requests, warmup)])
    return (long - short) / requests


def fixed_csr_der() -> bytes:
    """bench_enroll's CSR (CN NPPBBB4, EC P-256), from a fixed key: every run encodes and verifies the same bytes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.derive_private_key(0x3D6F_1E2A_9C4B_7751_0E8D_22F1_6A93_C5B0, ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "NPPBBB4")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    return csr.public_bytes(serialization.Encoding.DER)


def child(what: str, config: Path, warmup: int, repeats: int) -> None:
    """Under valgrind: ``warmup`` then ``repeats`` enrollments (or floor operations), then exit at once."""
    from gevent import monkey

    monkey.patch_all(thread=False)  # as est_app.worker.ESTWorker.patch
    import gc

    from est_app import create_app, hub
    from est_app.config import load_config

    hub.run_greenlets_here()
    settings = load_config(config)
    csr_der = fixed_csr_der()
    if what == "floor":
        from est_app.ca import load_authority, load_csr
        from est_app.profiles import build_profiles

        authority = load_authority(settings.ca)
        profile = build_profiles(settings)[None].certificate

        def once() -> None:
            authority.certs_only(authority.issue(load_csr(csr_der), profile), profile)
    else:
        import base64

        client = create_app(settings).test_client()
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {token}", "Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"}
        body = base64_body(csr_der)
        environ = {"wsgi.url_scheme": "https", "REMOTE_ADDR": "127.0.0.1"}

        def once() -> None:
            response = client.post("/.well-known/est/simpleenroll", data=body, headers=headers, environ_base=environ)
            if response.status_code != 200:
                raise SystemExit(f"enrollment answered {response.status_code}: {response.get_data(as_text=True)[:300]}")

    for _ in range(warmup):
        once()
    gc.freeze()  # as the worker does once it serves
    for _ in range(repeats):
        once()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown in the count


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="enrollments counted (default 200)")
    parser.add_argument("--warmup", type=int, default=40, help="enrollments before counting starts (default 40)")
    parser.add_argument("--child", nargs=4, metavar=("WHAT", "CONFIG", "WARMUP", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, config, warmup, repeats = args.child
        child(what, Path(config), int(warmup), int(repeats))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as work:
        pki_dir = Path(work) / "pki"
        init_pki(pki_dir)
        enrollment = per_operation(pki_dir, "enroll", args.requests, args.warmup)
        floor = per_operation(pki_dir, "floor", args.requests, args.warmup)
    print(f"Instructions per enrollment, in process on the hub as est-server answers EST inline ({args.requests} counted after {args.warmup}):")
    print(f"  enrollment (simpleenroll, Basic auth, SQLite store)  {enrollment / 1e6:6.3f} M")
    print(f"  pure-crypto floor (load_csr, issue, certs_only)      {floor / 1e6:6.3f} M")
    print(f"  est_app above the floor                              {(enrollment - floor) / 1e6:6.3f} M  (enrollment/floor {enrollment / floor:.1f}x)")
    print("Runs repeat to within about 3%; compare two trees by running each (PYTHONPATH=<tree>).")


if __name__ == "__main__":
    main()
