"""Issued certificates pass pkilint's RFC 5280 linting (the real `lint_pkix_cert` tool).

Findings of severity NOTICE and above fail the test, except one named where it
is accepted (the development TLS certificate's "localhost"). The one INFO finding
pkilint reports, ``pkix.subject_key_identifier_method_1_identified``, only
says which RFC 5280 method derived the key identifier; it is not a defect.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from .pki import der, make_csr, pem, rsa_key
from .test_enroll import certs_from, enroll

BIN = Path(sys.executable).parent


def lint(tool: str, *files: Path, accepted: frozenset[str] = frozenset()) -> None:
    result = subprocess.run([str(BIN / tool), "lint", "-s", "NOTICE", *map(str, files)], capture_output=True, text=True)
    findings = set(re.findall(r"^\s+(\S+) \((?:NOTICE|WARNING|ERROR|FATAL)\)", result.stdout, re.M))
    assert result.returncode in (0, 1) and not result.stderr, result.stderr
    assert findings <= accepted, result.stdout
    assert result.returncode == 0 or findings, result.stdout


SAN = x509.SubjectAlternativeName([x509.DNSName("pump-17.ward3.example"), x509.RFC822Name("biomed@example.org")])
ALL_SAN_TYPES = x509.SubjectAlternativeName([
    x509.DNSName("pump-18.ward3.example"),
    x509.RFC822Name("biomed@example.org"),
    x509.IPAddress(ipaddress.ip_address("192.0.2.18")),
    x509.UniformResourceIdentifier("https://pump-18.ward3.example/device"),  # pkilint checks URIs as web URLs: no urn: here
])

@pytest.fixture
def app(make_app):
    """SAN types and domains allowed for the case that carries them (none are by default)."""
    return make_app(san_types=["dns", "email", "ip", "uri"], san_dns_suffixes=["ward3.example", "example.org"])


CASES = {
    "ec-p256": dict(cn="NPPBBB4"),
    "rsa-2048-with-san": dict(cn="NPPBBB5", key=rsa_key(2048), extensions=[(SAN, False)]),
    "every-allowed-san-type": dict(cn="NPPBBB6", extensions=[(ALL_SAN_TYPES, False)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_issued_certificate_lints_clean(client, pki_dir, tmp_path, case):
    (cert,) = certs_from(enroll(client, der(make_csr(**CASES[case]))))
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pem(cert))
    lint("lint_pkix_cert", leaf)
    lint("lint_pkix_signer_signee_cert_chain", pki_dir / "ca.pem", leaf)


def test_development_ca_and_tls_certificates_lint_clean(pki_dir):
    lint("lint_pkix_cert", pki_dir / "ca.pem")
    # pkilint wants a dot in every dNSName; "localhost" is a valid single-label name
    # (RFC 1034) and the one libest checks when dialling https://localhost.
    lint("lint_pkix_cert", pki_dir / "tls.pem", accepted=frozenset({"pkix.invalid_domain_name_syntax"}))
    lint("lint_pkix_signer_signee_cert_chain", pki_dir / "ca.pem", pki_dir / "tls.pem")
