"""End to end, the RA and device side: mutual TLS, re-enrollment, serverkeygen, csrattrs,
tls-unique proof-of-possession, bootstrap, and concurrent first enrollments.

The real server (gunicorn, TLS on loopback, 3 workers) asks for client
certificates (``tls.client_ca_file``), once per response format: ``base64`` on
one line (what strongSwan pki needs) and ``der``. Clients are curl, openssl,
strongSwan pki and, where the TLS session itself matters (tls-unique) or many
requests must be in flight at once, Python's ssl + http.client. Outcomes are
read back from the server's own store; each module runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import base64
import http.client
import re
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from est_app.auth import fingerprint
from est_app.store import Store

from .conftest import PASSWORD, USER, open_store, run_cli
from .e2e_clients import Reply, call, openssl, openssl_csr, openssl_verify, pkcs7_certs, pki, response_format
from .pki import ca_signer, der, make_csr, pem, rsa_key
from .server import RunningServer, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.both_databases]

AUTH = ("--user", f"{USER}:{PASSWORD}")
PKCS10 = ("--header", "Content-Type: application/pkcs10")
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
FORMATS = ["base64", "der"]

LABELS = {
    "pumps": {"auth": ["cert"]},  # the IQE gateway's label: RA certificate only
    "wards": {"auth": ["cert"]},  # cert-only too, but the gateway is not registered for it
    "attrs": {"csr_attributes": ["challengePassword", "macAddress"]},
    "pop": {"require_pop": True},
    "unique": {"duplicate_policy": "reject"},
}
SERVERS = {
    "base64": {"response_format": "base64", "base64_line_length": 0, "bootstrap_enabled": True, "labels": LABELS},
    "der": {"response_format": "der", "bootstrap_enabled": True, "labels": LABELS},
    "no-bootstrap": {},
}


# --- client certificates minted by the test CA -------------------------------------------------


def mint_client_certificate(pki_dir: Path, out: Path, cn: str) -> tuple[Path, Path]:
    """A clientAuth certificate from the server's own CA (its key in a file or a token); returns (cert.pem, key.pem)."""
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
    )
    cert = ca_signer(pki_dir).sign_certificate(builder, hashes.SHA256())
    cert_path, key_path = out / f"{cn}.pem", out / f"{cn}.key"
    cert_path.write_bytes(pem(cert))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def client_certs(pki_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("client-certs")
    return {name: mint_client_certificate(pki_dir, out, cn) for name, cn in (("ra", "IQE-Gateway"), ("stranger", "Unregistered-Gateway"))}


# --- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(pki_dir, tmp_path_factory, client_certs, new_database):
    """``servers(name)``: the server configured as ``SERVERS[name]``, started on first use.

    Each has its own database, the test user, and the gateway's RA certificate registered for ``pumps``.
    """
    started: dict[str, RunningServer] = {}

    def get(name: str) -> RunningServer:
        if name not in started:
            workdir = tmp_path_factory.mktemp(f"ra-{name}")
            started[name] = server = start_server(
                pki_dir,
                workdir,
                tls={"client_ca_file": str(pki_dir / "ca.pem")},
                server={"workers": 3},
                database=new_database(workdir),
                rate_limit={"enabled": False},
                **SERVERS[name],
            )
            result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config)
            assert result.exit_code == 0, result.output
            if "labels" in SERVERS[name]:
                result = run_cli("ra", "add", str(client_certs["ra"][0]), "--label", "pumps", config=server.config)
                assert result.exit_code == 0, result.output
        return started[name]

    yield get
    for server in started.values():
        server.stop()


@pytest.fixture(params=FORMATS)
def server(request, servers) -> RunningServer:
    return servers(request.param)



_stores: dict[Path, Store] = {}


def store_of(server: RunningServer) -> Store:
    """The server's own store, opened read-side from this process."""
    if server.config not in _stores:
        _stores[server.config] = open_store(server.config)
    return _stores[server.config]


# --- reading replies the way a client of each format does --------------------------------------


def decode_part(body: bytes, headers: dict[str, str], fmt: str) -> bytes:
    """DER from one EST body (or multipart part): raw in der mode; one-line base64 through `openssl base64 -d -A`."""
    if fmt == "der":
        assert "Content-Transfer-Encoding" not in headers
        assert body[:1] == b"\x30"
        return body
    assert headers["Content-Transfer-Encoding"] == "base64"
    assert len(body.strip().splitlines()) == 1  # base64_line_length: 0
    return openssl("base64", "-d", "-A", input=body.strip())


