"""The real clients the end-to-end tests drive: curl, openssl and strongSwan pki, as subprocesses."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509

from .pki import pem


def run(
    *cmd: str | Path, input: bytes | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run a command; with ``check``, a failure is an assertion naming the command and its stderr."""
    result = subprocess.run([str(c) for c in cmd], input=input, capture_output=True, timeout=timeout)
    if check:
        command = " ".join(map(str, cmd))
        assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stderr.decode(errors='replace')}"
    return result


def openssl(*args: str | Path, input: bytes | None = None) -> bytes:
    return run("openssl", *args, input=input).stdout


def pki(*args: str | Path, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """strongSwan's `pki`; its log lines go to stderr, its output to stdout."""
    return run("pki", *args, input=input, check=check)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names exactly as sent: libest matches them case-sensitively
    body: bytes

    def has(self, name: str) -> bool:
        """Whether a header is present, in any letter case."""
        return name.lower() in {k.lower() for k in self.headers}


def curl(url: str, ca_file: Path, *args: str, data: bytes | None = None) -> Reply:
    """One curl request (a POST of ``data`` from stdin when given); status, headers and body of the answer."""
    cmd = ["curl", "--silent", "--show-error", "--include", "--cacert", str(ca_file), *args]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    out = run(*cmd, url, input=data).stdout
    while True:  # with --include every response, an interim "100 Continue" too, starts with its header block
        head, _, out = out.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if status >= 200:
            return Reply(status, dict(line.split(": ", 1) for line in lines), out)


def call(server, path: str, *curl_args: str, body: bytes | None = None) -> Reply:
    """curl ``server``'s ``/.well-known/est/<path>`` (``server`` has ``url`` and ``ca_file``).

    Every answer must carry an exact Content-Length (except a 204, which RFC 9110
    forbids to have one) and never be chunked.
    """
    reply = curl(f"{server.url}/.well-known/est/{path}", server.ca_file, *curl_args, data=body)
    if reply.status == 204:
        assert reply.body == b"" and reply.headers.get("Content-Length", "0") == "0"
    else:
        assert reply.headers.get("Content-Length") == str(len(reply.body))
    assert not reply.has("Transfer-Encoding")
    return reply


def openssl_csr(key: str, cn: str) -> bytes:
    """A DER CSR from `openssl req -new -newkey KEY`; ``key`` is ``ec`` (P-256) or ``rsa:BITS``."""
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if key == "ec" else ["-newkey", key]
    return openssl("req", "-new", *newkey, "-nodes", "-keyout", "/dev/null", "-subj", f"/CN={cn}", "-outform", "DER")


def pkcs7_certs(der: bytes) -> list[x509.Certificate]:
    """The certificates `openssl pkcs7 -inform DER -print_certs` finds in a certs-only PKCS#7."""
    return x509.load_pem_x509_certificates(openssl("pkcs7", "-inform", "DER", "-print_certs", input=der))


def openssl_verify(cert: x509.Certificate, ca_file: Path) -> bytes:
    return openssl("verify", "-CAfile", ca_file, input=pem(cert))


def response_format(server) -> str:
    """The ``response_format`` a running server (tests.server.RunningServer) was started with."""
    return yaml.safe_load(server.config.read_text())["response_format"]


def enroll_with_retries(
    server, path: str, csr: bytes, credentials: tuple[str, str], deadline_seconds: float, on_wait=lambda reply: None
) -> tuple[Reply, list[Reply]]:
    """A gateway's retry loop as libest's client runs it: POST the same CSR; on 202, wait ``Retry-After``
    seconds and send it again, until another answer or the deadline. Returns that answer and every 202 before it."""
    import base64
    import http.client
    import ssl
    import time

    context = ssl.create_default_context(cafile=str(server.ca_file))
    token = base64.b64encode(":".join(credentials).encode()).decode()
    headers = {"Content-Type": "application/pkcs10", "Authorization": f"Basic {token}"}
    waits: list[Reply] = []
    give_up = time.monotonic() + deadline_seconds
    while True:
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
        try:
            connection.request("POST", f"/.well-known/est/{path}", body=base64.b64encode(csr), headers=headers)
            response = connection.getresponse()
            reply = Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()
        if reply.status != 202:
            return reply, waits
        waits.append(reply)
        on_wait(reply)
        delay = int(reply.headers["Retry-After"])
        assert time.monotonic() + delay < give_up, f"still waiting for approval after {deadline_seconds} s: {reply.body!r}"
        time.sleep(delay)
