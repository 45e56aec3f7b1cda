"""Slow and idle clients against the real server (issue 7), and a probe timing the endpoints that must keep answering.

:class:`Attack` holds TLS connections from one loopback address: idle ones
(handshake, then nothing), slowloris ones (a request head one byte every few
seconds, never finished) and slow bodies (complete headers, then an OCSP body
one byte every few seconds). A connection the server cuts is opened again a
second later, so the pressure lasts as long as the attack. :func:`probe` runs
meanwhile from another loopback address, as FreeRADIUS and the gateway would:
`cacerts`, `/crl`, `/ocsp` and a Basic-auth enrollment, each on a new TLS
connection, timed. Used by tests/test_slow_clients.py and by hand::

    python -m tests.slow_clients --seconds 60      # against a fresh est-server
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import math
import ssl
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp

from .conftest import PASSWORD, USER
from .pki import der, make_csr

SERVER = "127.0.0.1"  # tests/server.py binds here
ATTACKER = "127.0.0.1"
PROBE = "127.0.0.2"
SLOW_BODY_LENGTH = 4096


@dataclass
class Attack:
    """``idle`` + ``slowloris`` + ``slow_bodies`` connections from ATTACKER to ``port``, in a background thread."""

    port: int
    ca_file: Path
    idle: int = 200
    slowloris: int = 100
    slow_bodies: int = 20
    interval: float = 3.0  # seconds between two bytes of a slow client
    connected: int = 0  # TLS handshakes completed
    refused: int = 0  # connections closed or failed before the handshake completed
    cut_after: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # seconds held, by kind
    answers: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))  # first bytes the server sent

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._context = ssl.create_default_context(cafile=str(self.ca_file))

    def __enter__(self) -> Attack:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _main(self) -> None:
        kinds = ["idle"] * self.idle + ["slowloris"] * self.slowloris + ["slow_body"] * self.slow_bodies
        tasks = [asyncio.create_task(self._client(kind)) for kind in kinds]
        while not self._stop.is_set():
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, kind: str) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(SERVER, self.port, ssl=self._context, local_addr=(ATTACKER, 0)), 10
                )
            except (OSError, asyncio.TimeoutError):
                self.refused += 1
                await asyncio.sleep(1)
                continue
            self.connected += 1
            opened = time.monotonic()
            try:
                answer = await self._misbehave(kind, reader, writer)
                self.answers[kind].append(answer[:40])
                self.cut_after[kind].append(time.monotonic() - opened)
            except OSError:
                self.cut_after[kind].append(time.monotonic() - opened)
            finally:
                writer.close()
            await asyncio.sleep(1)

    async def _misbehave(self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """Act as ``kind`` until the server answers or closes; return what it sent (b"" for a bare close)."""
        if kind == "slow_body":
            head = f"POST /ocsp HTTP/1.1\r\nHost: {ATTACKER}\r\nContent-Type: application/ocsp-request\r\nContent-Length: {SLOW_BODY_LENGTH}\r\n\r\n"
            writer.write(head.encode())
            drip = b"0" * SLOW_BODY_LENGTH
        elif kind == "slowloris":
            writer.write(f"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: {ATTACKER}\r\n".encode())
            drip = b"X-Slow: " + b"a" * 10_000
        else:
            drip = b""
        for index in range(len(drip) + 1):
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(200), self.interval if drip else None)
            except asyncio.TimeoutError:
                writer.write(drip[index : index + 1])
        return await reader.read(200)


@dataclass
class Timings:
    """Seconds per endpoint for the probe's successful requests, and its failures."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)

    def p99(self, endpoint: str) -> float:
        values = sorted(self.seconds[endpoint])
        return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]

    def summary(self) -> str:
        return "; ".join(
            f"{name}: n={len(v)} p50={sorted(v)[len(v) // 2]:.3f}s p99={self.p99(name):.3f}s max={max(v):.3f}s"
            for name, v in sorted(self.seconds.items())
        ) + f"; failures={len(self.failures)}"