def payload(reply: Reply, fmt: str) -> bytes:
    assert reply.status == 200, reply.body
    return decode_part(reply.body, reply.headers, fmt)


def issued(reply: Reply, fmt: str, ca_file: Path) -> x509.Certificate:
    """The one certificate of an enroll reply, checked with `openssl verify` against the CA."""
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"] == CERTS_ONLY
    (cert,) = pkcs7_certs(payload(reply, fmt))
    assert openssl_verify(cert, ca_file).strip() == b"stdin: OK"
    return cert


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def refused(reply: Reply, status: int, phrase: str) -> None:
    message = reply.body.decode()
    assert (reply.status, reply.headers["Content-Type"]) == (status, "text/plain; charset=utf-8"), message
    assert phrase in message, message


def enroll(server: RunningServer, csr: bytes, *curl_args: str, path: str = "simpleenroll") -> Reply:
    return call(server, path, *curl_args, *PKCS10, body=csr)


# --- 1. re-enrollment over mutual TLS -----------------------------------------------------------


def strongswan_key_and_csr(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    key.write_bytes(pki("--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem").stdout)
    csr.write_bytes(pki("--req", "--type", "priv", "--in", key, "--dn", f"CN={cn}", "--outform", "pem").stdout)
    return key, csr


def assert_replaced(server: RunningServer, old: x509.Certificate, new: x509.Certificate, old_cert: Path, old_key: Path, csr: bytes) -> None:
    """The store's view after a re-enrollment, and the old certificate's refusal from then on."""
    assert new.subject == old.subject and serial(new) != serial(old)
    store = store_of(server)
    assert store.get_certificate(serial(old)).status == "superseded"
    record = store.get_certificate(serial(new))
    assert (record.status, record.operation, record.der) == ("valid", "simplereenroll", der(new))
    (device,) = [d for d in store.find_devices(label="default") if d.device_key == common_name(new)]
    assert device.current_serial == serial(new)
    again = enroll(server, csr, "--cert", str(old_cert), "--key", str(old_key), path="simplereenroll")
    refused(again, 403, f"certificate {serial(old)} is superseded")


def test_strongswan_reenrolls_over_mutual_tls(servers, tmp_path):
    """pki --est with --userpass, then with --cert/--key and a new key's CSR (rekey): simplereenroll over mutual TLS."""
    server = servers("base64")
    old_key, old_csr = strongswan_key_and_csr(tmp_path, "old", "NPPRE01")
    common = ("--est", "--url", server.url, "--cacert", server.ca_file, "--outform", "pem")
    old_pem = tmp_path / "old.pem"
    old_pem.write_bytes(pki(*common, "--userpass", f"{USER}:{PASSWORD}", input=old_csr.read_bytes()).stdout)
    (old,) = x509.load_pem_x509_certificates(old_pem.read_bytes())

    new_key, new_csr = strongswan_key_and_csr(tmp_path, "new", "NPPRE01")
    result = pki(*common, "--cert", old_pem, "--key", old_key, "--in", new_csr)
    assert b"sending TLS client certificate 'CN=NPPRE01'" in result.stderr
    (new,) = x509.load_pem_x509_certificates(result.stdout)
    assert openssl_verify(new, server.ca_file).strip() == b"stdin: OK"
    assert new.public_key() == x509.load_pem_x509_csr(new_csr.read_bytes()).public_key()
    assert_replaced(server, old, new, old_pem, old_key, new_csr.read_bytes())

    # pki with the superseded certificate: refused, and pki says so.
    result = pki(*common, "--cert", old_pem, "--key", old_key, "--in", new_csr, check=False)
    assert result.returncode != 0 and b"EST request failed: HTTP 403" in result.stderr


def test_curl_reenrolls_over_mutual_tls(server, tmp_path):
    """The same with curl --cert/--key, in base64 and DER: renew keeps the key, rekey brings a new one."""
    fmt = response_format(server)
    cn = f"NPPRE02{fmt.upper()}"
    old_key, old_csr = strongswan_key_and_csr(tmp_path, "old", cn)
    old = issued(enroll(server, old_csr.read_bytes(), *AUTH), fmt, server.ca_file)
    old_pem = tmp_path / "old.pem"
    old_pem.write_bytes(pem(old))

    renew = issued(enroll(server, old_csr.read_bytes(), "--cert", str(old_pem), "--key", str(old_key), path="simplereenroll"), fmt, server.ca_file)
    assert renew.public_key() == old.public_key()
    assert_replaced(server, old, renew, old_pem, old_key, old_csr.read_bytes())

    renew_pem = tmp_path / "renew.pem"
    renew_pem.write_bytes(pem(renew))
    new_key, new_csr = strongswan_key_and_csr(tmp_path, "new", cn)
    rekey = issued(enroll(server, new_csr.read_bytes(), "--cert", str(renew_pem), "--key", str(old_key), path="simplereenroll"), fmt, server.ca_file)
    assert rekey.public_key() == x509.load_pem_x509_csr(new_csr.read_bytes()).public_key()
    assert_replaced(server, renew, rekey, renew_pem, old_key, new_csr.read_bytes())


def test_reenroll_refuses_another_subject_and_a_missing_certificate(server, tmp_path):
    fmt = response_format(server)
    key, csr = strongswan_key_and_csr(tmp_path, "dev", f"NPPRE03{fmt.upper()}")
    cert_pem = tmp_path / "dev.pem"
    cert_pem.write_bytes(pem(issued(enroll(server, csr.read_bytes(), *AUTH), fmt, server.ca_file)))
    _, other_csr = strongswan_key_and_csr(tmp_path, "other", "NPPOTHER")
    reply = enroll(server, other_csr.read_bytes(), "--cert", str(cert_pem), "--key", str(key), path="simplereenroll")
    refused(reply, 403, "differs from the certificate's")
    refused(enroll(server, csr.read_bytes(), *AUTH, path="simplereenroll"), 401, "needs the current certificate")


def test_strongswan_cannot_read_der_responses(servers, tmp_path):
    """pki 5.9.8 always base64-decodes the body: a ``der`` deployment is not for strongSwan."""
    server = servers("der")
    _, csr = strongswan_key_and_csr(tmp_path, "d", "NPPSWDER")
    result = pki(
        "--est", "--url", server.url, "--cacert", server.ca_file, "--userpass", f"{USER}:{PASSWORD}", "--outform", "pem",
        input=csr.read_bytes(), check=False,
    )
    assert result.returncode != 0 and b"could not parse pkcs7" in result.stderr


def test_strongswan_cannot_reach_a_label(servers, tmp_path):
    """pki 5.9.8 appends /.well-known/est/<op> to --url whatever it holds: only the unlabelled path is reachable."""
    server = servers("base64")
    _, csr = strongswan_key_and_csr(tmp_path, "l", "NPPSWLABEL")
    result = pki(
        "--est", "--url", f"{server.url}/.well-known/est/attrs", "--cacert", server.ca_file,
        "--userpass", f"{USER}:{PASSWORD}", "--outform", "pem", input=csr.read_bytes(), check=False,
    )
    assert result.returncode != 0 and b"EST request failed: HTTP 404" in result.stderr


# --- 2. an RA over mutual TLS on a cert-only label ----------------------------------------------


@pytest.mark.parametrize(
    "label, who, status, phrase",
    [
        ("pumps", "ra", 200, None),
        ("wards", "ra", 403, "is not registered for label 'wards'"),
        ("pumps", "stranger", 403, "is not registered as an RA"),
        ("pumps", None, 401, "authentication required: send a registered RA client certificate"),
        ("pumps", "basic", 403, "does not accept passwords"),
    ],
    ids=["registered-ra", "ra-other-label", "unregistered-cert", "no-cert", "password-only"],
)
def test_ra_enrolls_a_pump_with_its_client_certificate(server, client_certs, label, who, status, phrase):
    fmt = response_format(server)
    cn = f"NPPRA{fmt.upper()}"
    csr = openssl_csr("ec", cn)
    if who in client_certs:
        cert_path, key_path = client_certs[who]
        args = ("--cert", str(cert_path), "--key", str(key_path))
    else:
        args = AUTH if who == "basic" else ()
    reply = enroll(server, csr, *args, path=f"{label}/simpleenroll")
    if status != 200:
        refused(reply, status, phrase)
        assert not reply.has("Content-Transfer-Encoding")
        return
    cert = issued(reply, fmt, server.ca_file)
    assert common_name(cert) == cn and cert.public_key() == x509.load_der_x509_csr(csr).public_key()
    ra_cert = x509.load_pem_x509_certificate(client_certs["ra"][0].read_bytes())
    record = store_of(server).get_certificate(serial(cert))
    assert (record.label, record.requester, record.der) == ("pumps", f"ra:{fingerprint(ra_cert)}", der(cert))


def ra_enrolled_device(server: RunningServer, client_certs, tmp_path: Path, cn: str) -> tuple[x509.Certificate, Path, Path, bytes]:
    """A pump enrolled by the gateway on ``pumps``: (certificate, its PEM file, its key file, its CSR)."""
    key, csr = strongswan_key_and_csr(tmp_path, cn, cn)
    ra_cert, ra_key = client_certs["ra"]
    reply = enroll(server, csr.read_bytes(), "--cert", str(ra_cert), "--key", str(ra_key), path="pumps/simpleenroll")
    cert = issued(reply, response_format(server), server.ca_file)
    cert_pem = tmp_path / f"{cn}.pem"
    cert_pem.write_bytes(pem(cert))
    return cert, cert_pem, key, csr.read_bytes()


def test_pump_reenrolls_itself_on_its_label(server, client_certs, tmp_path):
    """The pump's own certificate (not the RA's) renews it on ``pumps``, a label that takes no passwords."""
    fmt = response_format(server)
    old, old_pem, key, csr = ra_enrolled_device(server, client_certs, tmp_path, f"NPPRAD{fmt.upper()}")
    new = issued(enroll(server, csr, "--cert", str(old_pem), "--key", str(key), path="pumps/simplereenroll"), fmt, server.ca_file)
    store = store_of(server)
    assert store.get_certificate(serial(old)).status == "superseded"
    record = store.get_certificate(serial(new))
    assert (record.status, record.label, record.requester) == ("valid", "pumps", f"device:{serial(old)}")
    (device,) = [d for d in store.find_devices(label="pumps") if d.device_key == common_name(new)]
    assert device.current_serial == serial(new)


def test_reenrollment_stays_on_the_certificates_label(servers, client_certs, tmp_path):
    # On the unlabelled path (all strongSwan can reach), the new certificate still follows 'pumps'.
    server = servers("der")
    old, old_pem, key, csr = ra_enrolled_device(server, client_certs, tmp_path, "NPPXLABEL")
    reply = enroll(server, csr, "--cert", str(old_pem), "--key", str(key), path="simplereenroll")
    assert reply.status == 200, reply.body
    new = issued(reply, "der", server.ca_file)
    assert store_of(server).get_certificate(serial(new)).label == "pumps"


# --- 3. serverkeygen ----------------------------------------------------------------------------


def multipart(reply: Reply) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/mixed`` body: (headers, body) each, split on the declared boundary."""
    ctype = reply.headers["Content-Type"]
    match = re.fullmatch(r'multipart/mixed; boundary="?([^";]+)"?', ctype)
    assert match, ctype
    delimiter = b"--" + match.group(1).encode()
    assert reply.body.rstrip(b"\r\n").endswith(delimiter + b"--")
    chunks = reply.body.rstrip(b"\r\n")[: -len(delimiter) - 2].split(delimiter)
    assert chunks[0].strip() == b""  # no preamble
    parts = []
    for chunk in chunks[1:]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n"), chunk[:80]
        head, _, body = chunk[2:-2].partition(b"\r\n\r\n")
        parts.append((dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n")), body))
    return parts


@pytest.mark.parametrize(
    "key, pkey_type",
    [("ec", "EC"), ("rsa:2048", "RSA")],
    ids=["ec-p256", "rsa-2048"],
)
def test_serverkeygen_returns_a_pkcs8_key_and_its_certificate(server, key, pkey_type, tmp_path):
    fmt = response_format(server)
    cn = f"NPPKG{fmt.upper()}"
    reply = enroll(server, openssl_csr(key, cn), *AUTH, path="serverkeygen")
    assert reply.status == 200, reply.body
    (key_headers, key_part), (cert_headers, cert_part) = multipart(reply)
    assert key_headers["Content-Type"] == "application/pkcs8"
    assert cert_headers["Content-Type"] == CERTS_ONLY
    key_pem = openssl("pkcs8", "-inform", "DER", "-nocrypt", input=decode_part(key_part, key_headers, fmt))
    assert b"-----BEGIN PRIVATE KEY-----" in key_pem
    assert openssl("pkey", "-noout", "-text", input=key_pem).startswith(
        b"Private-Key: (256 bit" if pkey_type == "EC" else b"Private-Key: (2048 bit"
    )
    certs_pem = openssl("pkcs7", "-inform", "DER", "-print_certs", input=decode_part(cert_part, cert_headers, fmt))
    (cert,) = x509.load_pem_x509_certificates(certs_pem)
    assert openssl_verify(cert, server.ca_file).strip() == b"stdin: OK"
    assert common_name(cert) == cn
    cert_file = tmp_path / "cert.pem"
    cert_file.write_bytes(pem(cert))
    assert openssl("x509", "-in", cert_file, "-noout", "-pubkey") == openssl("pkey", "-pubout", input=key_pem)
    record = store_of(server).get_certificate(serial(cert))
    assert (record.operation, record.der) == ("serverkeygen", der(cert))


def test_serverkeygen_refuses_a_key_type_outside_the_catalogue(server):
    csr = base64.b64encode(der(make_csr("NPPKG4096", key=rsa_key(4096))))
    reply = enroll(server, csr, *AUTH, path="serverkeygen")
    refused(reply, 400, "serverkeygen key type rsa-4096 is not allowed")


# --- 4. csrattrs --------------------------------------------------------------------------------


def test_csrattrs_lists_the_labels_attributes(server):
    reply = call(server, "attrs/csrattrs")
    assert reply.headers["Content-Type"] == "application/csrattrs"
    parsed = openssl("asn1parse", "-inform", "DER", input=payload(reply, response_format(server))).decode()
    oids = re.findall(r"prim: OBJECT\s+:(\S+)", parsed)
    assert oids == ["challengePassword", "1.3.6.1.1.1.1.22"]
    assert "d=0" in parsed and "cons: SEQUENCE" in parsed.splitlines()[0]


def test_csrattrs_is_204_without_attributes(server):
    reply = call(server, "csrattrs")
    assert (reply.status, reply.body) == (204, b"")
    assert not reply.has("Content-Transfer-Encoding")


# --- 5. tls-unique proof of possession (RFC 7030 3.5) -------------------------------------------

TLS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def post_on_one_connection(server: RunningServer, path: str, tls: str, make_csr_body) -> tuple[int, str, bytes, http.client.HTTPMessage]:
    """Open one TLS connection, read its tls-unique, and POST the CSR ``make_csr_body(tls_unique)`` on it.

    Returns (status, negotiated TLS version, body, headers).
    """
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.maximum_version = TLS[tls]
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
    try:
        conn.connect()
        binding = conn.sock.get_channel_binding("tls-unique") if conn.sock.version() == "TLSv1.2" else None
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        conn.request(
            "POST",
            f"/.well-known/est/{path}",
            body=make_csr_body(binding),
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {token}"},
        )
        response = conn.getresponse()
        return response.status, conn.sock.version(), response.read(), response.headers
    finally:
        conn.close()


def other_session_tls_unique(server: RunningServer) -> bytes:
    """The tls-unique of another, already closed, TLS 1.2 connection to the server."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
    try:
        conn.connect()
        return conn.sock.get_channel_binding("tls-unique")
    finally:
        conn.close()


def pop_csr(cn: str, password: str, server: RunningServer | None = None):
    """A CSR whose challengePassword is base64(tls-unique) of this connection ("tls-unique"), of another one
    ("replayed"), something else ("wrong"), or absent ("none")."""
    other = other_session_tls_unique(server) if password == "replayed" else None

    def build(binding: bytes | None) -> bytes:
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        if password == "tls-unique":
            assert binding and len(binding) == 12  # the TLS 1.2 Finished verify_data
            builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, base64.b64encode(binding))
        elif password == "replayed":
            assert other and binding and other != binding
            builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, base64.b64encode(other))
        elif password == "wrong":
            builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, base64.b64encode(b"not this session"))
        return base64.b64encode(der(builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())))

    return build


