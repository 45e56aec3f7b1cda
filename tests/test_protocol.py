"""Issue 3 through the Flask test client: RA authorisation, client certificates from
``SSL_CLIENT_CERT`` and from a trusted proxy's header, simplereenroll, serverkeygen,
csrattrs, bootstrap, the device registry and proof-of-possession.

Client certificates reach the app as the WSGI environ key ``SSL_CLIENT_CERT`` (PEM), the
mod_wsgi/uWSGI convention, or as a URL-escaped ``X-SSL-Client-Cert`` header. There is no
TLS socket here, so tls-unique itself is left to the end-to-end tests.
"""

from __future__ import annotations

import base64
import email
import email.policy
import functools
import logging
import sqlite3
import urllib.parse
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID
from pyasn1.codec.der import decoder
from pyasn1_modules import rfc7030

from est_app import create_app
from est_app.auth import fingerprint
from est_app.ca.development import create_root_ca
from est_app.state import state

from .conftest import USER, basic_auth, run_cli
from .pki import der, ec_key, make_csr, pem, rsa_key
from .test_enroll import certs_from

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
SAN = x509.SubjectAlternativeName([x509.DNSName("npp-bbb4.pumps.example")])
OTHER_SAN = x509.SubjectAlternativeName([x509.DNSName("npp-bbb5.pumps.example")])
SAN_POLICY = {"san_types": ["dns"], "san_dns_suffixes": ["pumps.example"]}
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
# Labels for the RA tests; the deployment itself takes [basic, cert] there.
RA_LABELS = {"pumps": {"auth": ["cert"]}, "mixed": {"auth": ["basic", "cert"]}, "other": {"auth": ["cert"]}, "passwords": {"auth": ["basic"]}}


# --- helpers -----------------------------------------------------------------


@pytest.fixture
def make_app(make_app):
    """conftest's, with the DNS subjectAltNames these device CSRs carry allowed deployment-wide (none are by default)."""
    return lambda **overrides: make_app(**{**SAN_POLICY, **overrides})


def cases(table, *extra):
    """pytest params from ``(id, *values)`` rows, then any ready-made ``pytest.param`` (e.g. xfail) rows."""
    return [pytest.param(*row[1:], id=row[0]) for row in table] + list(extra)


def post(client, op: str, csr, *, label: str | None = None, cert: x509.Certificate | None = None, basic: bool | str = False, headers=None, environ=None):
    """POST a DER CSR to ``op``, with Basic credentials (``basic="wrong"``: a wrong password) and/or a client certificate."""
    environ = dict(environ or {})
    if cert is not None:
        environ["SSL_CLIENT_CERT"] = pem(cert).decode()
    path = f"/.well-known/est/{label}/{op}" if label else f"/.well-known/est/{op}"
    credentials = basic_auth(USER, "not the password") if basic == "wrong" else basic_auth() if basic else {}
    headers = {"Content-Type": "application/pkcs10", **credentials, **(headers or {})}
    return client.post(path, data=der(csr), headers=headers, environ_base=environ)


def refused(response, status: int, *phrases: str) -> str:
    """Assert a one-line text/plain refusal with ``status`` holding every phrase; return its text."""
    assert response.status_code == status, response.get_data()
    text = response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert text.count("\n") == 1, text
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Basic realm="EST"'
    for phrase in phrases:
        assert phrase in text, text
    return text


