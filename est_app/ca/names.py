"""What names a CSR may ask for: subject attribute syntax and bounds, and subjectAltName policy.

Everything here reads device-supplied text, so each refusal is a
:class:`BadRequest` naming the field, with the offending value shown escaped
and shortened (it ends up in a one-line answer, the log and the audit trail).
Bounds are RFC 5280's (Appendix A upper bounds, 4.2.1.6 for subjectAltName);
no control or invisible formatting character passes anywhere: a NUL in a
commonName (``GWNUL1\\x00.evil.example``) truncates the name for C-string
comparisons in RADIUS stacks.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..config import DNS_NAME
from ..errors import BadRequest

# RFC 5280 Appendix A upper bounds (ub-*), in characters.
UPPER_BOUNDS = {
    NameOID.COMMON_NAME: 64,
    NameOID.SURNAME: 32768,
    NameOID.GIVEN_NAME: 32768,
    NameOID.INITIALS: 32768,
    NameOID.GENERATION_QUALIFIER: 32768,
    NameOID.LOCALITY_NAME: 128,
    NameOID.STATE_OR_PROVINCE_NAME: 128,
    NameOID.ORGANIZATION_NAME: 64,
    NameOID.ORGANIZATIONAL_UNIT_NAME: 64,
    NameOID.TITLE: 64,
    NameOID.SERIAL_NUMBER: 64,
    NameOID.PSEUDONYM: 128,
    NameOID.EMAIL_ADDRESS: 255,
    NameOID.DOMAIN_COMPONENT: 63,
}
OTHER_ATTRIBUTE_BOUND = 128  # ub-match, for attribute types RFC 5280 gives no bound
MAX_SUBJECT_ATTRIBUTES = 16
MAX_SAN_LENGTH = 255  # any one subjectAltName string: a DNS name is at most 253
# Unicode categories refused anywhere in a name: C0, DEL and C1 controls; bidi overrides,
# zero-width and other format characters; line and paragraph separators; lone surrogates.
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
SAN_TYPE_OF = {
    x509.DNSName: ("dns", "dNSName"),
    x509.RFC822Name: ("email", "rfc822Name"),
    x509.IPAddress: ("ip", "iPAddress"),
    x509.UniformResourceIdentifier: ("uri", "uniformResourceIdentifier"),
    x509.DirectoryName: (None, "directoryName"),
    x509.RegisteredID: (None, "registeredID"),
    x509.OtherName: (None, "otherName"),
}
# RFC 3986: unreserved, reserved and '%' (percent-encoding); nothing else belongs in a URI.
URI_CHARACTERS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
EMAIL_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")


@dataclass(frozen=True)
class NamePolicy:
    """A label's rules for subjectAltName, and the commonNames other labels own."""

    label: str = "default"
    san_types: frozenset[str] = frozenset()
    san_dns_suffixes: tuple[str, ...] = ()
    max_san_count: int = 10
    # (owning label, its subject_cn_pattern) for every other label that has one.
    reserved_cn_patterns: tuple[tuple[str, re.Pattern[str]], ...] = field(default=())