@pytest.mark.parametrize(
    "label, tls, password, status, phrase",
    [
        ("", "1.2", "tls-unique", 200, None),
        ("", "1.2", "wrong", 401, "does not match this TLS session's tls-unique"),
        ("", "1.2", "replayed", 401, "does not match this TLS session's tls-unique"),
        ("", "1.3", "none", 200, None),
        ("pop/", "1.2", "tls-unique", 200, None),
        ("pop/", "1.2", "none", 401, "requires the CSR's challengePassword to be base64(tls-unique)"),
        ("pop/", "1.3", "none", 401, "requires proof-of-possession linking"),
    ],
    ids=["linked", "wrong-binding", "other-sessions-binding", "tls13-not-required", "pop-linked", "pop-missing", "pop-tls13"],
)
def test_tls_unique_proof_of_possession(server, label, tls, password, status, phrase):
    fmt = response_format(server)
    cn = f"NPPPOP{fmt.upper()}{label.rstrip('/').upper()}"  # a device has one label
    got, version, body, _ = post_on_one_connection(server, f"{label}simpleenroll", tls, pop_csr(cn, password, server))
    assert version == f"TLSv{tls}"
    assert got == status, body
    if status == 200:
        (cert,) = pkcs7.load_der_pkcs7_certificates(body if fmt == "der" else base64.b64decode(body))
        assert common_name(cert) == cn
        assert store_of(server).get_certificate(serial(cert)).status == "valid"
    else:
        assert phrase in body.decode()


