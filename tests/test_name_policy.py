"""Issue 7, name and key policy, through the Flask test client: what a CSR may put in a certificate.

Each refusal is a one-line 400 naming the field, nothing is recorded, and the
server still issues to a good CSR afterwards. The review's cases are here as
it found them: wildcard, IP, URI and malformed dNSName SANs, 2,500 SANs, a
10,000-character CN, a CN with an embedded NUL, a 16,384-bit RSA key and a
3,071-bit public exponent.
"""

from __future__ import annotations

import ipaddress
import secrets
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID, NameOID
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import univ
from pyasn1_modules import rfc2986, rfc5280

from est_app import create_app
from est_app.config import ConfigError

from .pki import ec_key, make_csr, rsa_key
from .test_protocol import cases, issued, post, refused, store

DNS_LABEL = {"san_types": ["dns"], "san_dns_suffixes": ["pumps.example"]}
ALL_TYPES = {"san_types": ["dns", "email", "ip", "uri"], "san_dns_suffixes": ["pumps.example"], "max_san_count": 4}
LABELS = {"dns": DNS_LABEL, "all": ALL_TYPES}


def san_csr(*names: x509.GeneralName, cn: str = "NPPBBB4"):
    return make_csr(cn, extensions=[(x509.SubjectAlternativeName(list(names)), False)])


def subject_csr(*attributes: tuple[x509.ObjectIdentifier, str]):
    """A CSR whose subject cryptography's own checks (CN length, country code) would not let us build."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Attribute's length must be ...": the point here
        return make_csr(name=x509.Name([x509.NameAttribute(oid, value, _validate=False) for oid, value in attributes]))


def with_public_key(csr: x509.CertificateSigningRequest, public_key) -> bytes:
    """``csr`` re-encoded with another public key (its signature no longer verifies): keys too costly to generate."""
    request, _ = decoder.decode(csr.public_bytes(Encoding.DER), asn1Spec=rfc2986.CertificationRequest())
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    request["certificationRequestInfo"]["subjectPKInfo"], _ = decoder.decode(spki, asn1Spec=rfc5280.SubjectPublicKeyInfo())
    return encoder.encode(request)


def resigned(old: bytes, new: bytes) -> bytes:
    """A CSR for ``NPPBBB44`` with ``old`` bytes of its request info replaced by ``new`` (same length),
    then signed again: well signed, yet holding encodings cryptography's builder never writes."""
    key = ec_key()
    request, _ = decoder.decode(make_csr("NPPBBB44", key=key).public_bytes(Encoding.DER), asn1Spec=rfc2986.CertificationRequest())
    info = encoder.encode(request["certificationRequestInfo"]).replace(old, new)
    request["certificationRequestInfo"], _ = decoder.decode(info, asn1Spec=rfc2986.CertificationRequestInfo())
    request["signature"] = univ.BitString.fromOctetString(key.sign(info, ec.ECDSA(hashes.SHA256())))
    return encoder.encode(request)


def odd_number(bits: int) -> int:
    return secrets.randbits(bits) | (1 << (bits - 1)) | 1


def rsa_public(bits: int = 2048, exponent: int = 65537):
    return rsa.RSAPublicNumbers(exponent, odd_number(bits)).public_key()


