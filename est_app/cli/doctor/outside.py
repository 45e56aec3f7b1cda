"""Outside checks: a real TLS connection to the bind address, each label's ``cacerts`` read the way
each known client reads it, and each label's enrollment answer.

Enrollment answers are not requested (nothing is enrolled): they are rendered by
the server's own code from the label's settings, for a stand-in pump certificate
signed by a throwaway key of the label's CA's type, and read the same way.
"""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from gunicorn.util import parse_address

from ...ca import CertificateAuthority
from ...ca.signers import FileSigner
from ...config import Settings
from ...encoding import CERTS_ONLY, CTE, ESTResponse, decode_body
from ...errors import BadRequest
from ...profiles import EnrollmentProfile
from .bodies import CLIENTS, body_form, report_readers, unreadable
from .certificates import CheckedCA
from .report import Report, count, one_line, shown

# Per connection attempt and per answer: generous for a loaded host, and still an answer in bounded time.
TIMEOUT = 30


def connect_to_server(report: Report, settings: Settings, tls_certificate: Optional[x509.Certificate], tls_ca: Optional[Path]) -> Optional[http.client.HTTPConnection]:
    """A connection to the bind address (TLS verified against the CA chain, or ``tls_ca``); None when nothing answers."""
    address = parse_address(settings.server.bind)
    if not isinstance(address, tuple):
        report.warn("server", f"bind {settings.server.bind} is not a TCP address; not checked from the outside", "check it through the proxy in front")
        return None
    host, port = address
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if settings.tls.cert_file is None:
        return _connect(report, http.client.HTTPConnection(target, port, timeout=TIMEOUT), "")
    anchors = [tls_ca] if tls_ca else [p for p in (settings.ca.cert_file, settings.ca.chain_file) if p]
    context = ssl.create_default_context()
    context.check_hostname = False  # the names are checked from the file, one line each
    for anchor in anchors:
        context.load_verify_locations(cafile=str(anchor))
    try:
        connection = _connect(report, http.client.HTTPSConnection(target, port, timeout=TIMEOUT, context=context), " over TLS, its certificate verified")
    except ssl.SSLCertVerificationError as exc:
        report.fail(
            "server", f"its TLS certificate does not verify against {', '.join(map(str, anchors))}: {exc.verify_message}",
            "clients trusting that root refuse it: renew or reissue tls.cert_file (or pass --tls-ca with the root gateways trust)",
        )
        context.verify_mode = ssl.CERT_NONE  # go on, to read what the labels answer
        connection = _connect(report, http.client.HTTPSConnection(target, port, timeout=TIMEOUT, context=context), " over TLS, without verifying its certificate")
    if connection is not None:
        served = x509.load_der_x509_certificate(connection.sock.getpeercert(binary_form=True))
        if tls_certificate is not None and served != tls_certificate:
            report.warn("server", f"serves another TLS certificate ({shown(served.subject.rfc4514_string())}) than {settings.tls.cert_file}", "restart est to load the new files")
    return connection


def _connect(report: Report, connection: http.client.HTTPConnection, how: str) -> Optional[http.client.HTTPConnection]:
    """Connect (and shake hands); a refusal or a failed handshake is a FAIL line. Certificate failures propagate."""
    where = f"{connection.host}:{connection.port}"
    try:
        connection.connect()
    except ssl.SSLCertVerificationError:
        raise
    except ssl.SSLError as exc:
        report.fail("server", f"TLS handshake with {where} failed: {exc.reason or exc}", "check tls.* and the server's log (journalctl -u est)")
        return None
    except OSError as exc:
        report.fail("server", f"nothing answers on {where} ({exc.strerror or exc})", "start est-server (systemctl start est; journalctl -u est)")
        return None
    report.ok("server", f"answers on {where}{how}")
    return connection