def issued(response) -> x509.Certificate:
    """The one certificate of a 200 certs-only answer."""
    assert response.status_code == 200, response.get_data()
    assert response.headers["Content-Type"] == CERTS_ONLY
    (cert,) = certs_from(response)
    return cert


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def ekus(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def store(app):
    with app.app_context():
        return state().store


def mint(issuer_key, issuer_cert, cn="gateway-ra", *, eku=(CLIENT_AUTH,), valid=(-1, 30), subject=None, san=None):
    """A client certificate signed directly by ``issuer_key``, valid ``valid`` days from now."""
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer_cert.subject)
        .public_key(ec_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=valid[0]))
        .not_valid_after(now + timedelta(days=valid[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def name(cn: str, serial_number: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial_number is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    return x509.Name(attributes)


def device_csr(key, cn: str = "NPPBBB4", san=SAN):
    return make_csr(cn, key=key, extensions=[(san, False)] if san is not None else [])


def enroll_device(client, cn: str = "NPPBBB4", label: str | None = None):
    """Enroll a device with Basic credentials; return its (key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, issued(post(client, "simpleenroll", device_csr(key, cn), label=label, basic=True))


@functools.cache
def cached_rsa_key(bits: int):
    return rsa_key(bits)


def multipart(response) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of each part of a multipart/mixed answer, split exactly at its boundaries."""
    assert response.mimetype == "multipart/mixed"
    body = response.get_data()
    delimiter = b"--" + response.mimetype_params["boundary"].encode()
    closing = delimiter + b"--\r\n"
    assert body.startswith(delimiter + b"\r\n") and body.endswith(closing)
    parts = []
    for chunk in body[len(delimiter) + 2 : -len(closing)].split(b"\r\n" + delimiter + b"\r\n"):
        head, _, content = chunk.partition(b"\r\n\r\n")
        parts.append((dict(line.split(": ", 1) for line in head.decode().split("\r\n")), content.removesuffix(b"\r\n")))
    # A standard MIME parser sees the same parts in the same order.
    message = email.message_from_bytes(b"Content-Type: " + response.headers["Content-Type"].encode() + b"\r\n\r\n" + body, policy=email.policy.HTTP)
    assert [p.get_content_type() for p in message.iter_parts()] == [h["Content-Type"].split(";")[0] for h, _ in parts]
    return parts


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="session")
def ca(pki_dir):
    """This server's CA (key, certificate), as `est init` made it."""
    key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    return key, x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())


@pytest.fixture(scope="session")
def foreign_ca():
    return create_root_ca("Another hospital's CA")


@pytest.fixture(scope="session")
def client_certs(ca, foreign_ca):
    """Client certificates by what is special about them."""
    ca_name = ca[1].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    impostor = create_root_ca(ca_name)  # same name as ours, other key
    return {
        "ra": mint(*ca),
        "foreign": mint(*foreign_ca),
        "impostor": mint(*impostor),
        "expired": mint(*ca, valid=(-60, -1)),
        "not yet valid": mint(*ca, valid=(1, 30)),
        "serverAuth only": mint(*ca, eku=(SERVER_AUTH,)),
        "no EKU": mint(*ca, eku=()),
    }


@pytest.fixture
def cli(tmp_path):
    """Run an `est` command against the configuration make_app wrote; it must succeed."""

    def run(*args: str) -> str:
        result = run_cli(*args, config=tmp_path / "config.yaml")
        assert result.exit_code == 0, result.output
        return result.output

    return run


@pytest.fixture
def register_ra(cli, tmp_path):
    """`est ra add CERT --label L ...` for a certificate object."""

    def register(cert: x509.Certificate, *labels: str) -> str:
        path = tmp_path / f"ra-{fingerprint(cert)[:16]}.pem"
        path.write_bytes(pem(cert))
        return cli("ra", "add", str(path), *[arg for label in labels for arg in ("--label", label)])

    return register


# --- 1. RA authorisation -------------------------------------------------------

# (id, certificate presented, labels it is registered for, label used, Basic?, status, requester kind or phrase)
RA_CASES = [
    ("registered RA on a cert-only label", "ra", ["pumps"], "pumps", False, 200, "ra"),
    ("registered RA on a basic+cert label", "ra", ["mixed"], "mixed", False, 200, "ra"),
    ("registered RA on the unlabelled path", "ra", ["default"], None, False, 200, "ra"),
    ("RA registered for several labels", "ra", ["other", "pumps"], "pumps", False, 200, "ra"),
    ("Basic user on a basic+cert label", None, [], "mixed", True, 200, "user"),
    ("unregistered certificate plus Basic on a basic+cert label", "ra", [], "mixed", True, 200, "user"),
    ("RA registered for another label", "ra", ["other"], "pumps", False, 403, "is not registered for label 'pumps'"),
    ("trusted but unregistered certificate", "ra", [], "pumps", False, 403, "not registered as an RA"),
    ("Basic credentials on a cert-only label", None, [], "pumps", True, 403, "does not accept passwords"),
    ("no credentials on a cert-only label", None, [], "pumps", False, 401, "authentication required"),
    ("RA certificate on a basic-only label", "ra", ["passwords"], "passwords", False, 401, "does not accept client certificates"),
    ("wrong password on a cert-only label", None, [], "pumps", "wrong", 403, "does not accept passwords"),
    ("certificate from another CA", "foreign", ["pumps"], "pumps", False, 401, "not issued by a CA this server trusts"),
    ("expired certificate", "expired", ["pumps"], "pumps", False, 401, "expired"),
    ("not yet valid certificate", "not yet valid", ["pumps"], "pumps", False, 401, "not yet valid"),
    ("serverAuth-only certificate", "serverAuth only", ["pumps"], "pumps", False, 401, "lacks the clientAuth"),
    ("certificate without EKU", "no EKU", ["pumps"], "pumps", False, 401, "lacks the clientAuth"),
    ("another CA with this CA's name", "impostor", [], "pumps", False, 401, "not issued by a CA this server trusts"),
    ("untrusted certificate plus good Basic on a basic+cert label", "foreign", [], "mixed", True, 200, "user"),
    ("expired certificate plus good Basic on a basic+cert label", "expired", [], "mixed", True, 200, "user"),
    ("untrusted certificate plus good Basic on a cert-only label", "foreign", [], "pumps", True, 401, "not issued by a CA this server trusts"),
]


@pytest.mark.parametrize("presented, registered_for, label, with_basic, status, outcome", cases(RA_CASES))
def test_ra_authorisation(make_app, register_ra, client_certs, presented, registered_for, label, with_basic, status, outcome):
    app = make_app(auth=["basic", "cert"], labels=RA_LABELS)
    cert = client_certs[presented] if presented else None
    if registered_for:  # straight into the store, as if registered while still good: only the certificate's flaw refuses it
        store(app).add_ra(fingerprint(cert), cert.subject.rfc4514_string(), list(registered_for))
    response = post(app.test_client(), "simpleenroll", make_csr("NPPBBB4"), label=label, cert=cert, basic=with_basic)
    if status == 200:
        record = store(app).get_certificate(serial(issued(response)))
        assert record.requester == (f"ra:{fingerprint(cert)}" if outcome == "ra" else f"user:{USER}")
        assert record.label == (label or "default")
    else:
        refused(response, status, outcome)
        assert store(app).count_certificates() == 0


def test_ra_remove_and_reregistration_take_effect_on_the_next_request(make_app, register_ra, cli, client_certs):
    app = make_app(labels=RA_LABELS)
    client = app.test_client()
    ra = client_certs["ra"]
    assert "on labels: pumps" in register_ra(ra, "pumps")
    issued(post(client, "simpleenroll", make_csr(), label="pumps", cert=ra))

    register_ra(ra, "other")  # re-registration replaces the labels
    refused(post(client, "simpleenroll", make_csr(), label="pumps", cert=ra), 403, "not registered for label 'pumps'")
    issued(post(client, "simpleenroll", make_csr("NPPBBB5"), label="other", cert=ra))  # another device: one label each

    assert "removed RA" in cli("ra", "remove", fingerprint(ra))
    refused(post(client, "simpleenroll", make_csr(), label="other", cert=ra), 403, "not registered as an RA")
    assert store(app).list_ras() == []


def test_ra_from_a_client_ca_file_anchor_is_trusted_for_enrollment(make_app, register_ra, foreign_ca, tmp_path):
    anchor = tmp_path / "client-ca.pem"
    anchor.write_bytes(pem(foreign_ca[1]))
    app = make_app(tls={"client_ca_file": str(anchor)}, labels=RA_LABELS)
    ra = mint(*foreign_ca)
    register_ra(ra, "pumps")
    record = store(app).get_certificate(serial(issued(post(app.test_client(), "simpleenroll", make_csr(), label="pumps", cert=ra))))
    assert record.requester == f"ra:{fingerprint(ra)}"


# --- 2. the proxy header ---------------------------------------------------------


# (id, REMOTE_ADDR, header value: "pem" for the RA's URL-escaped PEM, status, phrase)
PROXY_CASES = [
    ("IPv4 proxy in a trusted network", "127.0.0.1", "pem", 200, None),
    ("IPv6 proxy trusted by address", "::1", "pem", 200, None),
    ("untrusted address", "10.1.2.3", "pem", 401, "authentication required"),
    ("empty header from a trusted proxy (no client certificate)", "127.0.0.1", "", 401, "authentication required"),
    ("garbage from a trusted proxy", "127.0.0.1", "not%20a%20certificate", 400, "not a valid X.509 certificate"),
]


@pytest.mark.parametrize(
    "remote_addr, value, status, phrase",
    cases(PROXY_CASES, pytest.param("::ffff:127.0.0.1", "pem", 200, None, id="IPv4-mapped address of a trusted IPv4 proxy")),
)
def test_proxy_header_is_believed_only_from_trusted_proxies(make_app, register_ra, client_certs, caplog, remote_addr, value, status, phrase):
    app = make_app(labels=RA_LABELS, trusted_proxies=["127.0.0.0/8", "::1"])
    ra = client_certs["ra"]
    register_ra(ra, "pumps")
    header = urllib.parse.quote(pem(ra).decode()) if value == "pem" else value
    headers = {"X-SSL-Client-Cert": header, "X-Forwarded-For": "192.0.2.7"}
    with caplog.at_level(logging.WARNING):
        response = post(app.test_client(), "simpleenroll", make_csr(), label="pumps", headers=headers, environ={"REMOTE_ADDR": remote_addr})
    if status == 200:
        assert store(app).get_certificate(serial(issued(response))).requester == f"ra:{fingerprint(ra)}"
        (device,) = store(app).find_devices()
        assert device.client_address == "192.0.2.7"  # the client behind the trusted proxy
    else:
        refused(response, status, phrase)
    ignored = f"ignored X-SSL-Client-Cert header from untrusted address {remote_addr}"
    assert (ignored in caplog.text) == (remote_addr == "10.1.2.3")


def test_proxy_header_name_is_configurable(make_app, register_ra, client_certs):
    app = make_app(labels=RA_LABELS, trusted_proxies=["127.0.0.1"], client_cert_header="X-Client-Cert")
    ra = client_certs["ra"]
    register_ra(ra, "pumps")
    escaped = urllib.parse.quote(pem(ra).decode())
    client = app.test_client()
    refused(post(client, "simpleenroll", make_csr(), label="pumps", headers={"X-SSL-Client-Cert": escaped}), 401, "authentication required")
    issued(post(client, "simpleenroll", make_csr(), label="pumps", headers={"X-Client-Cert": escaped}))


# --- 3. simplereenroll -------------------------------------------------------------


@pytest.mark.parametrize("rekey", [False, True], ids=["renew with the same key", "rekey with a new key"])
@pytest.mark.both_databases
def test_reenroll_supersedes_the_old_certificate(make_app, rekey):
    app = make_app()
    client = app.test_client()
    key, old = enroll_device(client)
    new_key = ec.generate_private_key(ec.SECP256R1()) if rekey else key
    new = issued(post(client, "simplereenroll", device_csr(new_key), cert=old))
    assert spki(new.public_key()) == spki(new_key.public_key())
    assert new.subject == old.subject and new.serial_number != old.serial_number
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == SAN

    s = store(app)
    (device,) = s.find_devices()
    assert device.current_serial == serial(new)
    assert [(c.serial, c.status) for c in s.device_certificates(device.id)] == [(serial(old), "superseded"), (serial(new), "valid")]
    record = s.get_certificate(serial(new))
    assert (record.operation, record.requester) == ("simplereenroll", f"device:{serial(old)}")

    # and the new certificate re-enrolls in its turn
    newest = issued(post(client, "simplereenroll", device_csr(new_key), cert=new))
    assert s.get_device(device.id).current_serial == serial(newest)
    assert s.get_certificate(serial(new)).status == "superseded"


def _revoke(d):
    db = sqlite3.connect(d.db)
    with db:  # the revoke command comes later; the store's own column for now
        db.execute("UPDATE certificates SET status = 'revoked' WHERE serial = ?", (serial(d.cert),))
    db.close()
    return d.cert, device_csr(d.key)


def _supersede(d):
    issued(post(d.client, "simplereenroll", device_csr(d.key), cert=d.cert))
    return d.cert, device_csr(d.key)


# (id, prepare(device) -> (certificate presented, CSR), status, phrases)
REENROLL_REFUSALS = [
    ("no client certificate", lambda d: (None, device_csr(d.key)), 401, ["needs the current certificate"]),
    ("certificate from another CA", lambda d: (mint(*d.foreign_ca, subject=d.cert.subject, san=SAN), device_csr(d.key)), 401, ["not issued by a CA this server trusts"]),
    ("expired certificate", lambda d: (mint(*d.ca, subject=d.cert.subject, san=SAN, valid=(-400, -35)), device_csr(d.key)), 401, ["expired"]),
    ("revoked certificate", _revoke, 401, ["revoked"]),
    ("superseded certificate", _supersede, 403, ["is superseded", "current certificate"]),
    ("certificate this CA signed but never recorded", lambda d: (mint(*d.ca, subject=d.cert.subject, san=SAN), device_csr(d.key)), 403, ["outside this server's records"]),
    ("changed subject", lambda d: (d.cert, device_csr(d.key, cn="NPPBBB5")), 403, ["'CN=NPPBBB5'", "'CN=NPPBBB4'"]),
    ("changed SAN", lambda d: (d.cert, device_csr(d.key, san=OTHER_SAN)), 403, ["subjectAltName differs"]),
    ("SAN dropped", lambda d: (d.cert, device_csr(d.key, san=None)), 403, ["subjectAltName differs"]),
]


def _same_name_ca(d):
    ca_name = d.ca[1].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return mint(*create_root_ca(ca_name), subject=d.cert.subject, san=SAN), device_csr(d.key)


@pytest.mark.parametrize(
    "prepare, status, phrases",
    cases(REENROLL_REFUSALS, pytest.param(_same_name_ca, 401, ["not issued by a CA this server trusts"], id="certificate from another CA of this CA's name")),
)
def test_reenroll_refusals(make_app, tmp_path, ca, foreign_ca, prepare, status, phrases):
    app = make_app()
    client = app.test_client()
    key, cert = enroll_device(client)
    presented, csr = prepare(SimpleNamespace(client=client, key=key, cert=cert, ca=ca, foreign_ca=foreign_ca, db=tmp_path / "est.db"))
    s = store(app)
    (device,) = s.find_devices()
    before = (s.count_certificates(), device.current_serial)
    refused(post(client, "simplereenroll", csr, cert=presented), status, *phrases)
    assert (s.count_certificates(), s.get_device(device.id).current_serial) == before


def test_reenroll_refuses_a_device_certificate_from_a_client_ca_file_anchor(make_app, foreign_ca, tmp_path):
    anchor = tmp_path / "client-ca.pem"
    anchor.write_bytes(pem(foreign_ca[1]))
    app = make_app(tls={"client_ca_file": str(anchor)})
    presented = mint(*foreign_ca, subject=name("NPPBBB4"), san=SAN)
    refused(post(app.test_client(), "simplereenroll", device_csr(ec_key()), cert=presented), 401, "was not issued by this CA")


@pytest.mark.both_databases
def test_reenroll_keeps_the_profile_of_the_label_the_certificate_was_issued_on(make_app):
    # Any path will do (strongSwan cannot reach labelled ones), but only the response encoding is the path's.
    app = make_app(labels={"servers": {"auth": ["cert"], "extended_key_usage": ["serverAuth", "clientAuth"], "response_format": "der"}})
    client = app.test_client()
    key, old = enroll_device(client)
    response = post(client, "simplereenroll", device_csr(key), label="servers", cert=old)
    assert "Content-Transfer-Encoding" not in response.headers
    new = issued(response)
    assert ekus(new) == [CLIENT_AUTH]
    s = store(app)
    (device,) = s.find_devices()
    assert (device.label, device.current_serial, s.get_certificate(serial(new)).label) == ("default", serial(new), "default")


def test_reenroll_refuses_a_certificate_of_a_label_no_longer_served(make_app, make_config):
    app = make_app(labels={"pumps": {}})
    key, old = enroll_device(app.test_client(), label="pumps")
    without_pumps = create_app(make_config())  # same database
    refused(post(without_pumps.test_client(), "simplereenroll", device_csr(key), cert=old), 403, "label 'pumps', which this server no longer serves")


# --- 4. serverkeygen -----------------------------------------------------------------

KEY_TYPES = [
    ("EC P-256", lambda: ec_key(), lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp256r1"),
    ("RSA 3072", lambda: cached_rsa_key(3072), lambda k: isinstance(k, rsa.RSAPrivateKey) and k.key_size == 3072),
]


def serverkeygen_parts(response) -> list[tuple[dict[str, str], bytes, bytes]]:
    """(headers, body as sent, DER) of a serverkeygen answer's two parts: the PKCS#8 key, then the certs-only."""
    assert response.status_code == 200, response.get_data()
    parts = multipart(response)
    assert [headers["Content-Type"] for headers, _ in parts] == ["application/pkcs8", CERTS_ONLY]
    return [(h, body, base64.b64decode(body) if h.get("Content-Transfer-Encoding") == "base64" else body) for h, body in parts]


@pytest.mark.parametrize("response_format", ["base64", "der"])
@pytest.mark.parametrize("csr_key, is_expected_type", cases(KEY_TYPES))
def test_serverkeygen_returns_a_fresh_key_then_its_certificate(make_app, response_format, csr_key, is_expected_type):
    app = make_app(response_format=response_format)
    request_key = csr_key()
    response = post(app.test_client(), "serverkeygen", make_csr("NPPBBB4", key=request_key), basic=True)
    parts = serverkeygen_parts(response)
    assert "Content-Transfer-Encoding" not in response.headers
    for headers, body, _ in parts:
        if response_format == "base64":
            assert headers["Content-Transfer-Encoding"] == "base64"
            assert max(len(line) for line in body.split(b"\n")) <= 64
        else:
            assert "Content-Transfer-Encoding" not in headers and body[:1] == b"\x30"
    (_, _, key_der), (_, _, certs_der) = parts

    key = serialization.load_der_private_key(key_der, None)
    (cert,) = pkcs7.load_der_pkcs7_certificates(certs_der)
    assert is_expected_type(key)
    assert spki(cert.public_key()) == spki(key.public_key()) != spki(request_key.public_key())
    s = store(app)
    (device,) = s.find_devices()
    assert device.current_serial == serial(cert) and s.get_certificate(serial(cert)).operation == "serverkeygen"


# (id, label settings, CSR key, Basic?, status, phrases)
SERVERKEYGEN_REFUSALS = [
    ("RSA 4096 is outside the catalogue", {}, lambda: cached_rsa_key(4096), True, 400, ["rsa-4096 is not allowed", "ec-p256, rsa-2048, rsa-3072"]),
    ("P-256 on a P-384-only label", {"serverkeygen_key_types": ["ec-p384"]}, lambda: ec_key(), True, 400, ["ec-p256 is not allowed", "use a CSR key of: ec-p384"]),
    ("no credentials", {}, lambda: ec_key(), False, 401, ["authentication required"]),
]


@pytest.mark.parametrize("label_settings, csr_key, with_basic, status, phrases", cases(SERVERKEYGEN_REFUSALS))
def test_serverkeygen_refusals(make_app, label_settings, csr_key, with_basic, status, phrases):
    app = make_app(labels={"keys": label_settings} if label_settings else {})
    response = post(app.test_client(), "serverkeygen", make_csr(key=csr_key()), label="keys" if label_settings else None, basic=with_basic)
    refused(response, status, *phrases)
    assert store(app).count_certificates() == 0


def test_serverkeygen_private_key_is_never_stored_or_logged(make_app, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app()
    (_, _, key_der), (_, _, certs_der) = serverkeygen_parts(post(app.test_client(), "serverkeygen", make_csr(), basic=True))
    key = serialization.load_der_private_key(key_der, None)
    (cert,) = pkcs7.load_der_pkcs7_certificates(certs_der)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    key_forms = [key_der, base64.b64encode(key_der), scalar, scalar.hex().encode()]

    db = sqlite3.connect(tmp_path / "est.db")
    values = []
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in db.execute(f'SELECT * FROM "{table}"'):
            values += [v if isinstance(v, bytes) else str(v).encode() for v in row]
    db.close()
    values += [f.read_bytes() for f in tmp_path.glob("est.db*")]  # the files too, write-ahead log included
    assert any(der(cert) in v for v in values)  # the scan does see what is stored
    assert not [form for form in key_forms if any(form in v for v in values)]
    assert not [form for form in key_forms if form.decode("latin-1") in caplog.text]


# --- 5. csrattrs ---------------------------------------------------------------------

ATTRIBUTE_OIDS = ["1.2.840.113549.1.9.7", "1.3.6.1.1.1.1.22", "1.2.3.4"]  # challengePassword, macAddress, 1.2.3.4


@pytest.mark.parametrize("response_format", ["base64", "der"])
def test_csrattrs_lists_the_label_attributes(make_app, response_format):
    app = make_app(response_format=response_format, labels={"pumps": {"csr_attributes": ["challengePassword", "macAddress", "1.2.3.4"]}, "plain": {}})
    client = app.test_client()
    response = client.get("/.well-known/est/pumps/csrattrs")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/csrattrs"
    body = response.get_data()
    if response_format == "base64":
        assert response.headers["Content-Transfer-Encoding"] == "base64"
        body = base64.b64decode(body)
    else:
        assert "Content-Transfer-Encoding" not in response.headers
    attributes, rest = decoder.decode(body, asn1Spec=rfc7030.CsrAttrs())
    assert rest == b""
    assert [entry.getName() for entry in attributes] == ["oid"] * 3
    assert [str(entry["oid"]) for entry in attributes] == ATTRIBUTE_OIDS

    for path in ("/.well-known/est/plain/csrattrs", "/.well-known/est/csrattrs"):
        empty = client.get(path)
        assert empty.status_code == 204 and empty.get_data() == b""


REQUIRED_ATTRIBUTES = {"csr_attributes": ["challengePassword", "macAddress", "serialNumber", "2.5.29.17"], "require_csr_attributes": True}


def attributes_csr(*, leave_out: str | None = None, cn: str = "NPPBBB4"):
    """A CSR carrying a challengePassword and a macAddress attribute, a subject serialNumber and a requested SAN."""
    key = ec_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(name(cn, None if leave_out == "serialNumber" else "SN-0004"))
    if leave_out != "challengePassword":
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"enrolment secret")
    if leave_out != "macAddress":
        builder = builder.add_attribute(x509.ObjectIdentifier("1.3.6.1.1.1.1.22"), b"00:1b:63:84:45:e6")
    if leave_out != "SAN":
        builder = builder.add_extension(SAN, critical=False)
    return builder.sign(key, hashes.SHA256())


# (id, what the CSR leaves out, status, phrase)
REQUIRED_CASES = [
    ("all present", None, 200, None),
    ("no challengePassword attribute", "challengePassword", 400, "lacks the required attribute challengePassword (1.2.840.113549.1.9.7)"),
    ("no macAddress attribute", "macAddress", 400, "lacks the required attribute macAddress (1.3.6.1.1.1.1.22)"),
    ("no subject serialNumber", "serialNumber", 400, "lacks the required attribute serialNumber (2.5.4.5)"),
    ("no requested SAN extension", "SAN", 400, "lacks the required attribute 2.5.29.17"),
]


@pytest.mark.parametrize("leave_out, status, phrase", cases(REQUIRED_CASES))
def test_required_csr_attributes(make_app, leave_out, status, phrase):
    app = make_app(labels={"strict": REQUIRED_ATTRIBUTES, "lenient": {**REQUIRED_ATTRIBUTES, "require_csr_attributes": False}})
    client = app.test_client()
    csr = attributes_csr(leave_out=leave_out)
    response = post(client, "simpleenroll", csr, label="strict", basic=True)
    if status == 200:
        issued(response)
    else:
        refused(response, status, phrase)
    lenient = attributes_csr(leave_out=leave_out, cn="NPPBBB5")  # another device: a device has one label
    issued(post(client, "simpleenroll", lenient, label="lenient", basic=True))  # advertised, not required


# --- 6. bootstrap ----------------------------------------------------------------------


def test_bootstrap_is_not_found_unless_enabled(client):
    refused(post(client, "bootstrap", make_csr(), basic=True), 404, "bootstrap is not enabled")


def test_bootstrap_issues_a_short_lived_client_certificate_once_per_device(make_app, cli):
    app = make_app(bootstrap_enabled=True, ca={"extended_key_usage": ["serverAuth", "clientAuth"]})
    client = app.test_client()
    s = store(app)
    refused(post(client, "bootstrap", make_csr("NPPBBB4")), 401, "authentication required")

    first = issued(post(client, "bootstrap", make_csr("NPPBBB4"), basic=True))
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=10)
    assert ekus(first) == [CLIENT_AUTH]  # whatever the profile says
    record = s.get_certificate(serial(first))
    assert (record.operation, record.requester, record.status) == ("bootstrap", f"user:{USER}", "valid")

    (device,) = s.find_devices()
    refused(post(client, "bootstrap", make_csr("NPPBBB4"), basic=True), 409, f"(number {device.id})", f"est-admin device delete {device.id}")
    assert s.count_certificates() == 1

    cli("device", "delete", str(device.id))
    second = issued(post(client, "bootstrap", make_csr("NPPBBB4"), basic=True))
    (again,) = s.find_devices()
    assert again.current_serial == serial(second) and again.first_enrolled > device.first_enrolled
    assert s.get_certificate(serial(first)).device_id is None


def test_bootstrap_takes_basic_only_even_where_ra_certificates_are_accepted(make_app, register_ra, client_certs):
    app = make_app(bootstrap_enabled=True, auth=["basic", "cert"])
    register_ra(client_certs["ra"], "default")
    client = app.test_client()
    issued(post(client, "simpleenroll", make_csr("NPPBBB4"), cert=client_certs["ra"]))
    refused(post(client, "bootstrap", make_csr("NPPBBB5"), cert=client_certs["ra"]), 401, "send HTTP Basic credentials")
    issued(post(client, "bootstrap", make_csr("NPPBBB5"), basic=True))


# (id, label settings, status, phrase simpleenroll gives a Basic user there)
BOOTSTRAP_BYPASSES = [
    ("label taking RA certificates only", {"auth": ["cert"]}, 403, "does not accept passwords"),
    ("label requiring proof-of-possession", {"require_pop": True}, 401, "requires proof-of-possession"),
]


@pytest.mark.parametrize("label_settings, status, phrase", cases(BOOTSTRAP_BYPASSES))
def test_bootstrap_honours_the_label_enrollment_policy(make_app, label_settings, status, phrase):
    client = make_app(bootstrap_enabled=True, labels={"pumps": label_settings}).test_client()
    refused(post(client, "simpleenroll", make_csr(), label="pumps", basic=True), status, phrase)
    refused(post(client, "bootstrap", make_csr(), label="pumps", basic=True), status, phrase)


# --- 7. the device registry -------------------------------------------------------------


@pytest.mark.both_databases
def test_default_policy_renews_the_device(make_app):
    app = make_app()
    client = app.test_client()
    first = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), basic=True))
    second = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), basic=True))
    s = store(app)
    (device,) = s.find_devices()
    assert (device.label, device.device_key, device.current_serial) == ("default", "NPPBBB4", serial(second))
    assert [(c.serial, c.status) for c in s.device_certificates(device.id)] == [(serial(first), "superseded"), (serial(second), "valid")]


