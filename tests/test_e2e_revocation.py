"""End to end, revocation: the real server (gunicorn, TLS on loopback, 3 workers), curl, openssl and the CLI.

Once per response format (``base64`` and ``der``), with ``ca.crl_url`` and ``ca.ocsp_url`` pointing
at the server itself: two pumps enroll with curl; `est-admin cert revoke` (the CLI, writing the
server's own database, SQLite or PostgreSQL, from another process) revokes one, with the serial exactly as
`openssl x509 -serial` prints it; relying parties then see it as a RADIUS server would:

- the CRL from the distribution point named in the certificate, via curl, checked by
  `openssl verify -crl_check`: good stays OK, the revoked one fails with "certificate revoked";
- OCSP with `openssl ocsp -url` taken from the certificate's AIA (HTTPS; OpenSSL 3 speaks it),
  and the RFC 6960 GET form with curl + `openssl ocsp -respin`;
- the revoked pump's certificate can no longer re-enroll (curl --cert: 401), the good one can.

Where FreeRADIUS 3 and eapol_test are installed, FreeRADIUS itself runs with the ``eap`` module and
the CRL refresh script of docs/REVOCATION.md, and eapol_test logs in as the pumps (EAP-TLS): the
revoked one is refused by CRL, and through OCSP at once.
"""

from __future__ import annotations

import base64
import http.server
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import server as server_module
from .conftest import PASSWORD, USER, run_cli
from .e2e_clients import Reply, call, curl, openssl, run, response_format
from .pki import ca_signer
from .server import RunningServer, free_port, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.both_databases]

AUTH = ("--user", f"{USER}:{PASSWORD}")
PKCS10 = ("--header", "Content-Type: application/pkcs10")
FORMATS = ["base64", "der"]


@pytest.fixture(scope="module")
def servers(pki_dir, tmp_path_factory, new_database):
    """``servers(fmt)``: a server in that response format whose certificates point at its own /crl and /ocsp."""
    started: dict[str, RunningServer] = {}

    def get(fmt: str) -> RunningServer:
        if fmt not in started:
            workdir = tmp_path_factory.mktemp(f"revocation-{fmt}")
            port = free_port()  # known before start, so the URLs in the certificates can name it
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(server_module, "free_port", lambda: port)
                started[fmt] = server = start_server(
                    pki_dir,
                    workdir,
                    server={"workers": 3},
                    database=new_database(workdir),
                    rate_limit={"enabled": False},
                    response_format=fmt,
                    ca={"crl_url": f"https://127.0.0.1:{port}/crl", "ocsp_url": f"https://127.0.0.1:{port}/ocsp"},
                )
            assert server.port == port
            result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config)
            assert result.exit_code == 0, result.output
        return started[fmt]

    yield get
    for server in started.values():
        server.stop()


@pytest.fixture(params=FORMATS)
def server(request, servers) -> RunningServer:
    return servers(request.param)



def get(server: RunningServer, path: str, *curl_args: str) -> Reply:
    reply = curl(f"{server.url}{path}", server.ca_file, *curl_args)
    assert reply.headers.get("Content-Length") == str(len(reply.body))
    return reply


def enroll_pump(server: RunningServer, directory: Path, name: str, op: str = "simpleenroll") -> tuple[Path, Path, Path]:
    """Key and DER CSR from openssl, enrolled with curl and Basic credentials at ``op`` (maybe ``LABEL/simpleenroll``): (cert.pem, key.pem, csr.der)."""
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
            "-subj", f"/CN={name}", "-outform", "DER", "-out", csr)
    reply = call(server, op, *AUTH, *PKCS10, body=csr.read_bytes())
    assert reply.status == 200, reply.body
    if response_format(server) == "der":
        assert "Content-Transfer-Encoding" not in reply.headers and reply.body[:1] == b"\x30"
        pkcs7 = reply.body
    else:
        assert reply.headers["Content-Transfer-Encoding"] == "base64"
        pkcs7 = openssl("base64", "-d", input=reply.body)  # 64-column lines: openssl's own decoder
    cert = directory / f"{name}.pem"
    cert.write_bytes(openssl("pkcs7", "-inform", "DER", "-print_certs", input=pkcs7))
    return cert, key, csr


