"""Rolling over an intermediate CA (issued by an offline root) in two steps, through `est-admin ca rollover`.

`--request FILE` makes the new key beside the old one and writes its CSR for the root's operator; the
root signs it (here, the test); `--certificate FILE` checks what comes back (the new key's, the CA's
subject, CA:TRUE, issued by the same parent, valid now) and installs it, each refusal one line with
the configuration untouched. An app on the rewritten configuration answers cacerts with the new and
the old intermediate and the root, issues from the new key, re-enrolls an old pump into a new
certificate, and keeps signing the old CA's CRL and OCSP answers with the old key; openssl verifies
both generations against the root alone, the intermediates from cacerts as path-builders.
"""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from est_app.ca.authority import issuer_id
from est_app.ca.development import write_certificate

from .conftest import run_cli
from .e2e_clients import openssl
from .pki import ec_key, pem
from .test_enroll import certs_from
from .test_label_ca import app_config, enroll, fetch_crl, revoke, revoked_serials
from .test_revocation import ocsp_post, ocsp_request
from .test_rollover import PASSPHRASE, PASSPHRASE_ENV, new_ca_issues, restarted

SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hospital"), x509.NameAttribute(NameOID.COMMON_NAME, "est_app issuing CA")])
CRL_URL = "https://est.example:8445/crl"
SIGNING_ONLY = x509.KeyUsage(True, False, False, False, False, False, False, False, False)  # digitalSignature alone


def make_root(common_name: str):
    """An offline root that certifies intermediate CAs (pathLenConstraint 1); (key, certificate)."""
    key = ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def certify(
    public_key, root_key, root: x509.Certificate, subject: x509.Name = SUBJECT, ca: bool = True, days: int = 1000,
    key_usage: x509.KeyUsage | None = None,
) -> x509.Certificate:
    """What the root's operator signs: a certificate for ``public_key`` issued by ``root`` (key usage: none, or ``key_usage``)."""
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(root.subject).public_key(public_key)
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key()), critical=False)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return builder.sign(root_key, hashes.SHA256())


