"""HAProxy for the tests: deploy/haproxy.cfg as shipped, with loopback addresses, free ports and test files swapped in.

:func:`render` replaces the shipped file's example addresses, ports, file paths
and host names, and drops what needs root or a syslog socket (chroot, user,
daemon, /dev/log); each replaced text must be found, so a change to the shipped
file that the tests would no longer exercise fails here rather than going
unnoticed. :class:`HAProxy` runs it in the foreground (``haproxy -db``) and reads
the servers' states from its stats socket.
"""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .server import REPO, free_port, stop_process

SHIPPED = REPO / "deploy" / "haproxy.cfg"
HAPROXY = "haproxy"
# Where the shipped file's hosts live; the proxy's own example addresses.
HOST_ADDRESSES = ("10.20.0.11:8445", "10.20.0.12:8445")
HOST_NAMES = ("est-a.hospital.example", "est-b.hospital.example")
# The proxy reaches the hosts from these loopback addresses: terminated traffic (the hosts'
# trusted_proxies) and passed-through TLS (not trusted).
TRUSTED_SOURCE = "127.0.0.2"
PASSTHROUGH_SOURCE = "127.0.0.3"


@dataclass(frozen=True)
class ProxyFiles:
    tls_pem: Path  # certificate then key, as HAProxy's `crt` wants
    client_ca: Path
    hosts_ca: Path


def proxy_files(pki_dir: Path, workdir: Path) -> ProxyFiles:
    """The test PKI (`est init`) as HAProxy's files: its TLS certificate and key, its CA for clients and hosts."""
    tls_pem = workdir / "haproxy-tls.pem"
    tls_pem.write_bytes((pki_dir / "tls.pem").read_bytes() + (pki_dir / "tls.key").read_bytes())
    tls_pem.chmod(0o600)
    return ProxyFiles(tls_pem, pki_dir / "ca.pem", pki_dir / "ca.pem")


def render(files: ProxyFiles, host_ports: tuple[int, int], front_port: int, passthrough_port: int, stats_socket: Path) -> str:
    """The shipped configuration, pointed at loopback hosts on ``host_ports`` (whose TLS certificate names localhost)."""
    replacements = [
        ("    log /dev/log local0\n", "    log stdout format raw local0\n"),
        ("    chroot /var/lib/haproxy\n    user haproxy\n    group haproxy\n    daemon\n", ""),
        ("/run/haproxy/admin.sock", str(stats_socket)),
        ("10.20.0.10:8445", f"127.0.0.1:{front_port}"),
        ("10.20.0.10:8446", f"127.0.0.1:{passthrough_port}"),
        ("source 10.20.0.2\n", f"source {TRUSTED_SOURCE}\n"),
        ("source 10.20.0.3\n", f"source {PASSTHROUGH_SOURCE}\n"),
        *((address, f"127.0.0.1:{port}") for address, port in zip(HOST_ADDRESSES, host_ports)),
        *((f"verifyhost {name}", "verifyhost localhost") for name in HOST_NAMES),
        ("/etc/haproxy/est/tls.pem", str(files.tls_pem)),
        ("/etc/haproxy/est/client-ca.pem", str(files.client_ca)),
        ("/etc/haproxy/est/hosts-ca.pem", str(files.hosts_ca)),
    ]
    text = SHIPPED.read_text()
    for old, new in replacements:
        assert old in text, f"deploy/haproxy.cfg no longer contains {old!r}: update tests/haproxy.py"
        text = text.replace(old, new)
    settings = "\n".join(line.split("#")[0] for line in text.splitlines())
    for leftover in ("10.20.0.", "/etc/haproxy/", ".hospital.example "):
        assert leftover not in settings, f"deploy/haproxy.cfg has a {leftover!r} the tests do not replace"
    return text


def check(config: Path) -> subprocess.CompletedProcess:
    """``haproxy -c -f``: parse and check the configuration (exit 0 when valid)."""
    return subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)


class HAProxy:
    """The rendered configuration, running: ``url`` (terminated TLS), ``passthrough_port``, server states."""

    def __init__(self, pki_dir: Path, workdir: Path, host_ports: tuple[int, int]) -> None:
        self.workdir = workdir
        self.port, self.passthrough_port = free_port(), free_port()
        self.stats_socket = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(render(proxy_files(pki_dir, workdir), host_ports, self.port, self.passthrough_port, self.stats_socket))
        self.log = workdir / "haproxy.log"
        self.url = f"https://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        """Start and wait until every server of both backends is UP."""
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.wait_for(lambda states: set(states.values()) == {"UP"}, timeout, "every server UP")

    def stop(self) -> None:
        stop_process(self.process)

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``show servers state``...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[tuple[str, str], str]:
        """{(backend, server): status} from ``show stat``: UP, DOWN, "UP 1/2" while rising..."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {(r["pxname"], r["svname"]): r["status"] for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_for(self, condition, timeout: float, what: str) -> dict[tuple[str, str], str]:
        """Poll the server states until ``condition(states)``; an assertion naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        states: dict = {}
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, f"haproxy exited:\n{self.log.read_text()}"
            try:
                states = self.server_states()
            except OSError:
                states = {}  # the socket is not there yet
            if states and condition(states):
                return states
            time.sleep(0.2)
        raise AssertionError(f"haproxy: not {what} within {timeout} s: {states}\n{self.log.read_text()[-3000:]}")
