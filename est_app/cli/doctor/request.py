"""``--request FILE``: a request body captured from a gateway, explained with the server's own
decoder and CSR checks (what it is: DER, PEM or base64, the CSR's subject, key and attributes),
and the label's verdict on it.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ...ca import check_policy, load_csr
from ...ca.csr import ATTRIBUTE_NAMES
from ...config import Settings
from ...encoding import decode_body
from ...enrollment import device_key
from ...errors import ESTError
from ...profiles import EnrollmentProfile
from .bodies import body_form
from .report import Report, shown

CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def check_request(report: Report, settings: Settings, profile: EnrollmentProfile, path: Path) -> None:
    subject = f"label {profile.name}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        report.fail("request", f"cannot read {path}: {exc.strerror}")
        return
    form = body_form(data)
    report.ok("request", f"{path.name}: {len(data):,} bytes, {form}" + (f", starts {shown(repr(data[:16]))}" if form.kind == "other" else ""))
    if len(data) > settings.max_body_bytes:
        report.fail(subject, f"would answer 413: request body larger than {settings.max_body_bytes} bytes", "the gateway sends the wrong file")
        return
    try:
        der = decode_body(data, "PKCS#10 CSR")
    except ESTError as exc:
        report.fail(subject, f"would answer {exc.status}: {exc.message}", "the gateway must send the CSR itself, as DER, PEM or base64")
        return
    _describe_csr(report, der)
    try:
        csr = load_csr(der)
    except ESTError as exc:
        todo = "make the CSR again with a supported key, signed by that key"
        if form.excess > 0:
            todo = "the gateway adds bytes after the DER: send the file unchanged (curl --data-binary @FILE)"
        elif form.excess < 0:
            todo = "the body was cut short: capture or send the whole file"
        report.fail(subject, f"would answer {exc.status}: {exc.message}", todo)
        return
    try:
        check_policy(csr, profile.csr_policy)
        device = device_key(csr, profile.device_id)
    except ESTError as exc:
        report.fail(subject, f"would answer {exc.status}: {exc.message}", "fix the gateway's CSR, or the label's subject_cn_pattern / csr_attributes / device_id")
        return
    report.ok(
        subject, f"would accept it for device {shown(repr(device))} (decoding, key, signature and CSR policy as the server checks them)",
        "not checked here: the gateway's credentials, the Content-Type header, and a duplicate device under duplicate_policy: reject",
    )


def _describe_csr(report: Report, der: bytes) -> None:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        return  # load_csr says why, in the server's words
    report.ok("request", f"CSR subject {shown(csr.subject.rfc4514_string()) or '(empty)'}, key {_key_name(csr)}")
    attributes = []
    for attribute in csr.attributes:
        name = ATTRIBUTE_NAMES.get(attribute.oid.dotted_string, attribute.oid.dotted_string)
        if name == "challengePassword":
            name += f" ({len(attribute.value)} characters; must be this TLS session's tls-unique unless an RA sends it)"
        attributes.append(name)
    try:
        for extension in csr.extensions:
            if isinstance(extension.value, x509.SubjectAlternativeName):
                attributes.append("subjectAltName " + ", ".join(shown(f"{type(n).__name__.removesuffix('Name')}:{n.value}") for n in extension.value))
            else:
                attributes.append(f"requested extension {extension.oid._name}")
    except ValueError:
        pass  # load_csr names a malformed extension request
    report.ok("request", "attributes: " + ("; ".join(attributes) if attributes else "none"))


def _key_name(csr: x509.CertificateSigningRequest) -> str:
    try:
        key = csr.public_key()
    except Exception:  # unsupported key types raise assorted errors
        return "of an unsupported type"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits, exponent {key.public_numbers().e}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {CURVES.get(key.curve.name, key.curve.name)}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "")