def write_intermediate(directory: Path, root_key, root: x509.Certificate, public_key=None) -> x509.Certificate:
    """root.pem and issuing.pem in ``directory``; with ``public_key`` None, a new key in issuing.key (encrypted)."""
    directory.mkdir(exist_ok=True)
    write_certificate(directory / "root.pem", root)
    if public_key is None:
        key = ec_key()
        public_key = key.public_key()
        encryption = serialization.BestAvailableEncryption(PASSPHRASE)
        (directory / "issuing.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
        os.chmod(directory / "issuing.key", 0o600)
    certificate = certify(public_key, root_key, root)
    write_certificate(directory / "issuing.pem", certificate)
    return certificate


def rollover(config: Path, *args: str) -> str:
    """`ca rollover ARGS`; its output."""
    result = run_cli("ca", "rollover", *args, config=config)
    assert result.exit_code == 0, result.output
    return result.output


def refused(config: Path, *args: str) -> str:
    """`ca rollover ARGS` refused in one line, the configuration untouched; the line."""
    before = config.read_text()
    result = run_cli("ca", "rollover", *args, config=config)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert config.read_text() == before
    return result.output


def verify_both_generations(tmp_path: Path, root: x509.Certificate, intermediates: list[x509.Certificate], *pumps: x509.Certificate) -> None:
    """openssl: each pump verifies with the root as the only anchor and cacerts' intermediates as untrusted path-builders."""
    (tmp_path / "anchor.pem").write_bytes(pem(root))
    (tmp_path / "intermediates.pem").write_bytes(b"".join(pem(c) for c in intermediates))
    for number, pump in enumerate(pumps):
        (tmp_path / f"pump-{number}.pem").write_bytes(pem(pump))
        verified = openssl("verify", "-CAfile", tmp_path / "anchor.pem", "-untrusted", tmp_path / "intermediates.pem", tmp_path / f"pump-{number}.pem")
        assert verified.strip().endswith(b": OK")


@pytest.fixture
def offline_root():
    return make_root("est_app offline root")


def test_an_intermediate_ca_rolls_over_in_two_steps(make_app, offline_root, tmp_path, monkeypatch):
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE.decode())
    root_key, root = offline_root
    folder = tmp_path / "ca"
    old = write_intermediate(folder, root_key, root)
    ca = {"cert_file": str(folder / "issuing.pem"), "key_file": str(folder / "issuing.key"), "chain_file": str(folder / "root.pem"),
          "key_passphrase_env": PASSPHRASE_ENV, "cert_validity_days": 30, "crl_url": CRL_URL}
    before = make_app(ca=ca)
    config = app_config(before)
    old_pumps = []
    for cn in ("NPPIOLD1", "NPPIOLD2"):
        key = ec_key()
        old_pumps.append((key, enroll(before.test_client(), cn, key=key)))

    assert "ca is an intermediate CA (issued by CN=est_app offline root): its new certificate comes from that CA" in refused(config)

    # Step one: the new key beside the old (encrypted like it), its CSR for the root's operator; the configuration unchanged.
    unchanged = config.read_text()
    output = rollover(config, "--request", str(tmp_path / "new-ca.csr"))
    assert f"new CA key:         {folder / 'issuing-2.key'}" in output and f"request:            {tmp_path / 'new-ca.csr'}" in output
    assert config.read_text() == unchanged
    request = x509.load_pem_x509_csr((tmp_path / "new-ca.csr").read_bytes())
    assert request.is_signature_valid and request.subject == old.subject
    assert request.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    new_key = serialization.load_pem_private_key((folder / "issuing-2.key").read_bytes(), PASSPHRASE)
    assert stat.S_IMODE((folder / "issuing-2.key").stat().st_mode) == 0o600
    assert request.public_key() == new_key.public_key() != old.public_key()
    for taken in (tmp_path / "new-ca.csr", tmp_path / "no-such-folder" / "new-ca.csr"):
        assert "name a new file in an existing folder" in refused(config, "--request", str(taken))
    assert not (folder / "issuing-3.key").exists()

    # Step two refuses what would not work, each in one line.
    other_root_key, other_root = make_root("est_app another root")
    wrong = {
        "another key": (certify(ec_key().public_key(), root_key, root), "certifies no key of a rollover request of ca"),
        "another subject": (certify(request.public_key(), root_key, root, subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])), "is not the CA's"),
        "not a CA": (certify(request.public_key(), root_key, root, ca=False), "not a CA certificate"),
        # CA:TRUE, but a key usage without keyCertSign (and crlSign): what it issued, and its CRLs, would not verify.
        "no keyCertSign": (certify(request.public_key(), root_key, root, key_usage=SIGNING_ONLY), "key usage lacks keyCertSign, cRLSign"),
        "another root": (certify(request.public_key(), other_root_key, other_root), "not issued by CN=est_app offline root"),
    }
    for name, (certificate, message) in wrong.items():
        write_certificate(tmp_path / "wrong.pem", certificate)
        assert message in refused(config, "--certificate", str(tmp_path / "wrong.pem")), name
    assert not (folder / "issuing-2.pem").exists()

    signed = certify(request.public_key(), root_key, root)
    write_certificate(tmp_path / "signed.pem", signed)
    output = rollover(config, "--certificate", str(tmp_path / "signed.pem"))
    assert "link certificates" not in output and f"new CA certificate: {folder / 'issuing-2.pem'}" in output
    assert "installed already" in refused(config, "--certificate", str(tmp_path / "signed.pem"))
    section = yaml.safe_load(config.read_text())["ca"]
    assert (section["cert_file"], section["key_file"]) == ("ca/issuing-2.pem", "ca/issuing-2.key")
    assert section["chain_file"] == str(folder / "root.pem") and "link_certificates_file" not in section
    assert section["previous"][0]["cert_file"] == str(folder / "issuing.pem")

    app, client = restarted(config)
    cacerts = certs_from(client.get("/.well-known/est/cacerts"))
    assert len(cacerts) == 3 and set(cacerts) == {signed, old, root}
    (good_key, good), (_, bad) = old_pumps
    new_pump, renewed = new_ca_issues(client, signed, "NPPINEW1", good_key, good)
    revoke(app, bad)
    old_crl = fetch_crl(client, "/crl")  # the address in the old certificates
    assert old_crl.is_signature_valid(old.public_key()) and revoked_serials(old_crl) == {bad.serial_number}
    assert fetch_crl(client, f"/crl/issuer/{issuer_id(signed)}").is_signature_valid(signed.public_key())
    answer = ocsp_post(client, ocsp_request(bad, old))
    assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert answer.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(old.public_key()).digest
    verify_both_generations(tmp_path, root, [c for c in cacerts if c != root], good, new_pump, renewed)