@pytest.mark.both_databases
def test_reject_policy_refuses_a_second_enrollment(make_app):
    app = make_app(labels={"strict": {"duplicate_policy": "reject"}})
    client = app.test_client()
    first = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="strict", basic=True))
    (device,) = store(app).find_devices()
    refused(post(client, "simpleenroll", make_csr("NPPBBB4"), label="strict", basic=True), 409, "already enrolled on label 'strict'", f"est-admin device delete {device.id}")
    assert store(app).count_certificates() == 1
    assert store(app).get_certificate(serial(first)).status == "valid"


# (device_id, first CSR, second CSR of the same device, expected device key, CSR lacking the id, phrase)
DEVICE_ID_CASES = [
    ("serialNumber", make_csr(name=name("pump-a", "SN-0001")), make_csr(name=name("pump-b", "SN-0001")), "SN-0001", make_csr("pump-a"), "subject serialNumber attribute"),
    ("san", make_csr("pump-a", extensions=[(SAN, False)]), make_csr("pump-b", extensions=[(SAN, False)]), "npp-bbb4.pumps.example", make_csr("pump-a"), "subjectAltName"),
]


@pytest.mark.parametrize("device_id, first_csr, second_csr, key, lacking, phrase", DEVICE_ID_CASES, ids=[c[0] for c in DEVICE_ID_CASES])
def test_device_id_setting(make_app, device_id, first_csr, second_csr, key, lacking, phrase):
    app = make_app(labels={"pumps": {"device_id": device_id}})
    client = app.test_client()
    issued(post(client, "simpleenroll", first_csr, label="pumps", basic=True))
    second = issued(post(client, "simpleenroll", second_csr, label="pumps", basic=True))
    (device,) = store(app).find_devices()
    assert (device.device_key, device.current_serial) == (key, serial(second))
    refused(post(client, "simpleenroll", lacking, label="pumps", basic=True), 400, phrase)
    # a different id is a different device, whatever the CN
    issued(post(client, "simpleenroll", make_csr(name=name("pump-a", "SN-0002"), extensions=[(OTHER_SAN, False)]), label="pumps", basic=True))
    assert len(store(app).find_devices()) == 2


