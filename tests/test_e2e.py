"""End to end: the real server (gunicorn, TLS, loopback) driven by curl, openssl and strongSwan pki.

Servers start lazily, once per module, each on its own database with the test
user added through the CLI (SQLite, then PostgreSQL): base64 (64 columns, plus a ``pumps`` label in
DER), base64 on one line (for strongSwan), and DER through both launch paths
(``est-server`` and ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``).
"""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from .conftest import PASSWORD, USER, run_cli
from .e2e_clients import Reply, call, openssl, openssl_csr, openssl_verify, pkcs7_certs, pki, response_format
from .pki import der, make_csr, rsa_key
from .server import RunningServer, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.both_databases]

SERVERS = {
    "base64": {"labels": {"pumps": {"response_format": "der"}}},
    "base64-one-line": {"base64_line_length": 0},
    "der": {"response_format": "der"},
    "der-gunicorn-conf": {"response_format": "der", "use_gunicorn_conf": True},
}
AUTH = ("--user", f"{USER}:{PASSWORD}")
PKCS10 = ("--header", "Content-Type: application/pkcs10")
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"


@pytest.fixture(scope="module")
def servers(pki_dir, tmp_path_factory, new_database):
    """``servers(name)``: the running server configured as ``SERVERS[name]``, started on first use."""
    started: dict[str, RunningServer] = {}

    def get(name: str) -> RunningServer:
        if name not in started:
            workdir = tmp_path_factory.mktemp(name)
            started[name] = server = start_server(
                pki_dir,
                workdir,
                database=new_database(workdir),
                rate_limit={"enabled": False},
                **SERVERS[name],
            )
            result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config)
            assert result.exit_code == 0, result.output
        return started[name]

    yield get
    for server in started.values():
        server.stop()


@pytest.fixture(params=["base64", "der", "der-gunicorn-conf"])
def server(request, servers) -> RunningServer:
    return servers(request.param)


@pytest.fixture
def base64_server(servers) -> RunningServer:
    return servers("base64")


@pytest.fixture(scope="module")
def root(pki_dir) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())


def enroll(server: RunningServer, body: bytes, *curl_args: str, path: str = "simpleenroll") -> Reply:
    return call(server, path, *AUTH, *PKCS10, *curl_args, body=body)



def payload(reply: Reply, fmt: str) -> bytes:
    """The DER in a 200 EST reply, read the way a client of ``fmt`` reads it, after checking its framing."""
    assert reply.status == 200, reply.body
    if fmt == "der":
        assert not reply.has("Content-Transfer-Encoding")
        assert reply.body[:1] == b"\x30"
        return reply.body
    assert reply.headers["Content-Transfer-Encoding"] == "base64"
    lines = reply.body.decode("ascii").splitlines()
    assert len(lines) > 1 and len(lines[0]) == 64 and max(map(len, lines)) == 64
    return openssl("base64", "-d", input=reply.body)  # no -A: it needs the wrapping


def issued(reply: Reply, fmt: str, ca_file) -> x509.Certificate:
    """The one certificate in an enroll reply, checked to verify with `openssl verify` against the CA."""
    assert reply.headers["Content-Type"] == CERTS_ONLY
    (cert,) = pkcs7_certs(payload(reply, fmt))
    assert openssl_verify(cert, ca_file).strip() == b"stdin: OK"
    return cert


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# --- request bodies (CSRs from `openssl req` where the client matters, tests/pki.py elsewhere) ----


def _as_base64(csr: bytes) -> bytes:
    return openssl("base64", input=csr)  # what a shell-scripted gateway sends: 64-column lines


def _as_pem(csr: bytes) -> bytes:
    return openssl("req", "-inform", "DER", "-outform", "PEM", input=csr)


def _good_csr(server) -> bytes:
    return base64.b64encode(der(make_csr("NPPBBB4")))


def _certificate(server) -> bytes:
    return base64.b64encode(der(x509.load_pem_x509_certificate(server.ca_file.read_bytes())))