class Probe:
    """Requests from PROBE to the server at ``port``, each on a new TLS connection."""

    def __init__(self, port: int, ca_file: Path, timeout: float = 10) -> None:
        self.port, self.timeout = port, timeout
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        self.ocsp_request: bytes | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
        conn = http.client.HTTPSConnection(SERVER, self.port, context=self.context, timeout=self.timeout, source_address=(PROBE, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
            return data
        finally:
            conn.close()

    def enroll(self, cn: str) -> x509.Certificate:
        body = self.request(
            "POST",
            "/.well-known/est/simpleenroll",
            base64.b64encode(der(make_csr(cn))),
            {"Content-Type": "application/pkcs10", "Authorization": f"Basic {self.token}"},
        )
        (cert,) = pkcs7.load_der_pkcs7_certificates(body if body[:1] == b"\x30" else base64.b64decode(body))
        return cert

    def ocsp(self) -> bytes:
        if self.ocsp_request is None:
            cert = self.enroll("PROBE-OCSP")
            request = ocsp.OCSPRequestBuilder().add_certificate(cert, self.ca, hashes.SHA1()).build()
            self.ocsp_request = der(request)
        answer = self.request("POST", "/ocsp", self.ocsp_request, {"Content-Type": "application/ocsp-request"})
        if ocsp.load_der_ocsp_response(answer).response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise RuntimeError("OCSP answer not successful")
        return answer

    def run(self, seconds: float) -> Timings:
        """Round after round of the four requests for ``seconds``."""
        timings = Timings()
        calls = {
            "cacerts": lambda n: self.request("GET", "/.well-known/est/cacerts"),
            "crl": lambda n: self.request("GET", "/crl"),
            "ocsp": lambda n: self.ocsp(),
            "enroll": lambda n: self.enroll(f"PROBE{n:06d}"),
        }
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
            for name, call in calls.items():
                started = time.monotonic()
                try:
                    call(n)
                except Exception as exc:  # any failure counts; the test shows them all
                    timings.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                else:
                    timings.seconds[name].append(time.monotonic() - started)
        return timings


def main() -> None:
    """Measure: a fresh `est init` server, the attack for ``--seconds``, the probe's timings printed."""
    import os

    from .conftest import run_cli
    from .server import start_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--slowloris", type=int, default=100)
    parser.add_argument("--slow-bodies", type=int, default=20)
    parser.add_argument("--gunicorn-args", help="GUNICORN_CMD_ARGS for gunicorn -c deploy/gunicorn.conf.py (other worker classes)")
    parser.add_argument("--server", default="{}", help="YAML/JSON mapping merged into `server:`")
    args = parser.parse_args()

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        assert run_cli("init", "--dir", str(workdir / "pki")).exit_code == 0
        if args.gunicorn_args:
            os.environ["GUNICORN_CMD_ARGS"] = args.gunicorn_args
        server = start_server(
            workdir / "pki", workdir, use_gunicorn_conf=bool(args.gunicorn_args), rate_limit={"enabled": False},
            server=yaml.safe_load(args.server),
        )
        try:
            assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config).exit_code == 0
            probe = Probe(server.port, server.ca_file)
            print("quiet:", probe.run(5).summary())
            with Attack(server.port, server.ca_file, idle=args.idle, slowloris=args.slowloris, slow_bodies=args.slow_bodies) as attack:
                time.sleep(5)  # let the attack take hold
                timings = probe.run(args.seconds)
            print("attack:", timings.summary())
            print(f"attacker: {attack.connected} handshakes, {attack.refused} refused; held "
                  + ", ".join(f"{k} max {max(v):.1f}s (n={len(v)})" for k, v in attack.cut_after.items()))
            for failure in sorted(set(timings.failures))[:10]:
                print("  failure:", failure)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
