"""CA rollover (RFC 7030 4.1.3) through `est-admin ca rollover`, the Flask test client and the CLI.

A root CA with an encrypted key file issues two pumps; `ca rollover` rewrites the configuration;
an app built from the rewritten file must: answer cacerts with both CAs and both link
certificates, issue from the new key, re-enroll an old-CA pump into a new-CA certificate, keep
signing CRLs and OCSP answers for old-CA certificates with the old key, and count each CA's
certificates in `ca status` and /readyz.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from est_app import create_app
from est_app.ca.authority import issuer_id
from est_app.ca.development import create_root_ca, write_certificate, write_private_key
from est_app.config import ConfigError
from est_app.state import state

from .conftest import run_cli
from .pki import ec_key, make_csr
from .test_dashboard import Browser, make_dashboard  # noqa: F401  (a fixture)
from .test_enroll import certs_from
from .test_label_ca import app_config, enroll, fetch_crl, issued, revoke, revoked_serials
from .test_protocol import post
from .test_revocation import ocsp_post, ocsp_request

PASSPHRASE_ENV = "EST_TEST_ROLLOVER_PASSPHRASE"
PASSPHRASE = b"rollover test passphrase"
CRL_URL = "https://est.example:8445/crl"


@dataclass
class Rolled:
    """The state after a rollover: the app on the rewritten configuration, the CAs, the pumps the old CA issued."""

    app: object
    config: Path
    old: x509.Certificate
    new: x509.Certificate
    links: list[x509.Certificate]
    old_pumps: list[tuple[object, x509.Certificate]]  # (key, certificate)


def write_root_ca(directory: Path, common_name: str, days: int = 3650) -> tuple[Path, Path, x509.Certificate]:
    """A root CA in ``directory``: ca.pem and ca.key, the key encrypted with PASSPHRASE."""
    directory.mkdir(exist_ok=True)
    key, certificate = create_root_ca(common_name, days)
    write_certificate(directory / "ca.pem", certificate)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(PASSPHRASE)
    )
    (directory / "ca.key").write_bytes(encrypted)
    os.chmod(directory / "ca.key", 0o600)
    return directory / "ca.pem", directory / "ca.key", certificate


@pytest.fixture
def ca_files(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE.decode())
    return write_root_ca(tmp_path / "ca", "est_app rollover test CA")


def ca_section(cert_file: Path, key_file: Path, **extra) -> dict:
    return {"cert_file": str(cert_file), "key_file": str(key_file), "key_passphrase_env": PASSPHRASE_ENV, **extra}


@pytest.fixture
def rolled(make_app, ca_files) -> Rolled:
    cert_file, key_file, old = ca_files
    before = make_app(ca=ca_section(cert_file, key_file, cert_validity_days=30, crl_url=CRL_URL))
    client = before.test_client()
    old_pumps = []
    for cn in ("NPPOLD1", "NPPOLD2"):
        key = ec_key()
        old_pumps.append((key, enroll(client, cn, key=key)))
    config = app_config(before)
    result = run_cli("ca", "rollover", config=config)
    assert result.exit_code == 0, result.output
    app, _ = restarted(config)
    section = yaml.safe_load(config.read_text())["ca"]
    new = x509.load_pem_x509_certificate((config.parent / section["cert_file"]).read_bytes())
    links = x509.load_pem_x509_certificates((config.parent / section["link_certificates_file"]).read_bytes())
    return Rolled(app, config, old, new, links, old_pumps)


def restarted(config: Path):
    """The app a restart on the rewritten configuration gives: (app, its test client)."""
    app = create_app(config)
    app.config["TESTING"] = True
    return app, app.test_client()


def new_ca_issues(client, new_ca: x509.Certificate, new_cn: str, old_pump_key, old_pump: x509.Certificate, label=None):
    """A new device enrolls and an old-CA device re-enrolls, both from ``new_ca``: (new pump, renewed pump)."""
    new_pump = enroll(client, new_cn, label=label)
    new_pump.verify_directly_issued_by(new_ca)
    old_cn = old_pump.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    renewed = issued(post(client, "simplereenroll", make_csr(old_cn, key=old_pump_key), label=label, cert=old_pump))
    renewed.verify_directly_issued_by(new_ca)
    assert renewed.subject == old_pump.subject
    return new_pump, renewed


def test_rollover_writes_a_new_root_and_both_links_beside_the_old_files(rolled, ca_files):
    cert_file, key_file, old = ca_files
    assert cert_file.read_bytes() == old.public_bytes(serialization.Encoding.PEM)  # untouched
    new = rolled.new
    assert new.subject == old.subject == new.issuer and new.public_key() != old.public_key()
    new.verify_directly_issued_by(new)
    new_key_file = cert_file.with_name("ca-2.key")
    assert stat.S_IMODE(new_key_file.stat().st_mode) == 0o600
    with pytest.raises(TypeError):  # encrypted like the old one
        serialization.load_pem_private_key(new_key_file.read_bytes(), None)
    new_key = serialization.load_pem_private_key(new_key_file.read_bytes(), PASSPHRASE)
    assert new_key.public_key() == new.public_key()
    new_with_old, old_with_new = rolled.links
    assert new_with_old.public_key() == new.public_key() and new_with_old.issuer == old.subject
    new_with_old.verify_directly_issued_by(old)
    assert old_with_new.public_key() == old.public_key()
    old_with_new.verify_directly_issued_by(new)
    section = yaml.safe_load(rolled.config.read_text())["ca"]
    assert section["previous"][0]["cert_file"] == str(cert_file) and section["previous"][0]["key_file"] == str(key_file)
    assert rolled.config.with_name("config.yaml.before-rollover-1").is_file()
    # A second rollover numbers on and retires both older CAs.
    result = run_cli("ca", "rollover", config=rolled.config)
    assert result.exit_code == 0, result.output
    section = yaml.safe_load(rolled.config.read_text())["ca"]
    assert section["cert_file"].endswith("ca-3.pem")
    assert [rolled.config.parent / p["cert_file"] for p in section["previous"]] == [cert_file.with_name("ca-2.pem"), cert_file]


def test_cacerts_answers_both_cas_and_the_link_certificates(rolled):
    certificates = certs_from(rolled.app.test_client().get("/.well-known/est/cacerts"))
    assert len(certificates) == 4  # a SET OF: DER sorts it, so no order
    assert set(certificates) == {rolled.new, rolled.old, *rolled.links}


def test_new_certificates_come_from_the_new_key(rolled):
    pump = enroll(rolled.app.test_client(), "NPPNEW1")
    pump.verify_directly_issued_by(rolled.new)
    with rolled.app.app_context():
        assert state().store.get_certificate(format(pump.serial_number, "x")).issuer == issuer_id(rolled.new)


def test_reenrollment_with_an_old_ca_certificate_yields_a_new_ca_one(rolled):
    key, old_pump = rolled.old_pumps[0]
    renewed = issued(post(rolled.app.test_client(), "simplereenroll", make_csr("NPPOLD1", key=key), cert=old_pump))
    renewed.verify_directly_issued_by(rolled.new)
    assert renewed.subject == old_pump.subject


def test_the_old_key_signs_crls_and_ocsp_answers_for_what_it_issued(rolled):
    client = rolled.app.test_client()
    (_, good), (_, bad) = rolled.old_pumps
    revoke(rolled.app, bad)
    old_crl = fetch_crl(client, f"/crl/issuer/{issuer_id(rolled.old)}")
    assert old_crl.is_signature_valid(rolled.old.public_key())
    assert revoked_serials(old_crl) == {bad.serial_number}
    # The address in the old certificates, /crl, still serves the old CA's CRL; the new CA's certificates name their own.
    assert crl_url_of(good) == CRL_URL and fetch_crl(client, "/crl") == old_crl
    assert x509.load_pem_x509_crl(client.get("/crl.pem").get_data()) == old_crl
    new_pump = enroll(client, "NPPNEW3")
    new_path = f"/crl/issuer/{issuer_id(rolled.new)}"
    assert crl_url_of(new_pump) == "https://est.example:8445" + new_path
    new_crl = fetch_crl(client, new_path)
    assert new_crl.is_signature_valid(rolled.new.public_key()) and revoked_serials(new_crl) == set()
    for pump, status in ((good, ocsp.OCSPCertStatus.GOOD), (bad, ocsp.OCSPCertStatus.REVOKED)):
        answer = ocsp_post(client, ocsp_request(pump, rolled.old))
        assert answer.certificate_status == status
        assert answer.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(rolled.old.public_key()).digest
    # A revoked old-CA certificate cannot re-enroll.
    response = post(client, "simplereenroll", make_csr("NPPOLD2", key=rolled.old_pumps[1][0]), cert=bad)
    assert response.status_code == 401 and "revoked" in response.get_data(as_text=True)
    assert client.get(f"/crl/issuer/{'0' * 64}").status_code == 404


def crl_url_of(certificate: x509.Certificate) -> str:
    (point,) = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return point.full_name[0].value


def test_status_and_readyz_count_each_cas_certificates(rolled):
    enroll(rolled.app.test_client(), "NPPNEW2")
    result = run_cli("ca", "status", "--json", config=rolled.config)
    assert result.exit_code == 0, result.output
    statuses = {s["name"]: s for s in map(json.loads, result.output.splitlines())}
    assert statuses["ca"]["role"] == "issuing" and statuses["ca"]["valid_certificates"] == 1
    assert statuses["ca.previous[0]"]["role"] == "retired" and statuses["ca.previous[0]"]["valid_certificates"] == 2
    assert statuses["ca.previous[0]"]["issuer_id"] == issuer_id(rolled.old)
    assert statuses["ca"]["warning"] is None
    response = rolled.app.test_client().get("/readyz")
    assert response.status_code == 200
    lines = response.get_data(as_text=True).splitlines()
    assert lines[0] == "ready"
    assert f"ca: issuing, expires {rolled.new.not_valid_after_utc:%Y-%m-%d}, 1 valid certificates" in lines
    assert f"ca.previous[0]: retired, expires {rolled.old.not_valid_after_utc:%Y-%m-%d}, 2 valid certificates" in lines


def test_a_ca_expiring_before_its_longest_validity_is_warned_about(make_dashboard, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE.decode())
    cert_file, key_file, _ = write_root_ca(tmp_path / "short", "est_app short-lived CA", days=20)
    app = make_dashboard(ca=ca_section(cert_file, key_file, cert_validity_days=30))
    assert "longest certificate validity (30 days)" in caplog.text  # logged when the app starts
    result = run_cli("ca", "status", config=app_config(app))
    assert result.exit_code == 0, result.output
    assert "warning: ca expires on" in result.stderr and "longest certificate validity (30 days)" in result.stderr
    browser = Browser(app)
    assert browser.login().status_code == 302
    page = browser.get("/admin/").get_data(as_text=True)
    assert 'role="alert">ca expires on' in page and "roll it over" in page


def test_no_warning_while_the_ca_outlives_its_certificates(make_dashboard, ca_files):
    app = make_dashboard(ca=ca_section(*ca_files[:2], cert_validity_days=30))
    browser = Browser(app)
    assert browser.login().status_code == 302
    assert "roll it over" not in browser.get("/admin/").get_data(as_text=True)


def test_a_root_ca_refuses_the_intermediate_steps_in_one_line(make_config, ca_files, tmp_path):
    config = make_config(ca=ca_section(*ca_files[:2]))
    before = config.read_text()
    for option in ("--request", "--certificate"):
        result = run_cli("ca", "rollover", option, str(ca_files[0]), config=config)
        assert result.exit_code == 1
        assert f"ca is a root CA: roll it over in one step, ca rollover without {option}" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert config.read_text() == before and not (tmp_path / "ca" / "ca-2.key").exists()


def test_an_expired_retired_ca_is_skipped_with_a_warning(make_app, ca_files, tmp_path, caplog):
    key = ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est_app expired CA")])
    now = datetime.now(timezone.utc)
    expired = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=30)).not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_certificate(tmp_path / "expired.pem", expired)
    write_private_key(tmp_path / "expired.key", key)
    previous = [{"cert_file": str(tmp_path / "expired.pem"), "key_file": str(tmp_path / "expired.key")}]
    app = make_app(ca=ca_section(*ca_files[:2], previous=previous))
    assert "ca.previous[0] " in caplog.text and "leave it out of the configuration" in caplog.text
    assert certs_from(app.test_client().get("/.well-known/est/cacerts")) == [ca_files[2]]
    assert app.test_client().get("/readyz").get_data(as_text=True) == "ready\n"


def test_a_retired_ca_has_no_previous_of_its_own(make_settings, ca_files):
    inner = ca_section(*ca_files[:2])
    with pytest.raises(ConfigError, match="a retired CA has no previous"):
        make_settings(ca=ca_section(*ca_files[:2], previous=[{**inner, "previous": [inner]}]))


def test_a_labels_own_ca_rolls_over_and_the_default_ca_does_not(make_app, ca_files, tmp_path):
    pump_cert_file, pump_key_file, pump_old = write_root_ca(tmp_path / "pumps", "est_app pump CA")
    labels = {"pumps": {"ca": ca_section(pump_cert_file, pump_key_file, crl_url="https://est.example:8445/crl/pumps")}}
    before = make_app(ca=ca_section(*ca_files[:2]), labels=labels)
    pump_key = ec_key()
    old_pump = enroll(before.test_client(), "NPPLBL1", label="pumps", key=pump_key)
    config = app_config(before)
    default_before = yaml.safe_load(config.read_text())["ca"]

    result = run_cli("ca", "rollover", "--label", "pumps", config=config)
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(config.read_text())
    assert data["ca"] == default_before and not ca_files[0].with_name("ca-2.pem").exists()
    section = data["labels"]["pumps"]["ca"]
    assert section["previous"][0]["cert_file"] == str(pump_cert_file)
    pump_new = x509.load_pem_x509_certificate((config.parent / section["cert_file"]).read_bytes())
    links = x509.load_pem_x509_certificates((config.parent / section["link_certificates_file"]).read_bytes())
    assert pump_new.subject == pump_old.subject and pump_new.public_key() != pump_old.public_key()

    _, client = restarted(config)
    label_cacerts = certs_from(client.get("/.well-known/est/pumps/cacerts"))
    assert len(label_cacerts) == 4 and set(label_cacerts) == {pump_new, pump_old, *links}
    assert certs_from(client.get("/.well-known/est/cacerts")) == [ca_files[2]]
    new_ca_issues(client, pump_new, "NPPLBL2", pump_key, old_pump, label="pumps")
    enroll(client, "NPPDEF1").verify_directly_issued_by(ca_files[2])