@pytest.mark.parametrize("source", ["pop-wrong-binding", "reenroll-no-cert", "cert-only-label-no-cert"])
def test_every_401_carries_a_challenge(servers, source):
    server = servers("der")
    if source == "pop-wrong-binding":
        status, _, body, headers = post_on_one_connection(server, "simpleenroll", "1.2", pop_csr("NPP401", "wrong"))
        www_authenticate = headers.get("WWW-Authenticate")
    else:
        path = "simplereenroll" if source == "reenroll-no-cert" else "pumps/simpleenroll"
        reply = enroll(server, openssl_csr("ec", "NPP401"), path=path)
        status, body, www_authenticate = reply.status, reply.body, reply.headers.get("WWW-Authenticate")
    assert status == 401, body
    assert www_authenticate, f"401 without WWW-Authenticate: {body!r}"


# --- 6. bootstrap -------------------------------------------------------------------------------


def test_bootstrap_is_404_unless_enabled(servers):
    reply = enroll(servers("no-bootstrap"), openssl_csr("ec", "NPPBOOT0"), *AUTH, path="bootstrap")
    refused(reply, 404, "bootstrap is not enabled")


def test_bootstrap_issues_a_30_day_client_certificate_once(server):
    fmt = response_format(server)
    cn = f"NPPBOOT{fmt.upper()}"
    cert = issued(enroll(server, openssl_csr("ec", cn), *AUTH, path="bootstrap"), fmt, server.ca_file)
    assert common_name(cert) == cn
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, minutes=5)  # 5 min backdated
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    (device,) = [d for d in store_of(server).find_devices(label="default") if d.device_key == cn]
    assert device.current_serial == serial(cert)

    again = enroll(server, openssl_csr("ec", cn), *AUTH, path="bootstrap")
    refused(again, 409, f"device {cn!r} (number {device.id}) is already enrolled")
    assert store_of(server).get_device(device.id).current_serial == serial(cert)


