"""Certificate signing requests: parse, prove, and hold to a label's policy."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ..config import CSR_ATTRIBUTE_NAMES
from ..errors import BadRequest, parsing_client_input
from .names import NamePolicy, check_reserved, check_subject, check_subject_alt_names

ATTRIBUTE_NAMES = {oid: name for name, oid in CSR_ATTRIBUTE_NAMES.items()}
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048
# Larger keys buy nothing a pump needs and cost every verifier; the exponent bounds are
# NIST SP 800-89 / FIPS 186-4's (odd, 65537 <= e < 2**256), as RFC 4055 recommends 65537.
MAX_RSA_BITS = 4096
RSA_EXPONENT_RANGE = (65537, 2**256)

# cryptography warns (once per process, to stderr) when it parses a name attribute outside
# RFC 5280's length rules; names.check_subject refuses such a CSR with a 400 naming the
# attribute, so the warning is noise. A filter set once at import is thread-safe, unlike
# warnings.catch_warnings() around each parse.
warnings.filterwarnings("ignore", message=r"Attribute's length must be", category=UserWarning)


@dataclass(frozen=True)
class CSRPolicy:
    """What a label accepts in a CSR, beyond a valid signature and a strong key."""

    subject_cn_pattern: Optional[re.Pattern[str]] = None
    # What csrattrs tells clients to include; enforced when require_attributes is set.
    attributes: tuple[x509.ObjectIdentifier, ...] = ()
    require_attributes: bool = False
    names: NamePolicy = field(default_factory=NamePolicy)


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER CSR and check its signature and key strength."""
    with parsing_client_input("body is not a PKCS#10 certificate signing request"):
        csr = x509.load_der_x509_csr(der)
    with parsing_client_input("CSR public key is of an unsupported type; use RSA >= 2048, EC P-256/384/521 or Ed25519"):
        key = csr.public_key()
    _check_key(key)
    with parsing_client_input("CSR extension request or attributes are malformed"):
        csr.extensions  # parsed now (cryptography parses them lazily) so they fail here as a 400, not later as a fault
        csr.attributes
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported signature algorithms raise assorted errors
        valid = False
    if not valid:
        raise BadRequest("CSR signature does not verify: the request was altered or signed with another key")
    return csr


def _check_key(key: object) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadRequest(f"RSA key of {key.key_size} bits is too weak: at least {MIN_RSA_BITS} required")
        if key.key_size > MAX_RSA_BITS:
            raise BadRequest(f"RSA key of {key.key_size} bits is too large: at most {MAX_RSA_BITS} accepted")
        exponent = key.public_numbers().e
        low, high = RSA_EXPONENT_RANGE
        if exponent % 2 == 0 or not low <= exponent < high:
            shown = exponent if exponent < 2**64 else f"of {exponent.bit_length()} bits"
            raise BadRequest(f"RSA public exponent {shown} is not accepted: it must be odd, at least 65537 and below 2**256 (use 65537)")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise BadRequest(f"EC curve {key.curve.name} is not allowed: use P-256, P-384 or P-521")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise BadRequest("CSR public key is of an unsupported type; use RSA >= 2048, EC P-256/384/521 or Ed25519")


def check_policy(csr: x509.CertificateSigningRequest, policy: CSRPolicy) -> None:
    """Refuse a CSR whose subject or subjectAltName the label does not accept."""
    try:
        subject = csr.subject  # parsed on first use: a signed CSR may still hold a malformed name
    except ValueError as exc:
        raise BadRequest(f"CSR subject is malformed: {exc}") from None
    check_subject(subject)
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not str(cns[0].value).strip():
        raise BadRequest("CSR subject must carry exactly one non-empty commonName (the device id)")
    cn = str(cns[0].value)
    if policy.subject_cn_pattern is not None and not policy.subject_cn_pattern.fullmatch(cn):
        raise BadRequest(f"CSR commonName {cn!r} does not match this label's pattern {policy.subject_cn_pattern.pattern!r}")
    check_reserved(cn, policy.subject_cn_pattern, policy.names)
    check_subject_alt_names(csr, policy.names)
    if policy.require_attributes:
        present = _carried_oids(csr)
        for oid in policy.attributes:
            if oid not in present:
                name = ATTRIBUTE_NAMES.get(oid.dotted_string, oid.dotted_string)
                raise BadRequest(f"CSR lacks the required attribute {name} ({oid.dotted_string}); see csrattrs")


def _carried_oids(csr: x509.CertificateSigningRequest) -> set[x509.ObjectIdentifier]:
    """Everything a CSR can carry that csrattrs may ask for: attributes, subject types, requested extensions."""
    oids = {attribute.oid for attribute in csr.attributes}
    oids.update(attribute.oid for attribute in csr.subject)
    oids.update(extension.oid for extension in csr.extensions)
    return oids
