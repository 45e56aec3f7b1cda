"""CA rollover (RFC 7030 4.1.3) of a CA whose key is in a PKCS#11 token (SoftHSM, for real).

`est-admin init --pkcs11-module ...` makes the CA in a fresh token; two pumps enroll from it;
`est-admin ca rollover` generates the new key in the same token under a label of its own (the
old key untouched, no key file written) and signs the new root and both link certificates with
the token's keys. An app on the rewritten configuration must issue from the new key, re-enroll an
old-CA pump into a new-CA certificate, keep signing the old CA's CRL and OCSP answers with the old
key, and publish a cacerts that openssl verifies both generations against. The same for an
intermediate CA in a token, in two steps: the new key's CSR is signed in the token.
"""

from __future__ import annotations

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from est_app.ca.authority import issuer_id
from est_app.ca.pkcs11 import generate_key_in_token

from .conftest import run_cli
from .e2e_clients import openssl, run
from .pki import ec_key, pem
from .softhsm import MODULE, PIN, key_attributes, token_pki_dir
from .test_enroll import certs_from
from .test_hsm import token_app
from .test_intermediate_rollover import certify, make_root, verify_both_generations, write_intermediate
from .test_label_ca import enroll, fetch_crl, revoke, revoked_serials
from .test_revocation import ocsp_post, ocsp_request
from .test_rollover import new_ca_issues, restarted

CRL_URL = "http://127.0.0.1:8445/crl"


@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-2048"])
def test_a_token_ca_rolls_over_inside_its_token(tmp_path, key_type):
    pki, token = token_pki_dir(tmp_path / "pki", key_type)
    config = pki / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["ca"]["crl_url"] = CRL_URL
    config.write_text(yaml.safe_dump(data))
    before = token_app(pki).test_client()
    old_pumps = []
    for cn in ("NPPHOLD1", "NPPHOLD2"):
        key = ec_key()
        old_pumps.append((key, enroll(before, cn, key=key)))
    # A key labelled like the next generation already in the token is left alone: the rollover numbers past it.
    squatter = generate_key_in_token(MODULE, token, PIN, "issuing-ca-2", "ec-p256")

    result = run_cli("ca", "rollover", config=config)
    assert result.exit_code == 0, result.output
    new_uri = f"pkcs11:token={token};object=issuing-ca-3"
    assert f"new CA key:         {new_uri}" in result.output
    section = yaml.safe_load(config.read_text())["ca"]
    assert section["key"] == new_uri and "key_file" not in section
    assert section["previous"][0]["key"] == f"pkcs11:token={token};object=issuing-ca"
    assert section["pkcs11_module"] == section["previous"][0]["pkcs11_module"] == str(MODULE)
    assert {p.name for p in pki.glob("*.key")} == {"tls.key"}  # no CA key on disk
    for label in ("issuing-ca", "issuing-ca-3"):  # both keys in the token, never extractable
        attributes = key_attributes(token, label)
        assert attributes["EXTRACTABLE"] is False and attributes["SENSITIVE"] and attributes["LOCAL"]

    old = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    new = x509.load_pem_x509_certificate((pki / "ca-3.pem").read_bytes())
    new_with_old, old_with_new = x509.load_pem_x509_certificates((pki / "ca-3-links.pem").read_bytes())
    assert new.subject == old.subject and new.public_key() not in (old.public_key(), squatter)
    assert isinstance(new.public_key(), ec.EllipticCurvePublicKey) == key_type.startswith("ec")
    assert new.public_key().key_size == old.public_key().key_size
    new.verify_directly_issued_by(new)
    new_with_old.verify_directly_issued_by(old)
    assert new_with_old.public_key() == new.public_key()
    old_with_new.verify_directly_issued_by(new)
    assert old_with_new.public_key() == old.public_key()

    app, client = restarted(config)
    assert set(certs_from(client.get("/.well-known/est/cacerts"))) == {new, old, new_with_old, old_with_new}
    (good_key, good), (_, bad) = old_pumps
    new_pump, renewed = new_ca_issues(client, new, "NPPHNEW1", good_key, good)

    # The old key, in the token, signs the old CA's CRL and OCSP answers.
    revoke(app, bad)
    old_crl = fetch_crl(client, f"/crl/issuer/{issuer_id(old)}")
    assert old_crl.is_signature_valid(old.public_key()) and revoked_serials(old_crl) == {bad.serial_number}
    assert fetch_crl(client, "/crl") == old_crl  # the address in the old certificates
    new_crl = fetch_crl(client, f"/crl/issuer/{issuer_id(new)}")
    assert new_crl.is_signature_valid(new.public_key()) and revoked_serials(new_crl) == set()
    for pump, status in ((bad, ocsp.OCSPCertStatus.REVOKED), (new_pump, ocsp.OCSPCertStatus.GOOD)):
        issuer = old if pump is bad else new
        answer = ocsp_post(client, ocsp_request(pump, issuer))
        assert answer.certificate_status == status
        assert answer.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest
        (tmp_path / "answer.der").write_bytes(answer.public_bytes(serialization.Encoding.DER))
        (tmp_path / "issuer.pem").write_bytes(pem(issuer))
        (tmp_path / "pump.pem").write_bytes(pem(pump))
        checked = run("openssl", "ocsp", "-respin", tmp_path / "answer.der", "-issuer", tmp_path / "issuer.pem",
                      "-cert", tmp_path / "pump.pem", "-CAfile", tmp_path / "issuer.pem", "-no_nonce")
        assert b"Response verify OK" in checked.stderr

    # openssl verifies both generations against cacerts: its two roots trusted, its links as path-builders.
    (tmp_path / "roots.pem").write_bytes(pem(old) + pem(new))
    (tmp_path / "links.pem").write_bytes(pem(new_with_old) + pem(old_with_new))
    for name, pump in (("old", good), ("new", new_pump), ("renewed", renewed)):
        (tmp_path / f"{name}.pem").write_bytes(pem(pump))
        verified = openssl("verify", "-CAfile", tmp_path / "roots.pem", "-untrusted", tmp_path / "links.pem", tmp_path / f"{name}.pem")
        assert verified.strip().endswith(b": OK")
    (tmp_path / "old-root.pem").write_bytes(pem(old))
    assert run("openssl", "verify", "-CAfile", tmp_path / "old-root.pem", tmp_path / "new.pem", check=False).returncode != 0
    reached = openssl("verify", "-CAfile", tmp_path / "old-root.pem", "-untrusted", tmp_path / "links.pem", tmp_path / "new.pem")
    assert reached.strip().endswith(b": OK")
    assert client.get("/readyz").status_code == 200