# --- 7. concurrent first enrollments ------------------------------------------------------------


def fire(server: RunningServer | list[RunningServer], jobs: list[tuple[str, bytes]], client_cert: tuple[Path, Path] | None = None) -> list[tuple[int, bytes]]:
    """POST every (path, DER CSR) at once, each on its own TLS connection; (status, body) back, in order.

    Given a list of servers (on one database), the jobs go to each in turn.

    With ``client_cert`` the requests authenticate with it over mutual TLS, else with HTTP Basic. A barrier
    releases all threads together; it sits before connecting, since a gthread worker's thread that has
    completed a handshake then blocks reading the request.
    """
    barrier = threading.Barrier(len(jobs))
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    servers = server if isinstance(server, list) else [server]

    def one(numbered: tuple[int, tuple[str, bytes]]) -> tuple[int, bytes]:
        i, (path, csr) = numbered
        server = servers[i % len(servers)]
        context = ssl.create_default_context(cafile=str(server.ca_file))
        headers = {"Content-Type": "application/pkcs10"}
        if client_cert:
            context.load_cert_chain(*map(str, client_cert))
        else:
            headers["Authorization"] = f"Basic {token}"
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=60)
        barrier.wait(timeout=30)
        try:
            conn.request("POST", f"/.well-known/est/{path}", body=base64.b64encode(csr), headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(one, enumerate(jobs)))


