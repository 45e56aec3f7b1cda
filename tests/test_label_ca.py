"""A label with its own issuing CA (``labels.pumps.ca``), through the Flask test client and the CLI.

The pump CA is a second CA made with the development helpers (the ``pump_ca_dir`` fixture).
Checked: cacerts per label; every issuing operation on the label signs with the pump CA and
records it as the issuer; re-enrollment with a pump certificate; one CRL per CA holding exactly
its own revocations, signed by it, numbered upwards; OCSP answered by the CA the request names
(``unauthorized`` for any other); readiness and `est-admin crl` per CA; configuration mistakes
named by key; and a database from before issuers were recorded, upgraded in place.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from est_app import create_app
from est_app.ca.authority import issuer_id
from est_app.ca.development import create_root_ca, write_certificate, write_private_key
from est_app.ca.signers import FileSigner
from est_app.config import ConfigError
from est_app.state import state

from .conftest import run_cli
from .pki import ec_key, encrypt_key_file, make_csr
from .test_enroll import certs_from
from .test_migrations import migrate
from .test_protocol import post, serverkeygen_parts
from .test_revocation import key_hash, mint_responder, ocsp_post, ocsp_request, verify_signature, write_pem_files

CRL_URL, PUMP_CRL_URL, OCSP_URL = "https://est.example/crl", "https://est.example/crl/pumps", "https://est.example/ocsp"


def load_pair(directory: Path, stem: str) -> tuple[object, x509.Certificate]:
    key = serialization.load_pem_private_key((directory / f"{stem}.key").read_bytes(), None)
    return key, x509.load_pem_x509_certificate((directory / f"{stem}.pem").read_bytes())


@pytest.fixture(scope="module")
def default_ca(pki_dir):
    return load_pair(pki_dir, "ca")


@pytest.fixture(scope="module")
def pump_ca(pump_ca_dir):
    return load_pair(pump_ca_dir, "pump-ca")


def pump_ca_section(pump_ca_dir: Path, **extra) -> dict:
    return {
        "cert_file": str(pump_ca_dir / "pump-ca.pem"),
        "key_file": str(pump_ca_dir / "pump-ca.key"),
        "crl_url": PUMP_CRL_URL,
        "ocsp_url": OCSP_URL,
        "cert_validity_days": 90,
        **extra,
    }


def label_config(pump_ca_dir: Path, pump_ca: dict | None = None, **overrides) -> dict:
    """Overrides for make_config/make_app: label ``pumps`` has the pump CA (or ``pump_ca``), label ``other`` has none."""
    labels = {"pumps": {"ca": pump_ca or pump_ca_section(pump_ca_dir)}, "other": {}}
    overrides["ca"] = {"crl_url": CRL_URL, "ocsp_url": OCSP_URL, **overrides.get("ca", {})}
    return {"labels": labels, "bootstrap_enabled": True, **overrides}


@pytest.fixture
def make_label_app(make_app, pump_ca_dir):
    return lambda pump_ca=None, **overrides: make_app(**label_config(pump_ca_dir, pump_ca, **overrides))


@pytest.fixture
def refused_config(make_config, pump_ca_dir):
    """``refused_config(pattern, pump_ca=..., **overrides)``: building that app stops with a ConfigError matching ``pattern``."""

    def check(pattern: str, pump_ca: dict | None = None, **overrides) -> None:
        with pytest.raises(ConfigError, match=pattern):
            create_app(make_config(**label_config(pump_ca_dir, pump_ca, **overrides)))

    return check


@pytest.fixture
def app(make_label_app):
    """The label app; conftest's ``client`` fixture serves it."""
    return make_label_app()


def issued(response) -> x509.Certificate:
    assert response.status_code == 200, response.get_data(as_text=True)
    (cert,) = certs_from(response)
    return cert


def enroll(client, cn: str, label: str | None = None, key=None) -> x509.Certificate:
    return issued(post(client, "simpleenroll", make_csr(cn, key=key or ec_key()), label=label, basic=True))


def record(app, cert: x509.Certificate):
    with app.app_context():
        return state().store.get_certificate(format(cert.serial_number, "x"))


def pointers(cert: x509.Certificate) -> tuple[str, str]:
    """(CRL distribution point, OCSP responder) written into a certificate."""
    (point,) = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    (access,) = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert access.access_method == AuthorityInformationAccessOID.OCSP
    return point.full_name[0].value, access.access_location.value