def test_an_intermediate_ca_in_a_token_rolls_over_in_two_steps(tmp_path):
    pki, token = token_pki_dir(tmp_path / "pki")
    token_key = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()).public_key()
    root_key, root = make_root("est_app offline root")
    old = write_intermediate(pki, root_key, root, public_key=token_key)  # the token's key, certified by the root
    config = pki / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["ca"].update(cert_file=str(pki / "issuing.pem"), chain_file=str(pki / "root.pem"))
    config.write_text(yaml.safe_dump(data))
    pump_key = ec_key()
    old_pump = enroll(token_app(pki).test_client(), "NPPHIOLD", key=pump_key)
    old_pump.verify_directly_issued_by(old)

    output = run_cli("ca", "rollover", "--request", str(tmp_path / "new-ca.csr"), config=config).output
    assert f"new CA key:         pkcs11:token={token};object=issuing-ca-2 (in the token, never extractable)" in output
    request = x509.load_pem_x509_csr((tmp_path / "new-ca.csr").read_bytes())
    assert request.is_signature_valid and request.subject == old.subject and request.public_key() != token_key  # signed in the token
    assert key_attributes(token, "issuing-ca-2")["EXTRACTABLE"] is False
    signed = certify(request.public_key(), root_key, root)
    (tmp_path / "signed.pem").write_bytes(pem(signed))
    result = run_cli("ca", "rollover", "--certificate", str(tmp_path / "signed.pem"), config=config)
    assert result.exit_code == 0, result.output
    section = yaml.safe_load(config.read_text())["ca"]
    assert section["key"] == f"pkcs11:token={token};object=issuing-ca-2" and section["cert_file"] == "issuing-2.pem"
    assert section["previous"][0]["key"] == f"pkcs11:token={token};object=issuing-ca"

    _, client = restarted(config)
    cacerts = certs_from(client.get("/.well-known/est/cacerts"))
    assert len(cacerts) == 3 and set(cacerts) == {signed, old, root}
    new_pump, renewed = new_ca_issues(client, signed, "NPPHINEW", pump_key, old_pump)
    answer = ocsp_post(client, ocsp_request(old_pump, old))
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answer.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(token_key).digest
    assert fetch_crl(client, f"/crl/issuer/{issuer_id(old)}").is_signature_valid(token_key)
    verify_both_generations(tmp_path, root, [old, signed], old_pump, new_pump, renewed)