def certificate_in(body: bytes, fmt: str) -> x509.Certificate:
    (cert,) = pkcs7.load_der_pkcs7_certificates(body if fmt == "der" else base64.b64decode(body))
    return cert


def store_rows(store: Store, label: str, cn: str):
    devices = [d for d in store.find_devices(label=label, search=cn) if d.device_key == cn]
    certs = [c for d in devices for c in store.device_certificates(d.id)]
    return devices, certs


def test_concurrent_first_enrollments_renew(server):
    """40 at once for one CN and 40 for distinct CNs, on 3 workers: one device per CN, every answer on record."""
    fmt = response_format(server)
    distinct = [f"NPPPAR{i:02d}" for i in range(40)]
    cns = ["NPPDUP1"] * 40 + distinct
    key = ec.generate_private_key(ec.SECP256R1())
    results = fire(server, [("simpleenroll", der(make_csr(cn, key=key))) for cn in cns])
    assert [status for status, _ in results] == [200] * 80, [b for s, b in results if s != 200][:3]
    returned = [(cn, certificate_in(body, fmt)) for cn, (_, body) in zip(cns, results)]
    assert len({serial(c) for _, c in returned}) == 80  # no serial handed out twice

    store = store_of(server)
    for cn, cert in returned:  # every certificate a client got is on record, byte for byte
        assert common_name(cert) == cn
        record = store.get_certificate(serial(cert))
        assert record is not None and record.der == der(cert), cn

    for cn in distinct:
        (device,), (record,) = store_rows(store, "default", cn)
        assert (record.status, record.serial) == ("valid", device.current_serial)

    (device,), records = store_rows(store, "default", "NPPDUP1")
    assert sorted(r.serial for r in records) == sorted(serial(c) for cn, c in returned if cn == "NPPDUP1")
    valid = [r.serial for r in records if r.status == "valid"]
    assert valid == [device.current_serial]
    assert sorted(r.status for r in records) == ["superseded"] * 39 + ["valid"]