def check_cacerts(report: Report, connection: http.client.HTTPConnection, profile: EnrollmentProfile, ca: CheckedCA, required: tuple[str, ...]) -> None:
    """GET the label's cacerts: its form, who reads it, and whether it is the chain of the CA that issues there."""
    subject = f"label {profile.name}"
    path = "/.well-known/est/" + (f"{profile.label}/" if profile.label else "") + "cacerts"
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        body, headers = reply.read(), dict(reply.getheaders())
    except (OSError, http.client.HTTPException) as exc:
        report.fail(subject, f"GET {path} failed: {exc}", "see the server's log (journalctl -u est)")
        return
    finally:
        connection.close()  # the next label's request connects afresh: no keep-alive timeout can close it meanwhile
    if reply.status != 200:
        todo = "restart est: it runs with an older configuration" if reply.status == 404 else "see the server's log (journalctl -u est)"
        report.fail(subject, f"GET {path} answered {reply.status}: {shown(one_line(body.decode('utf-8', 'replace')))}", todo)
        return
    if "Content-Length" not in headers:
        report.fail(subject, f"GET {path}: no Content-Length header (libest needs it)", "serve with est-server, not behind a proxy that chunks")
    try:
        certificates = pkcs7.load_der_pkcs7_certificates(decode_body(body, "PKCS#7"))
    except (BadRequest, ValueError):
        report.fail(subject, f"cacerts is not a certs-only PKCS#7 in DER or base64 ({len(body)} bytes)", "see the server's log (journalctl -u est)")
        return
    if ca.chain and not set(ca.chain) <= set(certificates):  # after a rollover it holds the retired CAs and links too
        report.warn(subject, f"cacerts differs from the chain of {ca.where}", "restart est to load the new CA files")
    root = any(c.issuer == c.subject for c in certificates)
    if not root:
        report.fail(subject, "cacerts lacks the self-signed root: libest refuses it", f"put the root in {ca.where}.chain_file")
    form, cte = body_form(body), headers.get(CTE, "").lower() == "base64"
    verdicts = {c: unreadable(c, form, cte, len(certificates), root, enrollment=False) for c in CLIENTS}
    what = f"cacerts is {form}, {'with' if cte else 'without'} {CTE}, {count(len(certificates), 'certificate')}"
    report_readers(report, subject, what, verdicts, required)


def stand_in_for(ca: CheckedCA) -> Optional[CertificateAuthority]:
    """A CA with ``ca``'s chain, settings and key type and a throwaway key; None when ``ca`` cannot issue now.

    Its certificates have the real CA's issuer, extensions and signature length.
    """
    if not ca.current():
        return None
    section = ca.settings
    return CertificateAuthority(FileSigner(_key_like(ca.chain[0].public_key())), ca.chain, section.digest, section.crl_url, section.ocsp_url, ca.where)


def pump_keys() -> dict[str, PrivateKeyTypes]:
    """The pump key types an enrollment answer is rendered for, by name."""
    return {"P-256": ec.generate_private_key(ec.SECP256R1()), "RSA-2048": rsa.generate_private_key(65537, 2048)}


def check_enrollment_answer(
    report: Report, stand_in: CertificateAuthority, keys: dict[str, PrivateKeyTypes], profile: EnrollmentProfile, required: tuple[str, ...]
) -> None:
    """Render the label's enrollment answer with the server's own code, for each pump key type, and read it."""
    number = 1 + len(stand_in.chain) if profile.certificate.include_chain else 1
    verdicts: dict[str, Optional[str]] = dict.fromkeys(CLIENTS)
    sizes = []
    for name, key in keys.items():
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "NPPBBB4")])).sign(key, hashes.SHA256())
        response = ESTResponse([(CERTS_ONLY, stand_in.certs_only(stand_in.issue(csr, profile.certificate), profile.certificate))])
        profile.encoding.apply(response)
        body = response.get_data()
        form, cte = body_form(body), response.headers.get(CTE, "").lower() == "base64"
        sizes.append(f"{len(body):,} bytes ({name} pump key)")
        for client in CLIENTS:
            why = unreadable(client, form, cte, number, True, enrollment=True)
            if why and verdicts[client] is None:
                verdicts[client] = why if not sizes[:-1] else f"{why} with {name} pump keys"
    what = f"enrollment answer (rendered from the label's settings; nothing enrolled) is {form.kind}, {count(number, 'certificate')}, {' or '.join(sizes)}"
    report_readers(report, f"label {profile.name}", what, verdicts, required)


def _key_like(public_key: CertificatePublicKeyTypes) -> PrivateKeyTypes:
    """A throwaway private key of the same type and size, so a stand-in signature has the real length."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return rsa.generate_private_key(65537, public_key.key_size)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ec.generate_private_key(public_key.curve)
    return ed448.Ed448PrivateKey.generate() if isinstance(public_key, ed448.Ed448PublicKey) else ed25519.Ed25519PrivateKey.generate()