def openssl_serial(cert: Path) -> str:
    """The serial as an operator copies it from `openssl x509 -serial` (upper case, maybe a leading 0)."""
    return openssl("x509", "-in", cert, "-noout", "-serial").decode().strip().removeprefix("serial=")


def serial_hex(cert: Path) -> str:
    return format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "x")


def crl_url_of(cert: Path) -> str:
    text = openssl("x509", "-in", cert, "-noout", "-ext", "crlDistributionPoints").decode()
    (url,) = re.findall(r"URI:(\S+)", text)
    return url


def ocsp_url_of(cert: Path) -> str:
    return openssl("x509", "-in", cert, "-noout", "-ocsp_uri").decode().strip()


def verify_with_crl(server: RunningServer, crl: Path, cert: Path):
    return run("openssl", "verify", "-crl_check", "-CAfile", server.ca_file, "-CRLfile", crl, cert, check=False)


def ocsp_status(server: RunningServer, cert: Path, *how: str) -> str:
    """`openssl ocsp` for ``cert`` (``how``: -url ... or -respin ...); its report, after 'Response verify OK'."""
    result = run("openssl", "ocsp", "-issuer", server.ca_file, "-cert", cert, "-CAfile", server.ca_file, *how, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Response verify OK" in result.stderr, result.stderr.decode()
    return result.stdout.decode()


def test_revoked_pump_fails_crl_and_ocsp_checks_and_cannot_reenroll(server, tmp_path):
    fmt = response_format(server)
    good, good_key, good_csr = enroll_pump(server, tmp_path, f"NPPGOOD{fmt.upper()}")
    stolen, stolen_key, stolen_csr = enroll_pump(server, tmp_path, f"NPPSTOLE{fmt.upper()}")

    # The certificates name this server as their CRL distribution point and OCSP responder.
    assert crl_url_of(stolen) == f"{server.url}/crl"
    assert ocsp_url_of(stolen) == f"{server.url}/ocsp"

    # Before: both pass a CRL check and OCSP says good.
    crl = tmp_path / "before.pem"
    crl.write_bytes(get(server, "/crl.pem").body)
    for cert in (good, stolen):
        result = verify_with_crl(server, crl, cert)
        assert result.returncode == 0 and result.stdout.strip() == f"{cert}: OK".encode(), result.stdout + result.stderr
        assert ocsp_status(server, cert, "-url", ocsp_url_of(cert)).startswith(f"{cert}: good\n")

    # The operator revokes the stolen pump's certificate with the serial openssl printed.
    result = run_cli("cert", "revoke", openssl_serial(stolen), "--reason", "keyCompromise", config=server.config)
    assert result.exit_code == 0, result.output
    assert result.output == f"revoked {serial_hex(stolen)} (keyCompromise); CRL re-signed\n"

    # CRL from the distribution point in the certificate (DER), and /crl.pem: the same CRL.
    der_reply = curl(crl_url_of(stolen), server.ca_file)
    assert der_reply.status == 200 and der_reply.headers["Content-Type"] == "application/pkix-crl"
    crl = tmp_path / "crl.pem"
    crl.write_bytes(get(server, "/crl.pem").body)
    assert openssl("crl", "-in", crl, "-outform", "DER") == der_reply.body
    text = openssl("crl", "-in", crl, "-noout", "-text", "-CAfile", server.ca_file).decode()
    assert f"Serial Number: {openssl_serial(stolen)}" in text
    assert "Key Compromise" in text and serial_hex(good).upper() not in text

    result = verify_with_crl(server, crl, good)
    assert result.returncode == 0 and result.stdout.strip() == f"{good}: OK".encode(), result.stdout + result.stderr
    result = verify_with_crl(server, crl, stolen)
    assert result.returncode != 0
    assert b"error 23 at 0 depth lookup: certificate revoked" in result.stdout + result.stderr, result.stdout + result.stderr

    # OCSP over HTTPS at the address in the certificate (POST, with a nonce) ...
    assert ocsp_status(server, good, "-url", ocsp_url_of(good)).startswith(f"{good}: good\n")
    report = ocsp_status(server, stolen, "-url", ocsp_url_of(stolen))
    assert report.startswith(f"{stolen}: revoked\n") and "Reason: keyCompromise" in report and "Revocation Time:" in report

    # ... and the RFC 6960 GET form, fetched with curl and read with openssl -respin.
    for cert, word in ((good, "good"), (stolen, "revoked")):
        request = tmp_path / "request.der"
        openssl("ocsp", "-issuer", server.ca_file, "-cert", cert, "-no_nonce", "-reqout", request)
        encoded = urllib.parse.quote(base64.b64encode(request.read_bytes()).decode(), safe="")
        reply = get(server, f"/ocsp/{encoded}")
        assert reply.status == 200 and reply.headers["Content-Type"] == "application/ocsp-response"
        response = tmp_path / "response.der"
        response.write_bytes(reply.body)
        assert ocsp_status(server, cert, "-respin", response, "-no_nonce").startswith(f"{cert}: {word}\n")

    # The stolen pump's certificate no longer re-enrolls; the good one does.
    reply = call(server, "simplereenroll", "--cert", str(stolen), "--key", str(stolen_key), *PKCS10, body=stolen_csr.read_bytes())
    assert reply.status == 401, reply.body
    assert reply.headers["WWW-Authenticate"] == 'Basic realm="EST"'
    assert b"is revoked" in reply.body and reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    reply = call(server, "simplereenroll", "--cert", str(good), "--key", str(good_key), *PKCS10, body=good_csr.read_bytes())
    assert reply.status == 200, reply.body


def test_every_worker_serves_the_new_crl_at_once(server, tmp_path):
    """Fresh connections land on different workers: right after a revocation by the CLI, all serve the same new CRL."""
    cert, _, _ = enroll_pump(server, tmp_path, f"NPPXW{response_format(server).upper()}")
    before = {get(server, "/crl").body for _ in range(6)}
    assert len(before) == 1
    number = x509.load_der_x509_crl(before.pop()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    result = run_cli("cert", "revoke", serial_hex(cert), "--reason", "cessationOfOperation", config=server.config)
    assert result.exit_code == 0, result.output
    after = {get(server, path).body for path in ["/crl"] * 9}
    assert len(after) == 1, "workers disagree about the current CRL"
    crl = x509.load_der_x509_crl(after.pop())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    entry = crl.get_revoked_certificate_by_serial_number(int(serial_hex(cert), 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.cessation_of_operation
    ca = x509.load_pem_x509_certificate(server.ca_file.read_bytes())
    assert crl.is_signature_valid(ca.public_key())


def test_malformed_ocsp_requests_get_malformed_request(server):
    for body in (b"", b"garbage", b"\x30\x82\xff\xff"):
        reply = curl(f"{server.url}/ocsp", server.ca_file, "--header", "Content-Type: application/ocsp-request", data=body)
        assert reply.status == 200 and reply.headers["Content-Type"] == "application/ocsp-response"
        assert_malformed(reply.body)
    for encoded in ("%25%25not-base64", "abc", base64.b64encode(b"garbage").decode()):
        reply = get(server, f"/ocsp/{encoded}")
        assert reply.status == 200 and reply.headers["Content-Type"] == "application/ocsp-response"
        assert_malformed(reply.body)
    assert get(server, "/.well-known/est/cacerts").status == 200


def assert_malformed(response: bytes) -> None:
    """openssl reads an OCSP response whose status is malformedRequest (and exits 1, as for any unsuccessful one)."""
    result = run("openssl", "ocsp", "-respin", "/dev/stdin", "-resp_text", "-noverify", input=response, check=False)
    assert b"Responder Error: malformedrequest (1)" in result.stdout, result.stdout


# --- FreeRADIUS, as configured by docs/REVOCATION.md ---------------------------------------------
#
# The eap module and the CRL refresh script are taken from docs/REVOCATION.md itself; FreeRADIUS 3
# runs in the foreground on a free port, and eapol_test (package eapoltest) logs in with EAP-TLS as a
# pump does. Skipped where FreeRADIUS or eapol_test is not installed.

REPO = Path(__file__).resolve().parent.parent
RADDB = Path("/etc/freeradius/3.0")
FREERADIUS, EAPOL_TEST = shutil.which("freeradius"), shutil.which("eapol_test")
needs_freeradius = pytest.mark.skipif(
    not (FREERADIUS and EAPOL_TEST and RADDB.is_dir() and os.geteuid() == 0),
    reason="needs FreeRADIUS 3 (Debian package freeradius) and eapol_test (eapoltest), run as root",
)


def doc_block(starts_with: str) -> str:
    """The fenced block of docs/REVOCATION.md whose text starts with ``starts_with``."""
    text = (REPO / "docs" / "REVOCATION.md").read_text()
    (block,) = [b for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) if b.startswith(starts_with)]
    return block


def mint_server_certificate(pki_dir: Path, out: Path, eku) -> tuple[Path, Path]:
    """A certificate with ``eku`` from the server's own CA (its key in a file or a token); returns (cert.pem, key.pem)."""
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, out.name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    )
    cert, key_file = out.with_suffix(".pem"), out.with_suffix(".key")
    cert.write_bytes(ca_signer(pki_dir).sign_certificate(builder, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert, key_file


class OCSPRelay(http.server.ThreadingHTTPServer):
    """What nginx does in docs/REVOCATION.md 6.1: plain HTTP on loopback, forwarded over HTTPS."""

    def __init__(self, server: RunningServer) -> None:
        context = ssl.create_default_context(cafile=str(server.ca_file))
        target = f"{server.url}/ocsp"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(target, data=body, headers={"Content-Type": "application/ocsp-request"})
                with urllib.request.urlopen(request, context=context, timeout=10) as answer:
                    data = answer.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/ocsp"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class FreeRADIUS:
    """FreeRADIUS in the foreground (freeradius -X) with docs/REVOCATION.md's eap module and CA directory."""

    def __init__(self, workdir: Path, server: RunningServer, pki_dir: Path, ocsp_url: str | None = None) -> None:
        self.raddb = workdir / "raddb"
        shutil.copytree(RADDB, self.raddb, symlinks=True)
        # Run as root here: the test's files live under pytest's private temporary directory.
        conf = self.raddb / "radiusd.conf"
        conf.write_text(re.sub(r"^(\s*)(user|group) = ", r"\1# \2 = ", conf.read_text(), flags=re.M))
        # The default site on free loopback ports (auth, acct); no inner tunnel (EAP-TLS has none).
        self.port = free_udp_port()
        ports = iter([self.port, free_udp_port(), free_udp_port(), free_udp_port()])
        site = (self.raddb / "sites-available" / "default").read_text()
        site = re.sub(r"^(\s*)port = 0", lambda m: f"{m.group(1)}port = {next(ports)}", site, flags=re.M)
        site = re.sub(r"^(\s*)ipaddr = \*", r"\1ipaddr = 127.0.0.1", site, flags=re.M)
        site = re.sub(r"^(\s*)ipv6addr = ::(\s)", r"\1ipv6addr = ::1\2", site, flags=re.M)
        (self.raddb / "sites-available" / "default").write_text(site)
        (self.raddb / "sites-enabled" / "inner-tunnel").unlink()
        (self.raddb / "certs").mkdir(exist_ok=True)
        cert, key = mint_server_certificate(pki_dir, workdir / "radius", ExtendedKeyUsageOID.SERVER_AUTH)
        shutil.copy(cert, self.raddb / "certs" / "radius.pem")
        shutil.copy(key, self.raddb / "certs" / "radius.key")
        eap = doc_block("# /etc/freeradius/3.0/mods-available/eap").replace(str(RADDB), str(self.raddb))
        if ocsp_url:
            eap = eap.replace("enable = no", "enable = yes").replace('url = "http://127.0.0.1:8080/ocsp"', f'url = "{ocsp_url}"')
        (self.raddb / "mods-available" / "eap").write_text(eap)
        # The CA directory as in section 4.1, the CRL by the refresh script of section 5.
        self.ca_dir = self.raddb / "est-ca"
        self.ca_dir.mkdir()
        shutil.copy(pki_dir / "ca.pem", self.ca_dir / "est-ca.pem")
        self.refresh_script = workdir / "est-crl-refresh"
        self.refresh_script.write_text(doc_block("#!/bin/sh"))
        self.refresh_script.chmod(0o755)
        self.server = server
        self.refresh_crl()
        check = run(FREERADIUS, "-XC", "-d", self.raddb, check=False)
        assert b"Configuration appears to be OK" in check.stdout, check.stdout.decode()[-3000:]
        self.log = workdir / "radius.log"
        self.process = subprocess.Popen(
            [FREERADIUS, "-X", "-d", str(self.raddb)],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while b"Ready to process requests" not in self.log.read_bytes():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def refresh_crl(self) -> None:
        env = {**os.environ, "EST_CRL_URL": f"{self.server.url}/crl.pem", "EST_CA_DIR": str(self.ca_dir)}
        result = subprocess.run([str(self.refresh_script)], env=env, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()

    def login(self, cert: Path, key: Path, ca_file: Path) -> bool:
        """An EAP-TLS login as the pump with ``cert``: True for Access-Accept."""
        conf = cert.with_suffix(".eapol.conf")
        conf.write_text(
            "network={\n\tkey_mgmt=WPA-EAP\n\teap=TLS\n\tidentity=\"%s\"\n\tca_cert=\"%s\"\n\tclient_cert=\"%s\"\n"
            "\tprivate_key=\"%s\"\n\teapol_flags=0\n}\n" % (cert.stem, ca_file, cert, key)
        )
        result = subprocess.run(
            [EAPOL_TEST, "-c", str(conf), "-a", "127.0.0.1", "-p", str(self.port), "-s", "testing123", "-t", "10"],
            capture_output=True, timeout=60,
        )
        last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else b""
        assert last in (b"SUCCESS", b"FAILURE"), result.stdout.decode()[-2000:]
        return last == b"SUCCESS"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_freeradius
def test_freeradius_refuses_a_revoked_pump_by_crl(servers, pki_dir, tmp_path):
    """Section 4 and 5 of docs/REVOCATION.md: revoke, fetch the CRL with the script, and the pump is out."""
    server = servers("der")
    good, good_key, _ = enroll_pump(server, tmp_path, "NPPRADOK")
    stolen, stolen_key, _ = enroll_pump(server, tmp_path, "NPPRADST")
    result = run_cli("device", "list", "--search", "NPPRADST", config=server.config)
    device_id = result.output.split("\t")[0]
    result = run_cli("device", "revoke", device_id, "--reason", "keyCompromise", config=server.config)
    assert result.exit_code == 0, result.output

    radius = FreeRADIUS(tmp_path, server, pki_dir)  # fetches the CRL with est-crl-refresh, then starts
    try:
        assert radius.login(good, good_key, server.ca_file)
        assert not radius.login(stolen, stolen_key, server.ca_file)
        assert "OpenSSL says error 23 : certificate revoked" in radius.log.read_text()
    finally:
        radius.stop()




@needs_freeradius
@pytest.mark.parametrize("signer", ["ca", "delegated"])
def test_freeradius_refuses_a_revoked_pump_by_ocsp_at_once(pki_dir, tmp_path, signer, new_database):
    """Section 6: revoked after FreeRADIUS loaded its CRL, the pump is refused at its next login through OCSP."""
    overrides = {}
    if signer == "delegated":
        cert, key = mint_server_certificate(pki_dir, tmp_path / "ocsp-responder", ExtendedKeyUsageOID.OCSP_SIGNING)
        overrides = {"ca": {"ocsp_responder_cert_file": str(cert), "ocsp_responder_key_file": str(key)}}
    server = start_server(
        pki_dir, tmp_path, database=new_database(tmp_path), rate_limit={"enabled": False},
        response_format="der", **overrides,
    )
    relay = OCSPRelay(server)
    radius = None
    try:
        assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config).exit_code == 0
        good, good_key, _ = enroll_pump(server, tmp_path, "NPPOCSPOK")
        stolen, stolen_key, _ = enroll_pump(server, tmp_path, "NPPOCSPST")
        radius = FreeRADIUS(tmp_path, server, pki_dir, ocsp_url=relay.url)
        assert radius.login(stolen, stolen_key, server.ca_file), radius.log.read_text()[-3000:]

        result = run_cli("cert", "revoke", openssl_serial(stolen), "--reason", "keyCompromise", config=server.config)
        assert result.exit_code == 0, result.output
        assert not radius.login(stolen, stolen_key, server.ca_file)  # no CRL refresh, no restart
        assert "ocsp: Cert status: revoked" in radius.log.read_text()
        assert radius.login(good, good_key, server.ca_file)
    finally:
        if radius is not None:
            radius.stop()
        relay.shutdown()
        server.stop()
