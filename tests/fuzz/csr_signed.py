"""Harness: validly signed CSRs with fuzzer-chosen content, through the whole issuing path.

Mutating a CSR's bytes breaks its signature, so the raw ``csr`` harness
rarely gets past :func:`load_csr`. Here the fuzzer picks the key, digest,
subject (types, string tags, values, multi-valued RDNs), subjectAltName
entries or raw SAN bytes, other extensions as raw bytes, and attributes with
any tag; the harness signs the result and sends it through the same path as
``csr`` (policy, proof-of-possession, device id, issue, PKCS#7, encodings)
for one label, also the fuzzer's choice.
Inputs the CSR builder itself refuses are skipped: no client could send them.
"""

from __future__ import annotations

from . import harness  # noqa: I001  (first: instruments est_app)

import ipaddress

import atheris
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, ExtensionOID, NameOID, ObjectIdentifier

from .csr import PROFILES, enroll_offline
from .deployment import body_forms, der

KEYS = (
    ec.generate_private_key(ec.SECP256R1()),
    ec.generate_private_key(ec.SECP384R1()),
    rsa.generate_private_key(65537, 2048),
    ed25519.Ed25519PrivateKey.generate(),
    ec.generate_private_key(ec.SECP256K1()),
)
DIGESTS = (hashes.SHA256, hashes.SHA384, hashes.SHA512, hashes.SHA224)
OTHER = ObjectIdentifier("1.3.6.1.4.1.99999.1")
NAME_OIDS = (
    NameOID.COMMON_NAME, NameOID.COMMON_NAME, NameOID.SERIAL_NUMBER, NameOID.ORGANIZATION_NAME, NameOID.COUNTRY_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.EMAIL_ADDRESS, NameOID.DOMAIN_COMPONENT, NameOID.USER_ID, OTHER,
)
STRING_TAGS = (None, *x509.name._ASN1Type)
EXTENSION_OIDS = (
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.NAME_CONSTRAINTS, ExtensionOID.CRL_DISTRIBUTION_POINTS, OTHER,
)
ATTRIBUTE_OIDS = (
    AttributeOID.CHALLENGE_PASSWORD, AttributeOID.UNSTRUCTURED_NAME, NameOID.SERIAL_NUMBER,
    ObjectIdentifier("1.3.6.1.1.1.1.22"), OTHER,
)


def pick(fdp: atheris.FuzzedDataProvider, choices: tuple):
    return choices[fdp.ConsumeIntInRange(0, len(choices) - 1)]


def text(fdp: atheris.FuzzedDataProvider) -> str:
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))


def general_name(fdp: atheris.FuzzedDataProvider) -> x509.GeneralName:
    kind = fdp.ConsumeIntInRange(0, 6)
    if kind == 0:
        return x509.DNSName(text(fdp))
    if kind == 1:
        return x509.RFC822Name(text(fdp))
    if kind == 2:
        return x509.UniformResourceIdentifier(text(fdp))
    if kind == 3:
        return x509.IPAddress(ipaddress.ip_address(fdp.ConsumeBytes(pick(fdp, (4, 16)))))
    if kind == 4:
        return x509.RegisteredID(pick(fdp, NAME_OIDS))
    if kind == 5:
        return x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text(fdp) or "x")]))
    return x509.OtherName(OTHER, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))


def build_csr(fdp: atheris.FuzzedDataProvider) -> x509.CertificateSigningRequest:
    key = pick(fdp, KEYS)
    rdns = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        attributes = [
            # _validate=False: a client's encoder need not keep cryptography's length and country-code rules
            x509.NameAttribute(pick(fdp, NAME_OIDS), text(fdp), pick(fdp, STRING_TAGS), _validate=False)
            for _ in range(fdp.ConsumeIntInRange(1, 2))
        ]
        rdns.append(x509.RelativeDistinguishedName(attributes))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(rdns))
    if fdp.ConsumeBool():
        if fdp.ConsumeBool():
            names = [general_name(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=fdp.ConsumeBool())
        else:
            raw = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)))
            builder = builder.add_extension(raw, critical=fdp.ConsumeBool())
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        raw = x509.UnrecognizedExtension(pick(fdp, EXTENSION_OIDS), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
        builder = builder.add_extension(raw, critical=fdp.ConsumeBool())
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        tag = pick(fdp, STRING_TAGS)
        value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        builder = builder.add_attribute(pick(fdp, ATTRIBUTE_OIDS), value, _tag=tag) if tag else builder.add_attribute(pick(fdp, ATTRIBUTE_OIDS), value)
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else pick(fdp, DIGESTS)()
    return builder.sign(key, digest)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    form = fdp.ConsumeIntInRange(0, 5)
    try:
        csr = build_csr(fdp)
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm):
        return  # the builder refuses it: not a CSR any client could send
    enroll_offline(body_forms(der(csr))[form], [pick(fdp, PROFILES)])  # one label: issuing for all five costs 5x


if __name__ == "__main__":
    harness.run("csr_signed", test_one_input, [bytes(range(256)), bytes(range(255, -1, -1)), b"\x00" * 64, b"\x01\x02\x41" * 40])