def test_concurrent_first_enrollments_reject(server):
    """40 at once for one CN on a ``duplicate_policy: reject`` label: one 200, 39 409s, one device, one certificate."""
    fmt = response_format(server)
    results = fire(server, [("unique/simpleenroll", der(make_csr("NPPDUP2")))] * 40)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [409] * 39, statuses
    (body,) = [b for s, b in results if s == 200]
    cert = certificate_in(body, fmt)

    store = store_of(server)
    (device,), (record,) = store_rows(store, "unique", "NPPDUP2")
    assert (record.serial, record.status, record.der) == (device.current_serial, "valid", der(cert))
    for status, body in results:
        if status == 409:
            assert f"device 'NPPDUP2' (number {device.id}) is already enrolled on label 'unique'" in body.decode()


def test_concurrent_reenrollments_with_one_certificate(server, tmp_path):
    """20 re-enrollments at once with the same current certificate: one wins, 19 are told it is superseded."""
    fmt = response_format(server)
    cn = f"NPPRACE{fmt.upper()}"
    key, csr = strongswan_key_and_csr(tmp_path, "race", cn)
    old = issued(enroll(server, csr.read_bytes(), *AUTH), fmt, server.ca_file)
    old_pem = tmp_path / "race.pem"
    old_pem.write_bytes(pem(old))
    csr_der = x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(serialization.Encoding.DER)

    results = fire(server, [("simplereenroll", csr_der)] * 20, client_cert=(old_pem, key))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [403] * 19, statuses
    (body,) = [b for s, b in results if s == 200]
    new = certificate_in(body, fmt)
    for status, body in results:
        if status == 403:
            assert f"certificate {serial(old)} is superseded" in body.decode()

    store = store_of(server)
    (device,), records = store_rows(store, "default", cn)
    assert {r.serial: r.status for r in records} == {serial(old): "superseded", serial(new): "valid"}
    assert device.current_serial == serial(new)