def test_device_cli_list_show_delete(make_app, cli, tmp_path):
    app = make_app(labels={"pumps": {}})
    client = app.test_client()
    old = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="pumps", basic=True))
    current = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="pumps", basic=True))
    other = issued(post(client, "simpleenroll", make_csr("NPPCCC7"), label="pumps", basic=True))
    issued(post(client, "simpleenroll", make_csr("NPPBBB9"), basic=True))
    s = store(app)
    pump = next(d for d in s.find_devices(label="pumps") if d.device_key == "NPPBBB4")

    listed = cli("device", "list", "--label", "pumps").splitlines()
    assert [line.split("\t")[1:4] for line in listed] == [["pumps", "NPPCCC7", serial(other)], ["pumps", "NPPBBB4", serial(current)]]  # newest first
    searched = cli("device", "list", "--search", "BBB").splitlines()
    assert sorted(line.split("\t")[1] for line in searched) == ["default", "pumps"]

    shown = cli("device", "show", str(pump.id))
    assert f"device NPPBBB4 (number {pump.id}) on label pumps" in shown and f"requester user:{USER}" in shown
    assert f"{serial(old)}\tsuperseded\tsimpleenroll" in shown
    assert f"{serial(current)}\tvalid (current)\tsimpleenroll" in shown

    assert f"deleted device NPPBBB4 (number {pump.id}, label pumps)" in cli("device", "delete", str(pump.id))
    assert [line.split("\t")[2] for line in cli("device", "list", "--label", "pumps").splitlines()] == ["NPPCCC7"]
    assert (s.get_certificate(serial(current)).status, s.get_certificate(serial(current)).device_id) == ("revoked", None)
    for args in (("device", "show", str(pump.id)), ("device", "delete", str(pump.id))):
        result = run_cli(*args, config=tmp_path / "config.yaml")
        assert result.exit_code != 0 and f"no device number {pump.id}" in result.output


# --- 8. proof of possession ---------------------------------------------------------------


def test_require_pop_refuses_users_without_a_tls_session_but_exempts_ras(make_app, register_ra, client_certs):
    app = make_app(labels={"pop": {"require_pop": True, "auth": ["basic", "cert"]}})
    client = app.test_client()
    ra = client_certs["ra"]
    for op in ("simpleenroll", "serverkeygen"):
        refused(post(client, op, make_csr(), label="pop", basic=True), 401, "requires proof-of-possession")
    assert store(app).count_certificates() == 0

    register_ra(ra, "pop")
    key = ec.generate_private_key(ec.SECP256R1())
    device_cert = issued(post(client, "simpleenroll", device_csr(key), label="pop", cert=ra))
    serverkeygen_parts(post(client, "serverkeygen", make_csr("NPPCCC7"), label="pop", cert=ra))
    # the device itself is not exempt when it re-enrolls on the label
    refused(post(client, "simplereenroll", device_csr(key), label="pop", cert=device_cert), 401, "requires proof-of-possession")
    # and labels without require_pop are unaffected
    issued(post(client, "simpleenroll", make_csr("NPPDDD1"), basic=True))
    assert store(app).count_certificates() == 3