def shown(value: str, limit: int = 64) -> str:
    """A device-supplied value for a one-line message: escaped (repr), and shortened when long."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_text(field_name: str, value: str) -> None:
    """Refuse control and invisible formatting characters in ``value``."""
    for position, character in enumerate(value):
        if unicodedata.category(character) in FORBIDDEN_CATEGORIES:
            raise BadRequest(
                f"CSR {field_name} {shown(value)} contains the control or formatting character "
                f"U+{ord(character):04X} at position {position}; names must be printable text"
            )


def check_subject(subject: x509.Name) -> None:
    """Every subject attribute: printable, within its RFC 5280 upper bound; countryName two letters."""
    attributes = list(subject)
    if len(attributes) > MAX_SUBJECT_ATTRIBUTES:
        raise BadRequest(f"CSR subject has {len(attributes)} attributes; at most {MAX_SUBJECT_ATTRIBUTES} allowed")
    for attribute in attributes:
        if not isinstance(attribute.value, str):
            continue  # a bit string (x500UniqueIdentifier): never copied into a certificate
        field_name = f"subject {attribute.oid._name}"  # commonName, organizationName, ... as RFC 5280 spells them
        check_text(field_name, attribute.value)
        if attribute.value != attribute.value.strip():
            raise BadRequest(f"CSR {field_name} {shown(attribute.value)} has leading or trailing spaces")
        if attribute.oid == NameOID.COUNTRY_NAME:
            if not re.fullmatch(r"[A-Za-z]{2}", attribute.value):
                raise BadRequest(f"CSR {field_name} {shown(attribute.value)} must be a two-letter ISO 3166 code")
            continue
        bound = UPPER_BOUNDS.get(attribute.oid, OTHER_ATTRIBUTE_BOUND)
        if len(attribute.value) > bound:
            raise BadRequest(f"CSR {field_name} is {len(attribute.value)} characters long; at most {bound} allowed (RFC 5280)")


def check_reserved(cn: str, own_pattern: Optional[re.Pattern[str]], policy: NamePolicy) -> None:
    """A commonName matching another label's pattern belongs to that label (unless this label's pattern claims it too)."""
    if own_pattern is not None:
        return  # the CN matched this label's own pattern: overlapping patterns share their names
    # Matched the way a RADIUS rule or a person might compare names: case and Unicode
    # compatibility forms (fullwidth letters) folded, so `nppbbb4` is the pumps' name too.
    folded = unicodedata.normalize("NFKC", cn)
    for owner, pattern in policy.reserved_cn_patterns:
        if pattern.fullmatch(cn) or re.fullmatch(pattern.pattern, folded, pattern.flags | re.IGNORECASE):
            raise BadRequest(
                f"CSR commonName {shown(cn)} is reserved to label {owner!r} (it matches that label's subject_cn_pattern); "
                f"enroll it at /.well-known/est/{owner}/"
            )


def check_subject_alt_names(csr: x509.CertificateSigningRequest, policy: NamePolicy) -> None:
    """The requested subjectAltName: only allowed types, well-formed, under allowed DNS suffixes, not too many."""
    try:
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return
    if not names:
        raise BadRequest("CSR subjectAltName extension is empty; leave it out or name something")
    allowed = ", ".join(sorted(policy.san_types)) or "none"
    if not policy.san_types:
        raise BadRequest(f"CSR carries a subjectAltName, and label {policy.label!r} issues none (allowed SAN types: none); leave it out")
    if len(names) > policy.max_san_count:
        raise BadRequest(f"CSR subjectAltName has {len(names)} names; label {policy.label!r} allows at most {policy.max_san_count}")
    for name in names:
        kind, field_name = SAN_TYPE_OF.get(type(name), (None, type(name).__name__))
        field_name = f"subjectAltName {field_name}"
        if kind not in policy.san_types:
            raise BadRequest(f"CSR {field_name} is not allowed on label {policy.label!r} (allowed SAN types: {allowed})")
        if kind == "ip":
            continue
        value = name.value
        check_text(field_name, value)
        if len(value) > MAX_SAN_LENGTH:
            raise BadRequest(f"CSR {field_name} is {len(value)} characters long; at most {MAX_SAN_LENGTH} allowed")
        if kind == "dns":
            _check_domain(field_name, value, value, policy)
        elif kind == "email":
            local, at, domain = value.rpartition("@")
            if not at or not EMAIL_LOCAL_PART.fullmatch(local):
                raise BadRequest(f"CSR {field_name} {shown(value)} is not an e-mail address (local-part@domain, ASCII)")
            _check_domain(field_name, value, domain, policy)
        else:
            _check_uri(field_name, value, policy)


def _check_domain(field_name: str, value: str, domain: str, policy: NamePolicy) -> None:
    if "*" in domain:
        raise BadRequest(f"CSR {field_name} {shown(value)} is a wildcard; certificates here name one host")
    if not DNS_NAME.fullmatch(domain):
        raise BadRequest(
            f"CSR {field_name} {shown(value)} is not a DNS name (letters, digits and '-' in dot-separated labels of at most 63; "
            "IDNs as xn-- A-labels; no trailing dot)"
        )
    lowered = domain.lower()
    if not any(lowered == suffix or lowered.endswith("." + suffix) for suffix in policy.san_dns_suffixes):
        suffixes = ", ".join(policy.san_dns_suffixes) or "none"
        raise BadRequest(f"CSR {field_name} {shown(value)} is not under an allowed suffix (allowed: {suffixes})")


def _check_uri(field_name: str, value: str, policy: NamePolicy) -> None:
    if not URI_CHARACTERS.fullmatch(value):
        raise BadRequest(f"CSR {field_name} {shown(value)} is not an absolute URI (scheme:rest, RFC 3986 characters only)")
    try:
        host = urlsplit(value).hostname
    except ValueError:
        raise BadRequest(f"CSR {field_name} {shown(value)} is not an absolute URI (its authority does not parse)") from None
    if not host:
        return  # no authority (urn:, mailto:): nothing that names a host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        _check_domain(field_name, value, host, policy)