class RawCSR:
    """Pre-encoded CSR bytes, posted as they are."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def public_bytes(self, encoding) -> bytes:
        return self.der


CN = NameOID.COMMON_NAME
# (id, CSR, label, phrase of the 400)
REFUSALS = [
    ("wildcard dNSName", san_csr(x509.DNSName("*.pumps.example")), "dns", "subjectAltName dNSName '*.pumps.example' is a wildcard"),
    ("iPAddress where only DNS is allowed", san_csr(x509.IPAddress(ipaddress.ip_address("10.1.2.3"))), "dns", "subjectAltName iPAddress is not allowed on label 'dns' (allowed SAN types: dns)"),
    ("URI on the unlabelled path", san_csr(x509.UniformResourceIdentifier("https://evil.example/")), None, "CSR carries a subjectAltName, and label 'default' issues none"),
    ("dNSName on the unlabelled path", san_csr(x509.DNSName("npp-bbb4.pumps.example")), None, "label 'default' issues none"),
    ("dNSName with an underscore", san_csr(x509.DNSName("npp_bbb4.pumps.example")), "dns", "dNSName 'npp_bbb4.pumps.example' is not a DNS name"),
    ("dNSName with a trailing dot", san_csr(x509.DNSName("npp-bbb4.pumps.example.")), "dns", "is not a DNS name"),
    ("dNSName label of 64 characters", san_csr(x509.DNSName("a" * 64 + ".pumps.example")), "dns", "is not a DNS name"),
    ("dNSName under another domain", san_csr(x509.DNSName("radius.evil.example")), "dns", "dNSName 'radius.evil.example' is not under an allowed suffix (allowed: pumps.example)"),
    ("dNSName only ending like the suffix", san_csr(x509.DNSName("evilpumps.example")), "dns", "is not under an allowed suffix"),
    ("dNSName with a NUL", san_csr(x509.DNSName("npp\x00.pumps.example")), "dns", "dNSName 'npp\\x00.pumps.example' contains the control or formatting character U+0000"),
    ("2,500 SANs", san_csr(*[x509.DNSName(f"n{i}.pumps.example") for i in range(2500)]), "dns", "subjectAltName has 2500 names; label 'dns' allows at most 10"),
    ("directoryName", san_csr(x509.DirectoryName(x509.Name([x509.NameAttribute(CN, "x")]))), "all", "subjectAltName directoryName is not allowed"),
    ("ediPartyName (a type cryptography cannot read)",
     make_csr(extensions=[(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, bytes.fromhex("3007a505a1030c0178")), False)]),
     "all", "CSR extension request or attributes are malformed"),
    ("rfc822Name outside the suffixes", san_csr(x509.RFC822Name("biomed@evil.example")), "all", "rfc822Name 'biomed@evil.example' is not under an allowed suffix"),
    ("rfc822Name without a local part", san_csr(x509.RFC822Name("pumps.example")), "all", "is not an e-mail address"),
    ("URI host outside the suffixes", san_csr(x509.UniformResourceIdentifier("https://evil.example/x")), "all", "is not under an allowed suffix"),
    ("relative URI", san_csr(x509.UniformResourceIdentifier("/pumps/1")), "all", "is not an absolute URI"),
    ("URI with a space", san_csr(x509.UniformResourceIdentifier("urn:pump 1")), "all", "is not an absolute URI"),
    ("commonName of 10,000 characters", subject_csr((CN, "N" * 10000)), None, "subject commonName is 10000 characters long; at most 64 allowed (RFC 5280)"),
    ("commonName of 65 characters", subject_csr((CN, "N" * 65)), None, "at most 64 allowed"),
    ("commonName with a NUL (null-prefix attack)", subject_csr((CN, "GWNUL1\x00.evil.example")), None, "commonName 'GWNUL1\\x00.evil.example' contains the control or formatting character U+0000 at position 6"),
    ("commonName with DEL", subject_csr((CN, "NPP\x7fBBB4")), None, "U+007F"),
    ("commonName with a C1 control", subject_csr((CN, "NPP\x85BBB4")), None, "U+0085"),
    ("commonName with a newline", subject_csr((CN, "NPPBBB4\nforged log line")), None, "U+000A"),
    ("commonName with a bidi override", subject_csr((CN, "NPP\u202e4BBB")), None, "U+202E"),
    ("commonName not valid UTF-8", RawCSR(resigned(b"\x0c\x08NPPBBB44", b"\x0c\x08NPP\xff\xfe\xfd44")), None, "CSR subject is malformed"),
    ("BMPString commonName with a NUL", RawCSR(resigned(b"\x0c\x08NPPBBB44", b"\x1e\x08\x00N\x00\x00\x00P\x00Q")), None, "commonName 'N\\x00PQ' contains the control or formatting character U+0000"),
    ("organizationName with a tab", subject_csr((CN, "NPPBBB4"), (NameOID.ORGANIZATION_NAME, "Ward\t3")), None, "subject organizationName 'Ward\\t3' contains"),
    ("organizationName of 65 characters", subject_csr((CN, "NPPBBB4"), (NameOID.ORGANIZATION_NAME, "O" * 65)), None, "subject organizationName is 65 characters long; at most 64"),
    ("countryName of three letters", subject_csr((CN, "NPPBBB4"), (NameOID.COUNTRY_NAME, "USA")), None, "subject countryName 'USA' must be a two-letter ISO 3166 code"),
    ("17 subject attributes", subject_csr((CN, "NPPBBB4"), *[(NameOID.ORGANIZATIONAL_UNIT_NAME, f"ou{i}") for i in range(16)]), None, "CSR subject has 17 attributes; at most 16 allowed"),
    ("RSA key of 16,384 bits", RawCSR(with_public_key(make_csr(), rsa_public(16384))), None, "RSA key of 16384 bits is too large: at most 4096 accepted"),
    ("RSA key of 4,097 bits", RawCSR(with_public_key(make_csr(), rsa_public(4097))), None, "RSA key of 4097 bits is too large"),
    ("RSA exponent of 3,071 bits", RawCSR(with_public_key(make_csr(), rsa_public(3072, odd_number(3071)))), None, "RSA public exponent of 3071 bits is not accepted"),
    ("RSA exponent 2**256 + 1", RawCSR(with_public_key(make_csr(), rsa_public(2048, 2**256 + 1))), None, "RSA public exponent of 257 bits is not accepted"),
    ("RSA exponent 3", RawCSR(with_public_key(make_csr(), rsa_public(2048, 3))), None, "RSA public exponent 3 is not accepted: it must be odd, at least 65537"),
    ("RSA exponent 65535", RawCSR(with_public_key(make_csr(), rsa_public(2048, 65535))), None, "RSA public exponent 65535"),
]
# Keys at the bounds pass the key check and fail only at the (deliberately broken) signature.
KEY_BOUNDS = [
    ("4,096 bits", rsa_public(4096)),
    ("exponent 2**256 - 1", rsa_public(2048, 2**256 - 1)),
    ("exponent 65537", rsa_public(2048, 65537)),
]


@pytest.fixture
def client(make_app):
    return make_app(labels=LABELS).test_client()


@pytest.mark.parametrize("csr, label, phrase", cases(REFUSALS))
def test_refused_with_a_400_naming_the_field(make_app, csr, label, phrase):
    app = make_app(labels=LABELS)
    client = app.test_client()
    refused(post(client, "simpleenroll", csr, label=label, basic=True), 400, phrase)
    assert store(app).count_certificates() == 0
    issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label=label, basic=True))  # and carries on


@pytest.mark.parametrize("public_key", cases(KEY_BOUNDS))
def test_rsa_keys_at_the_bounds_pass_the_key_check(client, public_key):
    refused(post(client, "simpleenroll", RawCSR(with_public_key(make_csr(), public_key)), basic=True), 400, "CSR signature does not verify")


def test_a_real_4096_bit_key_enrolls(client):
    issued(post(client, "simpleenroll", make_csr("NPPBBB4", key=rsa_key(4096)), basic=True))


def test_allowed_names_are_copied_exactly(client):
    names = [
        x509.DNSName("NPP-BBB4.Ward3.Pumps.Example"),  # suffixes compare without case
        x509.RFC822Name("biomed@pumps.example"),
        x509.IPAddress(ipaddress.ip_address("2001:db8::17")),
        x509.UniformResourceIdentifier("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"),
    ]
    certificate = issued(post(client, "simpleenroll", san_csr(*names), label="all", basic=True))
    assert list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == names
    refused(post(client, "simpleenroll", san_csr(*names, x509.DNSName("five.pumps.example")), label="all", basic=True), 400, "has 5 names; label 'all' allows at most 4")


def test_the_suffix_itself_is_allowed(client):
    certificate = issued(post(client, "simpleenroll", san_csr(x509.DNSName("pumps.example")), label="dns", basic=True))
    assert certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["pumps.example"]


def test_the_policy_holds_for_serverkeygen_too(client):
    csr = subject_csr((CN, "GWNUL1\x00.evil.example"))
    refused(post(client, "serverkeygen", csr, basic=True), 400, "U+0000")


# (id, top-level/label settings, phrase of the start-up error)
CONFIG_ERRORS = [
    ("dns without suffixes", {"labels": {"wards": {"san_types": ["dns"]}}}, "labels.wards: san_types allows DNS or e-mail names but san_dns_suffixes is empty"),
    ("email without suffixes at top level", {"san_types": ["email"]}, "top level: san_types allows DNS or e-mail names"),
    ("wildcard suffix", {"san_dns_suffixes": ["*.pumps.example"]}, "san_dns_suffixes: '*.pumps.example' is not a DNS domain"),
    ("leading dot", {"labels": {"wards": {"san_dns_suffixes": [".pumps.example"]}}}, "labels.wards: san_dns_suffixes: '.pumps.example' is not a DNS domain"),
    ("unknown SAN type", {"san_types": ["dirname"]}, "san_types[0]: 'dirname' is not one of dns, email, ip, uri"),
    ("zero SANs", {"max_san_count": 0}, "max_san_count must be at least 1"),
]


@pytest.mark.parametrize("overrides, phrase", cases(CONFIG_ERRORS))
def test_bad_name_policy_stops_start_up(make_config, overrides, phrase):
    with pytest.raises(ConfigError) as error:
        create_app(make_config(**overrides))
    assert phrase in str(error.value)