def revoke(app, cert: x509.Certificate, reason: str = "keyCompromise") -> None:
    result = run_cli("cert", "revoke", format(cert.serial_number, "x"), "--reason", reason, config=app_config(app))
    assert result.exit_code == 0, result.output


def app_config(app) -> Path:
    with app.app_context():
        database = Path(state().store.engine.url.database)
    return database.parent / "config.yaml"  # make_config writes both into the test's tmp_path


def fetch_crl(client, path: str) -> x509.CertificateRevocationList:
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(response.get_data())


def revoked_serials(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def request_under(ca: x509.Certificate, serial: int) -> bytes:
    """An OCSP request for ``serial`` naming ``ca`` as the issuer (its name and key hashes)."""
    probe = ocsp.load_der_ocsp_request(ocsp_request(ca, ca))  # the CA as its own issuer: its hashes
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(probe.issuer_name_hash, probe.issuer_key_hash, serial, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


# --- cacerts and issuing -------------------------------------------------------------------------


def test_cacerts_answers_each_label_with_its_own_ca(client, default_ca, pump_ca):
    assert certs_from(client.get("/.well-known/est/pumps/cacerts")) == [pump_ca[1]]
    for path in ("/.well-known/est/cacerts", "/.well-known/est/other/cacerts"):
        assert certs_from(client.get(path)) == [default_ca[1]]


def test_every_issuing_operation_on_the_label_signs_with_its_ca(app, client, default_ca, pump_ca):
    enrolled = enroll(client, "NPPENR1", label="pumps")
    (_, _, certs_der) = serverkeygen_parts(post(client, "serverkeygen", make_csr("NPPKEY1"), label="pumps", basic=True))[1]
    (generated,) = pkcs7.load_der_pkcs7_certificates(certs_der)
    bootstrapped = issued(post(client, "bootstrap", make_csr("NPPBOOT1"), label="pumps", basic=True))
    for cert in (enrolled, generated, bootstrapped):
        cert.verify_directly_issued_by(pump_ca[1])
        with pytest.raises(ValueError):  # the issuer name is not the default CA's
            cert.verify_directly_issued_by(default_ca[1])
        assert pointers(cert) == (PUMP_CRL_URL, OCSP_URL)
        assert record(app, cert).issuer == issuer_id(pump_ca[1])
    # The label's CA section gives its certificates' validity (90 days) unless the label says otherwise.
    assert enrolled.not_valid_after_utc - enrolled.not_valid_before_utc == timedelta(days=90, minutes=5)
    for label in (None, "other"):
        cert = enroll(client, f"NPPDEF{label or ''}", label=label)
        cert.verify_directly_issued_by(default_ca[1])
        assert pointers(cert) == (CRL_URL, OCSP_URL)
        assert record(app, cert).issuer == issuer_id(default_ca[1])


def test_enrollment_answer_with_chain_carries_the_label_ca(make_label_app, pump_ca):
    client = make_label_app(include_chain=True).test_client()
    response = post(client, "simpleenroll", make_csr("NPPCHAIN"), label="pumps", basic=True)
    certs = certs_from(response)  # a DER SET OF: in no particular order
    assert len(certs) == 2 and pump_ca[1] in certs
    (leaf,) = [cert for cert in certs if cert != pump_ca[1]]
    leaf.verify_directly_issued_by(pump_ca[1])


def test_reenrollment_with_a_pump_certificate_issues_from_the_pump_ca(app, client, pump_ca):
    key = ec.generate_private_key(ec.SECP256R1())
    old = enroll(client, "NPPRE1", label="pumps", key=key)
    # strongSwan and others re-enroll on the unlabelled path: the label the old certificate was issued on decides.
    new = issued(post(client, "simplereenroll", make_csr("NPPRE1", key=key), cert=old))
    new.verify_directly_issued_by(pump_ca[1])
    assert record(app, new).issuer == issuer_id(pump_ca[1]) and record(app, new).label == "pumps"
    assert record(app, old).status == "superseded"


# --- CRLs ----------------------------------------------------------------------------------------


def test_each_ca_has_its_own_crl_with_exactly_its_revocations(app, client, default_ca, pump_ca):
    stolen, spare = enroll(client, "NPPSTOL", label="pumps"), enroll(client, "NPPSPAR", label="pumps")
    laptop, other = enroll(client, "laptop-1"), enroll(client, "laptop-2", label="other")
    pump_number, default_number = crl_number(fetch_crl(client, "/crl/pumps")), crl_number(fetch_crl(client, "/crl"))
    revoke(app, stolen)
    revoke(app, laptop)

    pump_crl = fetch_crl(client, "/crl/pumps")
    assert pump_crl.issuer == pump_ca[1].subject and pump_crl.is_signature_valid(pump_ca[1].public_key())
    assert not pump_crl.is_signature_valid(default_ca[1].public_key())
    assert pump_crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == key_hash(pump_ca[1].public_key())
    assert revoked_serials(pump_crl) == {stolen.serial_number}
    top_crl = fetch_crl(client, "/crl")
    assert top_crl.issuer == default_ca[1].subject and top_crl.is_signature_valid(default_ca[1].public_key())
    assert revoked_serials(top_crl) == {laptop.serial_number}
    # A label without a CA of its own is served the top-level CA's CRL.
    assert fetch_crl(client, "/crl/other") == top_crl

    # Each CA's numbers only go up; revoking a pump re-signs the pump CRL alone.
    assert crl_number(pump_crl) > pump_number and crl_number(top_crl) > default_number
    revoke(app, spare, "cessationOfOperation")
    again = fetch_crl(client, "/crl/pumps")
    assert crl_number(again) > crl_number(pump_crl) and revoked_serials(again) == {stolen.serial_number, spare.serial_number}
    assert fetch_crl(client, "/crl") == top_crl and other.serial_number not in revoked_serials(again)

    pem_reply = client.get("/crl/pumps.pem")
    assert pem_reply.status_code == 200 and pem_reply.headers["Content-Type"] == "application/x-pem-file"
    assert x509.load_pem_x509_crl(pem_reply.get_data()) == again


def test_crl_of_an_unknown_label_is_a_plain_404(client):
    for path in ("/crl/nope", "/crl/nope.pem", "/crl/default"):
        response = client.get(path)
        assert response.status_code == 404 and response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert "unknown EST label" in response.get_data(as_text=True)
    assert client.get("/crl").status_code == 200


# --- OCSP ----------------------------------------------------------------------------------------


def test_ocsp_answers_with_the_ca_the_request_names(app, client, default_ca, pump_ca):
    stolen, good = enroll(client, "NPPOCS1", label="pumps"), enroll(client, "NPPOCS2", label="pumps")
    laptop = enroll(client, "laptop-ocsp")
    revoke(app, stolen)

    for cert, ca, status in ((stolen, pump_ca, ocsp.OCSPCertStatus.REVOKED), (good, pump_ca, ocsp.OCSPCertStatus.GOOD),
                             (laptop, default_ca, ocsp.OCSPCertStatus.GOOD)):
        response = ocsp_post(client, ocsp_request(cert, ca[1]))
        assert response.certificate_status == status
        assert response.certificates == [ca[1]] and response.responder_key_hash == key_hash(ca[1].public_key())
        verify_signature(ca[1].public_key(), response.signature, response.tbs_response_bytes, response.signature_hash_algorithm)

    # A pump's serial asked about under the top-level CA (and the reverse): that CA did not issue it.
    for cert, ca in ((good, default_ca), (laptop, pump_ca)):
        response = ocsp_post(client, request_under(ca[1], cert.serial_number))
        assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN and response.certificates == [ca[1]]

    # An issuer this server does not run: not authorised to answer (RFC 6960 2.3).
    _, foreign = create_root_ca("Some other hospital CA")
    assert ocsp_post(client, ocsp_request(good, foreign)).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_a_delegated_responder_answers_only_for_the_ca_that_certified_it(make_label_app, refused_config, default_ca, pump_ca, pump_ca_dir, tmp_path):
    responder, responder_key = mint_responder(*default_ca)
    cert_file, key_file = write_pem_files(tmp_path, "ocsp-responder", responder, responder_key)
    files = {"ocsp_responder_cert_file": str(cert_file), "ocsp_responder_key_file": str(key_file)}
    client = make_label_app(ca=files).test_client()
    laptop, pump = enroll(client, "laptop-del"), enroll(client, "NPPDEL1", label="pumps")
    assert ocsp_post(client, ocsp_request(laptop, default_ca[1])).certificates == [responder]
    response = ocsp_post(client, ocsp_request(pump, pump_ca[1]))
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD and response.certificates == [pump_ca[1]]
    verify_signature(pump_ca[1].public_key(), response.signature, response.tbs_response_bytes, response.signature_hash_algorithm)

    # The top-level CA's responder cannot be the pump CA's.
    refused_config(r"labels\.pumps\.ca\.ocsp_responder_cert_file .*must be issued by the CA", pump_ca=pump_ca_section(pump_ca_dir, **files))


# --- readiness and the CLI -----------------------------------------------------------------------


def test_readyz_checks_every_ca(app, client, pump_ca):
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        pump_issuer = issuer_id(pump_ca[1])
        assert state().store.current_crl_number(pump_issuer) is not None  # readiness signed the pump CA's first CRL
        state().authorities.for_label("pumps")._signer = FileSigner(ec.generate_private_key(ec.SECP256R1()))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_data(as_text=True) == "not ready: labels.pumps.ca key does not match the CA certificate\n"


def test_cli_crl_re_signs_each_ca(app):
    config = app_config(app)
    result = run_cli("crl", config=config)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("(ca: CN=est_app development CA)") and lines[1].endswith("(labels.pumps.ca: CN=est_app test pump CA)")
    result = run_cli("crl", "--label", "pumps", config=config)
    assert result.exit_code == 0 and result.output.count("\n") == 1 and "labels.pumps.ca" in result.output
    result = run_cli("crl", "--label", "nope", config=config)
    assert result.exit_code == 1 and "no label 'nope'" in result.output


# --- configuration -------------------------------------------------------------------------------


def test_label_ca_paths_are_relative_to_the_config_and_checked(make_label_app, refused_config, pump_ca_dir, pump_ca, tmp_path):
    for name in ("pump-ca.pem", "pump-ca.key"):
        shutil.copy(pump_ca_dir / name, tmp_path / name)
    client = make_label_app(pump_ca={"cert_file": "pump-ca.pem", "key_file": "pump-ca.key"}).test_client()
    assert certs_from(client.get("/.well-known/est/pumps/cacerts")) == [pump_ca[1]]
    refused_config(r"labels\.pumps\.ca\.cert_file: no such file: .*missing\.pem", pump_ca={"cert_file": "missing.pem", "key_file": "pump-ca.key"})
    refused_config(r"labels\.pumps\.ca\.colour: unknown key", pump_ca={"cert_file": "pump-ca.pem", "key_file": "pump-ca.key", "colour": "blue"})
    refused_config(r"labels\.pumps\.ca\.cert_file: required key is missing", pump_ca={"key_file": "pump-ca.key"})


def test_label_ca_key_mismatch_and_expiry_stop_start(refused_config, pump_ca_dir, pki_dir, tmp_path):
    mismatch = {"cert_file": str(pump_ca_dir / "pump-ca.pem"), "key_file": str(pki_dir / "ca.key")}
    refused_config(r"labels\.pumps\.ca\.key_file .* does not belong to labels\.pumps\.ca\.cert_file", pump_ca=mismatch)
    key, expired = create_root_ca("expired pump CA", days=0)
    write_private_key(tmp_path / "expired.key", key)
    write_certificate(tmp_path / "expired.pem", expired)
    refused_config(r"labels\.pumps\.ca\.cert_file .*expired\.pem expired on .*renew it", pump_ca={"cert_file": "expired.pem", "key_file": "expired.key"})


def test_one_ca_on_two_labels_is_one_ca_but_must_be_configured_alike(make_app, make_config, pump_ca_dir):
    section = pump_ca_section(pump_ca_dir)
    app = make_app(labels={"pumps": {"ca": section}, "pumps-der": {"ca": section, "response_format": "der"}})
    with app.app_context():
        authorities = state().authorities
        assert authorities.for_label("pumps") is authorities.for_label("pumps-der")
        assert len(list(authorities)) == 2
    with pytest.raises(ConfigError, match=r"labels\.pumps-der\.ca names the same CA as labels\.pumps\.ca with other settings"):
        create_app(make_config(labels={"pumps": {"ca": section}, "pumps-der": {"ca": {**section, "crl_lifetime_hours": 48}}}))


# --- a database from before issuers were recorded ------------------------------------------------


def test_an_older_database_gains_the_issuer_columns_and_keeps_its_rows(make_app, make_config, pump_ca_dir, default_ca, tmp_path):
    old_app = make_app()
    client = old_app.test_client()
    key = ec.generate_private_key(ec.SECP256R1())
    kept, lost = enroll(client, "NPPOLD1", key=key), enroll(client, "NPPOLD2")
    revoke(old_app, lost)
    number = crl_number(fetch_crl(client, "/crl"))
    old_app.extensions["est_app"].store.engine.dispose()

    # Make it the database an older version made: before migrations, no issuer columns (and so no index on crls.issuer).
    migrate(f"sqlite:///{tmp_path / 'est.db'}", "0001", command.downgrade)
    db = sqlite3.connect(tmp_path / "est.db")
    db.execute("DROP TABLE alembic_version")
    db.execute("DROP INDEX ix_crls_issuer_number")
    db.execute("ALTER TABLE certificates DROP COLUMN issuer")
    db.execute("ALTER TABLE crls DROP COLUMN issuer")
    db.commit()
    counts = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("certificates", "devices", "crls", "audit_events")}
    db.close()

    config = make_config(**label_config(pump_ca_dir))  # the same database, now with a pump CA too
    assert run_cli("db", "upgrade", config=config).exit_code == 0
    app = create_app(config)
    client = app.test_client()
    db = sqlite3.connect(tmp_path / "est.db")
    assert {row[1] for row in db.execute("PRAGMA table_info(certificates)")} >= {"serial", "issuer"}
    assert {row[1] for row in db.execute("PRAGMA table_info(crls)")} >= {"number", "issuer"}
    assert db.execute("SELECT count(*) FROM certificates WHERE issuer IS NULL").fetchone()[0] == 2
    for table, count in counts.items():
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= count
    db.close()

    # Rows without an issuer are the top-level CA's: its CRL (the stored one first), OCSP and re-enrollment.
    crl = fetch_crl(client, "/crl")
    assert crl_number(crl) == number and revoked_serials(crl) == {lost.serial_number}
    assert revoked_serials(fetch_crl(client, "/crl/pumps")) == set()
    assert ocsp_post(client, ocsp_request(lost, default_ca[1])).certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert ocsp_post(client, ocsp_request(kept, default_ca[1])).certificate_status == ocsp.OCSPCertStatus.GOOD
    renewed = issued(post(client, "simplereenroll", make_csr("NPPOLD1", key=key), cert=kept))
    assert record(app, renewed).issuer == issuer_id(default_ca[1])
    run_cli("crl", config=app_config(app))
    assert revoked_serials(fetch_crl(client, "/crl")) == {lost.serial_number}


def test_revoking_needs_the_key_of_the_ca_that_signs_and_changes_nothing_without_it(make_label_app, pump_ca_dir, tmp_path):
    """A label CA's passphrase as a systemd credential, gone while the service is stopped."""
    passphrase = tmp_path / "pump-ca-key-passphrase"
    passphrase.write_text("the pump CA passphrase\n")
    encrypt_key_file(pump_ca_dir / "pump-ca.key", tmp_path / "pump-ca.key", b"the pump CA passphrase")
    app = make_label_app(pump_ca=pump_ca_section(pump_ca_dir, key_file=str(tmp_path / "pump-ca.key"), key_passphrase_file=str(passphrase)))
    client = app.test_client()
    pump = enroll(client, "NPPBBB4", "pumps")
    other = enroll(client, "NPPCCC7", "other")
    config = tmp_path / "config.yaml"

    passphrase.unlink()
    for args in (["cert", "revoke", format(pump.serial_number, "x")], ["device", "delete", "NPPBBB4"], ["crl", "--label", "pumps"]):
        refused = run_cli(*args, config=config)
        assert refused.exit_code == 1, (args, refused.output)
        assert "without the CA key: labels.pumps.ca.key_passphrase_file" in refused.output, refused.output
    with app.app_context():
        assert state().store.get_certificate(format(pump.serial_number, "x")).status == "valid"  # nothing half-done
        assert len(state().store.find_devices()) == 2
    # The top-level CA's certificates need only the top-level key.
    assert run_cli("cert", "revoke", format(other.serial_number, "x"), config=config).exit_code == 0