def _bad_signature(server) -> bytes:
    csr = bytearray(der(make_csr("NPPBBB4")))
    csr[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    return base64.b64encode(bytes(csr))


def _weak_rsa(server) -> bytes:
    return base64.b64encode(der(make_csr("NPPBBB4", key=rsa_key(1024))))


def _padded_good_csr(server) -> bytes:
    return _good_csr(server) + b"\n" * 100_000  # a valid CSR in the first 64 KiB; whitespace the decoder skips after it


# --- cacerts and simpleenroll, base64 and DER, both launch paths ---------------------------------


def test_cacerts_hold_the_self_signed_root(server, root):
    reply = call(server, "cacerts")
    assert reply.headers["Content-Type"] == "application/pkcs7-mime"
    certs = pkcs7_certs(payload(reply, response_format(server)))
    assert [c for c in certs if c.subject == c.issuer] == [root]


@pytest.mark.parametrize(
    "key, encode, headers",
    [
        pytest.param("ec", _as_base64, (), id="ec-base64"),
        pytest.param("ec", _as_base64, ("--header", "Content-Transfer-Encoding: base64"), id="ec-base64-cte"),
        pytest.param("ec", _as_pem, (), id="ec-pem"),
        pytest.param("ec", bytes, (), id="ec-der"),
        pytest.param("rsa:2048", _as_base64, (), id="rsa2048-base64"),
    ],
)
def test_openssl_csr_enrolls(server, key, encode, headers):
    csr = openssl_csr(key, "NPPBBB4")
    cert = issued(enroll(server, encode(csr), *headers), response_format(server), server.ca_file)
    assert common_name(cert) == "NPPBBB4"
    assert cert.public_key() == x509.load_der_x509_csr(csr).public_key()


@pytest.mark.parametrize("name", ["der", "der-gunicorn-conf"])
@pytest.mark.parametrize(
    "path, args, body, status",
    [
        ("cacerts", (), None, 200),
        ("simpleenroll", AUTH + PKCS10, _good_csr, 200),
        ("simpleenroll", AUTH + PKCS10, b"not base64!", 400),
        ("simpleenroll", PKCS10, b"", 401),
        ("nosuch/cacerts", (), None, 404),
    ],
    ids=["cacerts", "enroll", "bad-csr", "no-credentials", "unknown-label"],
)
def test_der_mode_never_sends_content_transfer_encoding(servers, name, path, args, body, status):
    server = servers(name)
    reply = call(server, path, *args, body=body(server) if callable(body) else body)
    assert reply.status == status
    assert not reply.has("Content-Transfer-Encoding")


# --- strongSwan pki ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strongswan_csr() -> bytes:
    key = pki("--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem").stdout
    return pki("--req", "--type", "priv", "--dn", "CN=NPPBBB5", "--outform", "pem", input=key).stdout


def test_strongswan_estca_on_one_line_base64(servers, root, tmp_path):
    server = servers("base64-one-line")
    caout = tmp_path / "cacert.pem"
    # pki appends /.well-known/est/<op> itself: --url is the server's base URL.
    pki("--estca", "--url", server.url, "--cacert", server.ca_file, "--caout", caout, "--outform", "pem")
    assert x509.load_pem_x509_certificates(caout.read_bytes()) == [root]


def test_strongswan_est_on_one_line_base64(servers, strongswan_csr):
    server = servers("base64-one-line")
    out = pki(
        "--est", "--url", server.url, "--cacert", server.ca_file,
        "--userpass", f"{USER}:{PASSWORD}", "--outform", "pem", input=strongswan_csr,
    ).stdout
    (cert,) = x509.load_pem_x509_certificates(out)
    assert openssl_verify(cert, server.ca_file).strip() == b"stdin: OK"
    assert common_name(cert) == "NPPBBB5"
    assert cert.public_key() == x509.load_pem_x509_csr(strongswan_csr).public_key()


@pytest.mark.parametrize("op", ["--estca", "--est"])
def test_strongswan_cannot_read_wrapped_base64(base64_server, strongswan_csr, op, tmp_path):
    """DESIGN.md's interop fact: pki 5.9.8 decodes only unwrapped base64, hence base64_line_length: 0."""
    extra = ("--caout", tmp_path / "cacert.pem") if op == "--estca" else ("--userpass", f"{USER}:{PASSWORD}")
    result = pki(
        op, *extra, "--url", base64_server.url, "--cacert", base64_server.ca_file, "--outform", "pem",
        input=strongswan_csr, check=False,
    )
    assert result.returncode != 0
    assert b"PKCS7 failed" in result.stderr


# --- malformed requests against the live server --------------------------------------------------

REALM = ("WWW-Authenticate", 'Basic realm="')
CHUNKED = ("--header", "Transfer-Encoding: chunked")


def case(id, body, status, phrase, *, path="simpleenroll", args=AUTH + PKCS10, header=None, marks=()):
    """One malformed request: ``body`` is bytes, a function of the server, or None for a GET."""
    return pytest.param(path, args, body, status, phrase, header, id=id, marks=marks)


@pytest.mark.parametrize(
    "path, args, body, status, phrase, header",
    [
        case("no-credentials", _good_csr, 401, "authentication required", args=PKCS10, header=REALM),
        case("wrong-password", _good_csr, 401, "wrong password", args=("--user", f"{USER}:not the password", *PKCS10), header=REALM),
        case("wrong-content-type", _good_csr, 415, "must be application/pkcs10", args=(*AUTH, "--header", "Content-Type: text/plain")),
        case("empty-body", b"", 400, "empty body"),
        case("garbage-base64", b"MIIB%%not*base64!", 400, "not DER, PEM or base64"),
        case("base64-not-asn1", base64.b64encode(b"hello, not ASN.1"), 400, "does not decode to DER"),
        case("certificate-not-csr", _certificate, 400, "not a PKCS#10"),
        case("broken-signature", _bad_signature, 400, "signature does not verify"),
        case("rsa-1024", _weak_rsa, 400, "too weak"),
        case("over-64KiB", _padded_good_csr, 413, "larger than 65536 bytes"),
        case("over-64KiB-chunked", _padded_good_csr, 413, "larger than 65536 bytes", args=AUTH + PKCS10 + CHUNKED),
        case("unknown-label", _good_csr, 404, "unknown EST label 'nosuch'", path="nosuch/simpleenroll"),
        case("get-simpleenroll", None, 405, "Method Not Allowed", args=AUTH, header=("Allow", "POST")),
        case("fullcmc", _good_csr, 501, "fullcmc is not supported", path="fullcmc"),
    ],
)
def test_malformed_request_is_refused_and_server_carries_on(base64_server, path, args, body, status, phrase, header):
    reply = call(base64_server, path, *args, body=body(base64_server) if callable(body) else body)
    message = reply.body.decode()
    assert (reply.status, reply.headers["Content-Type"]) == (status, "text/plain; charset=utf-8"), message
    assert phrase in message and message.endswith("\n") and message.count("\n") == 1
    assert not reply.has("Content-Transfer-Encoding")
    if header:
        name, expected = header
        assert expected in reply.headers[name]
    assert base64_server.alive()
    assert enroll(base64_server, _good_csr(base64_server)).status == 200


# --- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, fmt", [("pumps/", "der"), ("", "base64")], ids=["pumps-label", "no-label"])
def test_label_overrides_response_format(base64_server, prefix, fmt, root):
    (ca,) = pkcs7_certs(payload(call(base64_server, f"{prefix}cacerts"), fmt))
    assert ca == root
    cn = "NPPLBL1" if prefix else "NPPBBB4"  # a device has one label
    csr = base64.b64encode(der(make_csr(cn)))
    cert = issued(enroll(base64_server, csr, path=f"{prefix}simpleenroll"), fmt, base64_server.ca_file)
    assert common_name(cert) == cn
