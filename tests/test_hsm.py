"""The CA key in a PKCS#11 token (SoftHSM), through the test client and the CLI.

For each key type `est-admin init --pkcs11-module ... --token ...` generates the CA key inside
the token: sensitive, never extractable, no private key of the CA on disk, no PIN in the YAML.
What the app signs with it (certificates, CRLs, OCSP responses) is checked with cryptography and
openssl. The token disappearing gives 503 + Retry-After on enrollment, tryLater on OCSP and a
failing /readyz, until it returns. A forked process opens its own session; threads share one.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509 import ocsp

from est_app import create_app
from est_app.ca.pkcs11 import PKCS11URI
from est_app.config import ConfigError, load_config, parse_config
from est_app.revocation import revoke
from est_app.state import state

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .e2e_clients import openssl, run
from .pki import der, make_csr, pem
from .server import BIN
from .softhsm import MODULE, PIN, key_attributes, softhsm, token_pki_dir

CSR_HEADERS = {"Content-Type": "application/pkcs10"}


def token_app(pki: Path):
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=pki / "config.yaml").exit_code == 0
    app = create_app(pki / "config.yaml")
    app.config["TESTING"] = True
    return app


def enroll(client, cn: str):
    return client.post("/.well-known/est/simpleenroll", data=base64.b64encode(der(make_csr(cn))), headers={**basic_auth(), **CSR_HEADERS})


def issued(response) -> x509.Certificate:
    assert response.status_code == 200, response.data
    return x509.load_pem_x509_certificates(openssl("pkcs7", "-inform", "DER", "-print_certs", input=base64.b64decode(response.data)))[0]


def ocsp_request(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1()).build()
    return request.public_bytes(serialization.Encoding.DER)


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("pkcs11:token=est-ca;object=issuing-ca", PKCS11URI("est-ca", "issuing-ca")),
        ("pkcs11:token=Hospital%20CA;id=%01%a2;type=private", PKCS11URI("Hospital CA", None, b"\x01\xa2")),
        ("pkcs11:object=ca;token=t;serial=42", PKCS11URI("t", "ca", None, "42")),
    ],
)
def test_uri_names_token_and_key(uri, expected):
    assert PKCS11URI.parse(uri) == expected


@pytest.mark.parametrize(
    "uri, message",
    [
        ("pkcs11:token=t;object=k?pin-value=1234", "the PIN never goes in the configuration"),
        ("pkcs11:token=t;object=k?module-path=/lib/x.so", "query attributes"),
        ("pkcs11:token=t;object=k;slot-id=1", "'slot-id=1' is not one of the attributes"),
        ("pkcs11:token=t;object=k;type=public", "names no private key"),
        ("pkcs11:token=t", "name the token and the key"),
    ],
)
def test_uri_refusals_say_what_is_wrong(uri, message):
    with pytest.raises(ConfigError, match="^ca.key: .*" + message.replace("?", r"\?")):
        PKCS11URI.parse(uri)


@pytest.mark.parametrize(
    "ca, message",
    [
        ({"key": "pkcs11:token=t;object=k", "pkcs11_module": str(MODULE), "pin_file": "/run/credentials/est.service/ca-pin"}, "set key_file .* or key"),
        ({"key_file": None, "key": "pkcs11:token=t;object=k"}, "key .* needs pkcs11_module and pin_file"),
        ({"key_file": None, "key": "token=t;object=k", "pkcs11_module": str(MODULE), "pin_file": "/p"}, "key must be a PKCS#11 URI"),
        ({"pin_file": "/p"}, "pkcs11_module and pin_file go with key"),
        ({"key_file": None, "key": "pkcs11:token=t;object=k", "pkcs11_module": str(MODULE), "pin_file": "/p", "key_passphrase_env": "X"}, "key_passphrase_env and key_passphrase_file are for key_file"),
    ],
)
def test_config_refuses_mixed_or_incomplete_key_settings(pki_dir, ca, message):
    data = yaml.safe_load((pki_dir / "config.yaml").read_text())
    data["ca"] = {k: v for k, v in {**data["ca"], **ca}.items() if v is not None}
    with pytest.raises(ConfigError, match=r"^configuration: ca: " + message):
        parse_config(data, base_dir=pki_dir)


# --- the key generated in the token, and what it signs ------------------------------------------------


@pytest.mark.parametrize("key_type, digest", [("ec-p256", "sha256"), ("ec-p384", "sha384"), ("rsa-2048", "sha256"), ("rsa-3072", "sha384")])
def test_key_generated_in_the_token_signs_certificates_crls_and_ocsp(tmp_path, key_type, digest):
    pki, token = token_pki_dir(tmp_path / "pki", key_type)

    # In the token, and only there: sensitive, never extractable; no private key of the CA on disk, no PIN in the YAML.
    attributes = key_attributes(token)
    assert attributes["EXTRACTABLE"] is False and attributes["SENSITIVE"] is True
    assert attributes["NEVER_EXTRACTABLE"] and attributes["ALWAYS_SENSITIVE"] and attributes["LOCAL"]
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_spki = ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for path in [*pki.rglob("*"), *softhsm().root.glob("*")]:
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
            key = serialization.load_pem_private_key(path.read_bytes(), None)
            assert key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != ca_spki, path
    assert not (pki / "ca.key").exists()
    config_text = (pki / "config.yaml").read_text()
    assert PIN not in config_text
    assert load_config(pki / "config.yaml").ca.key == f"pkcs11:token={token};object=issuing-ca"
    ca.verify_directly_issued_by(ca)
    x509.load_pem_x509_certificate((pki / "tls.pem").read_bytes()).verify_directly_issued_by(ca)

    config = yaml.safe_load(config_text)
    config["ca"].update(digest=digest, crl_url="http://127.0.0.1/crl", ocsp_url="http://127.0.0.1/ocsp")
    (pki / "config.yaml").write_text(yaml.safe_dump(config))
    app = token_app(pki)
    client = app.test_client()

    certificate = issued(enroll(client, "NPPHSM1"))
    certificate.verify_directly_issued_by(ca)
    assert certificate.signature_hash_algorithm.name == digest
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    assert openssl("verify", "-CAfile", tmp_path / "ca.pem", input=pem(certificate)).strip() == b"stdin: OK"

    run_cli("cert", "revoke", format(certificate.serial_number, "x"), "--reason", "keyCompromise", config=pki / "config.yaml")
    crl_der = client.get("/crl").data
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.is_signature_valid(ca.public_key()) and crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
    result = run("openssl", "crl", "-inform", "DER", "-CAfile", tmp_path / "ca.pem", "-noout", input=crl_der)
    assert b"verify OK" in result.stderr + result.stdout

    response_der = client.post("/ocsp", data=ocsp_request(certificate, ca), headers={"Content-Type": "application/ocsp-request"}).data
    response = ocsp.load_der_ocsp_response(response_der)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
    assert response.certificates == [ca]
    args = (ec.ECDSA(response.signature_hash_algorithm),) if key_type.startswith("ec") else (padding.PKCS1v15(), response.signature_hash_algorithm)
    ca.public_key().verify(response.signature, response.tbs_response_bytes, *args)
    (tmp_path / "response.der").write_bytes(response_der)
    (tmp_path / "cert.pem").write_bytes(pem(certificate))
    result = run("openssl", "ocsp", "-respin", tmp_path / "response.der", "-issuer", tmp_path / "ca.pem", "-cert", tmp_path / "cert.pem",
                 "-CAfile", tmp_path / "ca.pem", "-no_nonce")
    assert b"Response verify OK" in result.stderr and b"cert.pem: revoked" in result.stdout


def test_a_labels_own_ca_in_the_same_token_shares_its_session(tmp_path):
    pki, token = token_pki_dir(tmp_path / "pki")
    hsm = softhsm()
    result = run_cli(
        "init", "--dir", str(tmp_path / "pumps"), "--pkcs11-module", str(MODULE), "--token", token,
        "--pin-file", str(hsm.pin_file), "--object", "pump-ca", "--key-type", "ec-p384",
    )
    assert result.exit_code == 0, result.output
    pump_ca_section = yaml.safe_load((tmp_path / "pumps" / "config.yaml").read_text())["ca"]
    assert pump_ca_section["key"] == f"pkcs11:token={token};object=pump-ca"
    config = yaml.safe_load((pki / "config.yaml").read_text())
    config["labels"] = {"pumps": {"ca": pump_ca_section}}
    (pki / "config.yaml").write_text(yaml.safe_dump(config))
    app = token_app(pki)
    client = app.test_client()

    top, pump = (x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()) for d in (pki, tmp_path / "pumps"))
    assert top.public_key() != pump.public_key()
    issued(enroll(client, "NPPTOP1")).verify_directly_issued_by(top)
    response = client.post("/.well-known/est/pumps/simpleenroll", data=base64.b64encode(der(make_csr("NPPPUMP1"))), headers={**basic_auth(), **CSR_HEADERS})
    issued(response).verify_directly_issued_by(pump)
    with app.app_context():
        signers = [authority.signer for authority in state().authorities]
        assert len(signers) == 2 and signers[0]._token is signers[1]._token  # one login for the token
    assert client.get("/readyz").get_data(as_text=True) == "ready\n"

    config["labels"]["pumps"]["ca"]["pin_file"] = str(tmp_path / "other-pin")
    (pki / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"labels.pumps.ca.pin_file .*other-pin: ca names the same token with pin_file"):
        create_app(pki / "config.yaml")


def test_init_keeps_the_token_ca_and_refuses_a_file_key_folder(tmp_path, pki_dir):
    pki, token = token_pki_dir(tmp_path / "pki")
    before = (pki / "ca.pem").read_bytes()
    hsm = softhsm()
    args = ("--pkcs11-module", str(MODULE), "--token", token, "--pin-file", str(hsm.pin_file))
    result = run_cli("init", "--dir", str(pki), *args)
    assert result.exit_code == 0 and "kept the existing CA" in result.output, result.output
    assert (pki / "ca.pem").read_bytes() == before

    result = run_cli("init", "--dir", str(pki_dir), *args)  # a folder whose CA key is a file
    assert result.exit_code == 1 and "this folder's CA key is a file" in result.output
    result = run_cli("init", "--dir", str(tmp_path / "other"), "--token", token)
    assert result.exit_code == 2 and "--pkcs11-module, --token and --pin-file go together" in result.output
    result = run_cli("init", "--dir", str(tmp_path / "other"), *args)  # same token, same label: refused, nothing overwritten
    assert result.exit_code == 1 and "already holds a key labelled 'issuing-ca'" in result.output
    assert not (tmp_path / "other" / "ca.pem").exists()


def test_a_token_key_that_is_not_the_certificates_stops_start_up(tmp_path):
    pki, _ = token_pki_dir(tmp_path / "a")
    other, _ = token_pki_dir(tmp_path / "b")
    config = yaml.safe_load((pki / "config.yaml").read_text())
    config["ca"]["cert_file"] = str(other / "ca.pem")
    (pki / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="^ca.key: the key is in token .*, which is unavailable .*does not belong to the CA certificate"):
        create_app(pki / "config.yaml")


def test_a_wrong_pin_stops_start_up(tmp_path):
    pki, _ = token_pki_dir(tmp_path / "pki")
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not the pin\n")
    config = yaml.safe_load((pki / "config.yaml").read_text())
    config["ca"]["pin_file"] = str(wrong)
    (pki / "config.yaml").write_text(yaml.safe_dump(config))
    # In a process of its own, as the server starts (this one is logged in to the token already).
    result = run(BIN / "est-admin", "--config", pki / "config.yaml", "crl", check=False)
    assert result.returncode == 1
    assert re.search(rb"\nError: cannot sign the CRL without the CA key: ca.key: the key is in token .*, which is unavailable \(PinIncorrect\)\n$", result.stderr), result.stderr
    assert result.stderr.count(b"PinIncorrect") == 2  # one login tried (logged, then the error): a wrong PIN is never retried


# --- the token going away, forks and threads ---------------------------------------------------------


def test_token_away_is_503_try_later_and_not_ready_then_recovers(tmp_path):
    pki, token = token_pki_dir(tmp_path / "pki")
    app = token_app(pki)
    client = app.test_client()
    good = issued(enroll(client, "NPPAWAY1"))
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    assert client.get("/readyz").status_code == 200

    with softhsm().token_away(token):
        response = enroll(client, "NPPAWAY2")
        assert response.status_code == 503 and response.headers["Retry-After"] == "30"
        assert response.get_data(as_text=True) == f"the CA key's token '{token}' is unavailable; try again later\n"
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.get_data(as_text=True).startswith(f"not ready: ca key is in token '{token}', which is unavailable")
        answer = client.post("/ocsp", data=ocsp_request(good, ca), headers={"Content-Type": "application/ocsp-request"})
        assert answer.status_code == 200
        assert ocsp.load_der_ocsp_response(answer.data).response_status == ocsp.OCSPResponseStatus.TRY_LATER

    issued(enroll(client, "NPPAWAY3")).verify_directly_issued_by(ca)
    assert client.get("/readyz").get_data(as_text=True) == "ready\n"


def test_token_away_when_the_crl_is_due_serves_the_crl_held(tmp_path):
    # Past half its lifetime a CRL is re-signed at the next /crl; with the token away the one held is still valid
    # until its nextUpdate, and FreeRADIUS needs it: a 503 there would cost pumps the network once their copy expires.
    pki, token = token_pki_dir(tmp_path / "pki")
    app = token_app(pki)
    with app.app_context():
        crl = state().crl
        held = crl.current()
        due = held.this_update + (held.next_update - held.this_update) * 3 / 4
        with softhsm().token_away(token):
            assert crl.current(due).number == held.number
        assert crl.current(due).number > held.number  # the token back: re-signed


def test_a_revocation_with_the_token_away_stands_and_its_crl_is_signed_when_the_token_returns(tmp_path):
    pki, token = token_pki_dir(tmp_path / "pki")
    app = token_app(pki)
    client = app.test_client()
    pump = issued(enroll(client, "NPPAWAY5"))
    before = x509.load_der_x509_crl(client.get("/crl").data)
    with softhsm().token_away(token):
        with app.app_context():
            assert revoke(format(pump.serial_number, "x"), "keyCompromise", "test:admin").status == "revoked"
        ready = client.get("/readyz").get_data(as_text=True)
        assert f"ca key is in token '{token}', which is unavailable" in ready and "; crl is stale: it lacks revocations made since " in ready
        assert client.get("/crl").data == before.public_bytes(serialization.Encoding.DER)  # the CRL held
    after = x509.load_der_x509_crl(client.get("/crl").data)
    assert [entry.serial_number for entry in after] == [pump.serial_number]
    assert client.get("/readyz").get_data(as_text=True) == "ready\n"


def test_a_forked_process_signs_on_its_own_session_and_threads_share_one(tmp_path):
    pki, _ = token_pki_dir(tmp_path / "pki")
    app = token_app(pki)
    with app.app_context():
        authority = state().authority
        ca = authority.certificate
        assert authority.signer.probe(ca.public_key()) is None  # the parent's session is open

        pid = os.fork()
        if pid == 0:  # the child: a worker after gunicorn's fork
            try:
                code = 0 if authority.signer.probe(ca.public_key()) is None else 1
            except BaseException:
                code = 2
            os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        # The child neither closed nor logged out the parent's session.
        assert authority.signer.probe(ca.public_key()) is None

        results: list = []

        def sign() -> None:
            for _ in range(20):
                results.append(authority.signer.probe(ca.public_key()))

        threads = [threading.Thread(target=sign) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [None] * 160


# --- the systemd unit with each token drop-in ------------------------------------------------------

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "est.service"
DROP_INS = sorted((UNIT.parent / "est.service.d").glob("pkcs11-*.conf"))


def unit_with(drop_in: Path | None, directory: Path) -> Path:
    """The unit as systemd would merge it with ``drop_in`` (a drop-in is read after the unit, in the same
    sections), its ExecStart pointed at this venv's est-server (verify insists the binary exists)."""
    text = UNIT.read_text().replace("/opt/est/venv/bin/est-server", str(BIN / "est-server"))
    unit = directory / "est.service"
    unit.write_text(text + ("\n" + drop_in.read_text() if drop_in else ""))
    return unit


def exposure(unit: Path) -> float:
    result = run("systemd-analyze", "security", "--offline=true", unit, check=False)
    return float(re.search(rb"Overall exposure level for est.service: ([0-9.]+)", result.stdout).group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("drop_in", DROP_INS, ids=[d.stem for d in DROP_INS])
def test_token_drop_ins_verify_and_stay_hardened(drop_in, tmp_path):
    assert {d.stem for d in DROP_INS} == {"pkcs11-softhsm", "pkcs11-usb", "pkcs11-network"}
    unit = unit_with(drop_in, tmp_path)
    result = run("systemd-analyze", "verify", unit, check=False)
    complaints = [line for line in (result.stdout + result.stderr).decode().splitlines() if "est.service" in line]
    assert result.returncode == 0 and not complaints, complaints
    entries = [line.split("=", 1) for line in drop_in.read_text().splitlines() if "=" in line and not line.startswith("#")]
    assert entries[:2] == [["LoadCredential", ""], ["LoadCredential", "ca-pin:/etc/est/ca-pin"]]  # the PIN, not the passphrase
    base = exposure(unit_with(None, tmp_path))
    assert exposure(unit) <= base + 0.3, "a token drop-in may open only what the token needs"
