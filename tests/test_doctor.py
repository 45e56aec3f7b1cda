"""`est-admin doctor` against real deployments: `est init` output, est-server over TLS, real clients.

Each broken deployment is broken for real (files, modes, certificates, the
database) and must produce its own FAIL line and a non-zero exit; where the
doctor says what a client can read, the client is run to confirm it.
"""

from __future__ import annotations

import base64
import dataclasses
import grp
import json
import os
import re
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from est_app import create_app
from est_app.ca import load_authorities, load_authority
from est_app.ca.crl import build_crl
from est_app.ca.development import write_private_key
from est_app import config as config_module
from est_app.cli.doctor.inside import SECRET_FILE_SETTINGS
from est_app.config import ConfigError, load_config
from est_app.store import Store, migrations

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .e2e_clients import call, curl, pkcs7_certs, pki, run
from .pki import der, ec_key, make_csr, pem
from .server import free_port, start_server, write_config
from .test_label_ca import pump_ca_section


def doctor(config: Path, *args: str):
    """Run `est-admin --config CONFIG doctor ...`; click's runner re-raises any traceback."""
    return run_cli("doctor", *args, config=config)


def lines(result, level: str, subject: str | None = None) -> list[str]:
    """The finding lines of ``level`` (a regular expression) about ``subject`` (any when None)."""
    about = re.escape(subject) if subject is not None else r"[^:]+"
    return [line for line in result.output.splitlines() if re.match(rf"(?:{level})\s+{about}: ", line)]


def has_line(result, level: str, subject: str, *phrases: str) -> bool:
    return any(all(p in line for p in phrases) for line in lines(result, level, subject))


@pytest.fixture
def deployment(tmp_path) -> Path:
    """A fresh `est init` directory of this test's own, free to break."""
    directory = tmp_path / "pki"
    assert run_cli("init", "--dir", str(directory)).exit_code == 0
    return directory


@pytest.fixture
def serve(deployment, tmp_path):
    """Start est-server on ``deployment`` with config overrides; stopped after the test."""
    servers = []

    def start(**overrides):
        server = start_server(deployment, tmp_path, **overrides)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def offline_config(deployment: Path, tmp_path: Path, **overrides) -> Path:
    """`est init`'s configuration on a free port where nothing listens."""
    return write_config(deployment, tmp_path / "offline.yaml", free_port(), **overrides)


def certificate(subject_key, issuer_key, cn: str, *, issuer: x509.Name | None = None, days: tuple[int, int] = (-1, 365), ca: bool = False, names=()):
    """A certificate valid from now+days[0] to now+days[1] (negative: the past), self-signed unless an issuer is given."""
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def replace_pair(directory: Path, stem: str, key, cert: x509.Certificate) -> None:
    (directory / f"{stem}.key").unlink()
    write_private_key(directory / f"{stem}.key", key)
    (directory / f"{stem}.pem").write_bytes(pem(cert))


def dev_ca(directory: Path):
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    return key, x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())


# --- a good deployment ---------------------------------------------------------------------------


def test_good_deployment_is_all_ok_and_exits_0(deployment, serve):
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=deployment / "config.yaml").exit_code == 0
    server = serve()
    assert curl(f"{server.url}/crl", server.ca_file).status == 200  # the first /crl signs one

    result = doctor(server.config)
    assert result.exit_code == 0, result.output
    assert not lines(result, "FAIL")
    assert has_line(result, "OK", "config", "is valid")
    assert has_line(result, "OK", "ca", "CN=est_app development CA valid until")
    assert has_line(result, "OK", "ca key", "matches the CA certificate")
    assert has_line(result, "WARN", "ca key", "is not encrypted")  # init's development key: a warning, exit 0
    assert has_line(result, "OK", "tls", "the certificate names 127.0.0.1")
    assert has_line(result, "OK", "database", "schema is this version's")
    assert has_line(result, "OK", "crl", "CRL 1 valid until")
    assert has_line(result, "OK", "server", f"answers on 127.0.0.1:{server.port} over TLS, its certificate verified")
    assert has_line(result, "OK", "label default", "cacerts is base64 wrapped at 64 columns", "1 certificate;", "read by libest estclient, GlobalSign estclient")
    assert has_line(result, "OK", "label default", "enrollment answer (rendered from the label's settings; nothing enrolled)")
    assert has_line(result, "OK", "label default", "auth basic: 1 user and 0 RA certificates may enroll")
    assert "Traceback" not in result.output

    as_json = json.loads(doctor(server.config, "--json").output)
    assert as_json["failed"] is False
    assert {f["level"] for f in as_json["findings"]} <= {"OK", "WARN"}
    assert any(f["subject"] == "server" and f["level"] == "OK" for f in as_json["findings"])


# --- broken deployments --------------------------------------------------------------------------


def test_server_not_running_is_a_fail_line_not_a_traceback(deployment, tmp_path):
    config = offline_config(deployment, tmp_path)
    port = yaml.safe_load(config.read_text())["server"]["bind"].rsplit(":", 1)[1]
    result = doctor(config)
    assert result.exit_code == 1
    assert has_line(result, "FAIL", "server", f"nothing answers on 127.0.0.1:{port}", "start est-server")
    assert "Traceback" not in result.output
    assert json.loads(doctor(config, "--json").output)["failed"] is True


def test_tls_certificate_lacking_the_bind_host_and_a_dialled_name(deployment, serve, tmp_path):
    server = serve(server={"workers": 1})  # its one worker has loaded the TLS files by the time serve() returns
    # Replaced on disk under the running server, which serves the old pair until restarted.
    ca_key, ca_cert = dev_ca(deployment)
    key = ec_key()
    replace_pair(deployment, "tls", key, certificate(key, ca_key, "est.hospital.example", issuer=ca_cert.subject, names=["est.hospital.example"]))

    result = doctor(server.config, "--host", "est.hospital.example", "--host", "10.1.2.3")
    assert result.exit_code == 1
    assert has_line(result, "FAIL", "tls", "does not name 127.0.0.1", "its names: est.hospital.example", "reissue it")
    assert has_line(result, "FAIL", "tls", "does not name 10.1.2.3")
    assert has_line(result, "OK", "tls", "the certificate names est.hospital.example")
    assert has_line(result, "WARN", "server", "serves another TLS certificate", "restart est"), result.output

    # Clients that trust another root refuse the server; the labels are still read, without verification.
    other_root = tmp_path / "other-root.pem"
    other_key = ec_key()
    other_root.write_bytes(pem(certificate(other_key, other_key, "Another root", ca=True)))
    untrusted = doctor(server.config, "--tls-ca", str(other_root))
    assert untrusted.exit_code == 1
    assert has_line(untrusted, "FAIL", "server", f"does not verify against {other_root}: "), untrusted.output
    assert has_line(untrusted, "OK", "label default", "cacerts is base64 wrapped at 64 columns")


def test_expired_tls_certificate(deployment, tmp_path):
    ca_key, ca_cert = dev_ca(deployment)
    key = ec_key()
    replace_pair(deployment, "tls", key, certificate(key, ca_key, "localhost", issuer=ca_cert.subject, days=(-400, -2), names=["localhost"]))
    result = doctor(offline_config(deployment, tmp_path))
    assert result.exit_code == 1
    assert has_line(result, "FAIL", "tls", "CN=localhost expired on", "renew the TLS certificate")


def test_expired_and_expiring_ca_certificate(deployment, tmp_path):
    ca_key, _ = dev_ca(deployment)
    (deployment / "ca.pem").write_bytes(pem(certificate(ca_key, ca_key, "est_app development CA", days=(-3650, -1), ca=True)))
    expired = doctor(offline_config(deployment, tmp_path))
    assert expired.exit_code == 1
    assert has_line(expired, "FAIL", "ca", "CN=est_app development CA expired on", "renew the CA")
    assert not lines(expired, "OK", "label default")  # nothing can be issued: no enrollment answer to render

    (deployment / "ca.pem").write_bytes(pem(certificate(ca_key, ca_key, "est_app development CA", days=(-3650, 10), ca=True)))
    expiring = doctor(offline_config(deployment, tmp_path))
    assert has_line(expiring, "WARN", "ca", "expires in 9 days")
    assert has_line(expiring, "WARN", "ca", "issued certificates end with the CA in 9 days, before cert_validity_days (365)")


def test_world_readable_ca_key(deployment, tmp_path):
    os.chmod(deployment / "ca.key", 0o644)
    result = doctor(offline_config(deployment, tmp_path))
    assert result.exit_code == 1
    assert has_line(result, "FAIL", "ca key", f"{deployment / 'ca.key'} is readable by every user (mode 0644)", f"chmod o-rwx {deployment / 'ca.key'}")
    # 0640, its group the service's (docs/DEPLOYMENT.md's root:est; doctor runs as the service user, here root)
    os.chmod(deployment / "ca.key", 0o640)
    os.chown(deployment / "ca.key", 0, os.getegid())
    fine = doctor(offline_config(deployment, tmp_path))
    assert lines(fine, "WARN|FAIL", "ca key") == [f"WARN ca key: {deployment / 'ca.key'} is not encrypted — encrypt it and give the passphrase as a systemd credential (DEPLOYMENT.md 3b)"]


SECRET = "s3cret-for-doctor"


def secrets_config(deployment: Path, tmp_path: Path, mode: int, uid: int = 0, gid: int | None = None) -> tuple[Path, list[Path]]:
    """A configuration naming the database's and Redis's password files (nothing answers there), both with ``mode``, owner and group."""
    files = [tmp_path / "db-password", tmp_path / "redis-password"]
    for file in files:
        file.write_text(SECRET + "\n")
        os.chown(file, uid, os.getegid() if gid is None else gid)
        os.chmod(file, mode)
    config = offline_config(
        deployment, tmp_path,
        database={"url": f"postgresql+psycopg://est@127.0.0.1:{free_port()}/est", "password_file": str(files[0]), "connect_timeout": 1},
        rate_limit={"enabled": True, "storage_uri": f"redis://127.0.0.1:{free_port()}/0", "storage_password_file": str(files[1])},
    )
    return config, files


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660], ids=oct)
def test_secret_files_may_be_open_to_the_services_group(deployment, tmp_path, mode):
    """docs/HIGH_AVAILABILITY.md puts the password files at 0640 root:est: the doctor agrees."""
    config, (db_password, redis_password) = secrets_config(deployment, tmp_path, mode)
    result = doctor(config)
    assert has_line(result, "OK", "database.password_file", f"{db_password} is closed to other users")
    assert has_line(result, "OK", "rate_limit.storage_password_file", f"{redis_password} is closed to other users")
    assert not lines(result, "WARN|FAIL", "database.password_file") and not lines(result, "WARN|FAIL", "rate_limit.storage_password_file")


@pytest.mark.parametrize("mode, access", [(0o644, "readable"), (0o604, "readable"), (0o602, "writable")])
def test_a_secret_file_open_to_every_user_fails(deployment, tmp_path, mode, access):
    config, (db_password, redis_password) = secrets_config(deployment, tmp_path, mode)
    result = doctor(config)
    assert result.exit_code == 1
    for setting, file in (("database.password_file", db_password), ("rate_limit.storage_password_file", redis_password)):
        assert has_line(result, "FAIL", setting, f"{file} is {access} by every user (mode {mode:04o})", f"chmod o-rwx {file}")


def test_a_secret_file_open_to_another_group_or_owned_by_another_user_warns(deployment, tmp_path):
    other = 65534  # nobody / nogroup: neither the user running doctor nor its group
    config, (db_password, _) = secrets_config(deployment, tmp_path, 0o640, gid=other)
    result = doctor(config)
    group = grp.getgrgid(os.getegid()).gr_name
    assert has_line(result, "WARN", "database.password_file", f"{db_password} is open to its group", "(mode 0640), not the service's", f"chgrp {group} {db_password}")
    config, (db_password, _) = secrets_config(deployment, tmp_path, 0o600, uid=other)
    result = doctor(config)
    assert has_line(result, "WARN", "database.password_file", f"{db_password} is owned by uid {other}, neither", "nor root")


def test_every_file_setting_is_known_as_secret_or_not():
    """A new file setting must be placed: a secret's mode is checked as such (est_app.cli.doctor.inside)."""
    public = {"cert_file", "chain_file", "client_ca_file", "ocsp_responder_cert_file", "link_certificates_file", "pkcs11_module"}
    settings = {
        field.name
        for section in vars(config_module).values()
        if isinstance(section, type) and dataclasses.is_dataclass(section)
        for field in dataclasses.fields(section)
        if "Path" in str(field.type)
    }
    assert settings == public | SECRET_FILE_SETTINGS and not public & SECRET_FILE_SETTINGS


def test_every_secret_file_is_checked_once(deployment, pump_ca, tmp_path):
    """The CA's key, a label's CA's key and an OCSP responder's key: each checked once, under its own name."""
    responder_key = tmp_path / "responder.key"
    responder_key.write_bytes((deployment / "ca.key").read_bytes())
    os.chmod(responder_key, 0o644)
    os.chmod(pump_ca / "pump-ca.key", 0o604)
    ca = {"ocsp_responder_cert_file": str(deployment / "ca.pem"), "ocsp_responder_key_file": str(responder_key)}
    result = doctor(offline_config(deployment, tmp_path, ca=ca, labels=pump_labels(pump_ca)))
    assert has_line(result, "FAIL", "ca.ocsp_responder_key_file", f"{responder_key} is readable by every user (mode 0644)")
    assert has_line(result, "FAIL", "labels.pumps.ca key", f"{pump_ca / 'pump-ca.key'} is readable by every user (mode 0604)")
    assert len([line for line in result.output.splitlines() if "by every user" in line]) == 2, result.output


def test_ca_key_that_does_not_match(deployment, tmp_path):
    (deployment / "ca.key").unlink()
    write_private_key(deployment / "ca.key", ec_key())
    result = doctor(offline_config(deployment, tmp_path))
    assert result.exit_code == 1
    assert has_line(result, "FAIL", "ca key", "does not belong to")


def test_encrypted_ca_key_is_checked_only_with_its_passphrase(deployment, tmp_path, monkeypatch):
    key, _ = dev_ca(deployment)
    (deployment / "ca.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"long passphrase"))
    )
    config = offline_config(deployment, tmp_path, ca={"key_passphrase_env": "EST_TEST_CA_PASSPHRASE"})
    monkeypatch.delenv("EST_TEST_CA_PASSPHRASE", raising=False)
    assert has_line(doctor(config), "WARN", "ca key", "not checked against the CA certificate: EST_TEST_CA_PASSPHRASE is not set here")
    monkeypatch.setenv("EST_TEST_CA_PASSPHRASE", "long passphrase")
    assert has_line(doctor(config), "OK", "ca key", "matches the CA certificate")
    monkeypatch.setenv("EST_TEST_CA_PASSPHRASE", "wrong passphrase")
    wrong = doctor(config)
    assert wrong.exit_code == 1 and has_line(wrong, "FAIL", "ca key", "the passphrase is wrong")

    # The production layout: a systemd credential that exists only while the service runs.
    absent = offline_config(deployment, tmp_path, ca={"key_passphrase_file": "/run/credentials/est.service/ca-key-passphrase"})
    result = doctor(absent)
    assert has_line(result, "WARN", "ca key", "not checked against the CA certificate: /run/credentials/est.service/ca-key-passphrase exists only while est.service runs")
    assert not lines(result, "FAIL", "ca key") and not lines(result, "FAIL", "config")


def test_stale_crl(deployment, tmp_path):
    config = offline_config(deployment, tmp_path)
    settings = load_config(config)
    authority = load_authority(settings.ca)
    past = datetime.now(timezone.utc) - timedelta(days=3)
    Store(settings.database.url).save_crl(lambda number: build_crl(authority, [], number, past, timedelta(hours=24)), authority.issuer_id)
    result = doctor(config)
    assert result.exit_code == 1
    assert has_line(result, "FAIL", "crl", "CRL 1 expired at", "FreeRADIUS", "est-admin crl")


def test_a_crl_lacking_a_revocation_fails_until_it_is_re_signed(deployment, tmp_path):
    config = offline_config(deployment, tmp_path)
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=config).exit_code == 0
    client = create_app(config).test_client()
    enrolled = client.post("/.well-known/est/simpleenroll", data=der(make_csr("NPPSTALE")), headers={"Content-Type": "application/pkcs10", **basic_auth()})
    assert enrolled.status_code == 200 and client.get("/crl").status_code == 200
    store = Store(load_config(config).database.url)
    (device,) = store.find_devices()
    store.revoke(device.current_serial, "keyCompromise")  # the revocation's transaction; its re-sign never happened

    stale = doctor(config)
    assert stale.exit_code == 1
    assert has_line(stale, "FAIL", "crl", "CRL 1 is stale: it lacks revocations made since", "FreeRADIUS with CRL checks still accepts those pumps", "run est-admin crl")
    assert run_cli("crl", config=config).exit_code == 0
    assert has_line(doctor(config), "OK", "crl", "CRL 2 valid until")


def test_database_missing_or_outdated(deployment, tmp_path):
    missing = doctor(offline_config(deployment, tmp_path, database={"url": f"sqlite:///{tmp_path / 'nowhere.db'}"}))
    assert missing.exit_code == 1
    assert has_line(missing, "FAIL", "database", "nowhere.db: no such file")
    assert not (tmp_path / "nowhere.db").exists()  # the doctor never creates one
    driverless = doctor(offline_config(deployment, tmp_path, database={"url": "nosuchdb://localhost/est"}))
    assert has_line(driverless, "FAIL", "database", "database.url cannot be used")

    empty = tmp_path / "empty.db"
    empty.touch(mode=0o600)
    fresh = doctor(offline_config(deployment, tmp_path, database={"url": f"sqlite:///{empty}"}))
    assert has_line(fresh, "WARN", "database", f"has no tables yet, which est-server creates at schema revision {migrations.head()} when it starts")
    assert not lines(fresh, "FAIL", "database") and "Traceback" not in fresh.output
    with sqlite3.connect(empty) as conn:  # looked at, nothing created
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    assert has_line(doctor(offline_config(deployment, tmp_path)), "OK", "database", f"its schema is this version's (revision {migrations.head()})")

    # A database one revision behind: est-server refuses it, the doctor names the command.
    with sqlite3.connect(deployment / "est.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
    behind = doctor(offline_config(deployment, tmp_path))
    assert behind.exit_code == 1
    assert has_line(behind, "FAIL", "database", f"at schema revision 0001, this version needs {migrations.head()}", "back it up, then run `est-admin db upgrade`", "est-server refuses to start")
    assert not lines(behind, r"\w+", "crl")  # no CRL query on a schema this version does not know

    # Made before migrations (no alembic_version), and then one lacking a column that cannot be added in place.
    with sqlite3.connect(deployment / "est.db") as conn:
        conn.execute("DROP TABLE alembic_version")
    before = doctor(offline_config(deployment, tmp_path))
    assert has_line(before, "FAIL", "database", "made before schema migrations", "est-admin db upgrade")
    with sqlite3.connect(deployment / "est.db") as conn:
        conn.execute("ALTER TABLE certificates DROP COLUMN revocation_reason")
    outdated = doctor(offline_config(deployment, tmp_path))
    assert outdated.exit_code == 1
    assert has_line(outdated, "FAIL", "database", "table certificates lacks column(s) revocation_reason", "not a database est_app can upgrade in place")


def test_configuration_errors_are_one_line(deployment, tmp_path):
    config = offline_config(deployment, tmp_path)
    data = yaml.safe_load(config.read_text())
    data["ca"]["key_passphrase"] = "secret"
    config.write_text(yaml.safe_dump(data))
    result = doctor(config)
    assert result.exit_code == 1
    assert has_line(result, "FAIL", "config", "ca.key_passphrase: unknown key", "secrets never go in the YAML")
    assert len(result.output.splitlines()) == 1

    os.chmod(config, 0o666)
    data["ca"].pop("key_passphrase")
    config.write_text(yaml.safe_dump(data))
    assert has_line(doctor(config), "FAIL", "config", "is writable by others (mode 0666)")
    assert has_line(doctor(tmp_path / "absent.yaml"), "FAIL", "config", "cannot read")


# --- a label with its own CA (labels.pumps.ca) ---------------------------------------------------


@pytest.fixture
def pump_ca(pump_ca_dir, tmp_path) -> Path:
    """This test's own copy of the pump CA's files, free to break."""
    return Path(shutil.copytree(pump_ca_dir, tmp_path / "pump-ca"))


def pump_labels(pump_ca: Path, **ca) -> dict:
    return {"pumps": {"ca": pump_ca_section(pump_ca, **ca)}}


def test_label_ca_is_checked_like_the_top_level_ca(deployment, serve, pump_ca):
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=deployment / "config.yaml").exit_code == 0
    server = serve(labels=pump_labels(pump_ca))
    assert curl(f"{server.url}/crl", server.ca_file).status == 200  # CRL 1: the top-level CA's
    assert curl(f"{server.url}/crl/pumps", server.ca_file).status == 200  # CRL 2: the pump CA's

    result = doctor(server.config)
    assert result.exit_code == 0, result.output
    assert not lines(result, "FAIL")
    assert has_line(result, "OK", "ca", "CN=est_app development CA valid until")
    assert has_line(result, "OK", "labels.pumps.ca", "CN=est_app test pump CA valid until")
    assert has_line(result, "OK", "labels.pumps.ca key", f"{pump_ca / 'pump-ca.key'} matches the CA certificate")
    assert has_line(result, "WARN", "labels.pumps.ca key", "is not encrypted")
    # Each CA's own newest CRL, found by its issuer: not merely the newest of all.
    assert has_line(result, "OK", "crl", "CRL 1 valid until")
    assert has_line(result, "OK", "labels.pumps.ca crl", "CRL 2 valid until")
    # Each label's cacerts is held against the chain of the CA that issues there.
    for label in ("default", "pumps"):
        assert has_line(result, "OK", f"label {label}", "cacerts is base64 wrapped at 64 columns", "1 certificate;")
        assert has_line(result, "OK", f"label {label}", "enrollment answer (rendered from the label's settings; nothing enrolled)")
        assert not lines(result, "WARN", f"label {label}"), result.output

    # The pump CA renewed on disk (same name and key) while the server still serves the old one.
    key = serialization.load_pem_private_key((pump_ca / "pump-ca.key").read_bytes(), None)
    (pump_ca / "pump-ca.pem").write_bytes(pem(certificate(key, key, "est_app test pump CA", days=(-1, 3650), ca=True)))
    renewed = doctor(server.config)
    assert has_line(renewed, "WARN", "label pumps", "cacerts differs from the chain of labels.pumps.ca", "restart est")
    assert not lines(renewed, "WARN", "label default")
    assert has_line(renewed, "OK", "labels.pumps.ca crl", "CRL 2 valid until")  # same name and key: the CA's CRL still counts


def test_label_ca_expired_and_its_crl_stale(deployment, pump_ca, tmp_path):
    config = offline_config(deployment, tmp_path, labels=pump_labels(pump_ca))
    settings = load_config(config)
    authorities = load_authorities(settings)
    store = Store(settings.database.url)
    now = datetime.now(timezone.utc)
    for authority, signed in ((authorities.default, now), (authorities.for_label("pumps"), now - timedelta(days=3))):
        store.save_crl(lambda number: build_crl(authority, [], number, signed, timedelta(hours=24)), authority.issuer_id)
    stale = doctor(config)
    assert stale.exit_code == 1
    assert has_line(stale, "OK", "crl", "CRL 1 valid until")
    assert has_line(stale, "FAIL", "labels.pumps.ca crl", "CRL 2 expired at", "est-admin crl --label pumps", "labels.pumps.ca.crl_lifetime_hours")

    key = serialization.load_pem_private_key((pump_ca / "pump-ca.key").read_bytes(), None)
    (pump_ca / "pump-ca.pem").write_bytes(pem(certificate(key, key, "est_app test pump CA", days=(-3650, -1), ca=True)))
    expired = doctor(config)
    assert expired.exit_code == 1
    assert has_line(expired, "FAIL", "labels.pumps.ca", "CN=est_app test pump CA expired on", "renew the CA")
    assert has_line(expired, "OK", "ca", "CN=est_app development CA valid until")
    # Nothing can be issued on pumps, so no answer is rendered there; the default label is unaffected.
    assert not any("enrollment answer" in line for line in lines(expired, r"\w+", "label pumps"))
    assert has_line(expired, "OK", "label default", "enrollment answer")


def test_label_ca_key_mismatched_or_behind_an_absent_credential(deployment, pump_ca, pump_ca_dir, tmp_path):
    (pump_ca / "pump-ca.key").unlink()
    write_private_key(pump_ca / "pump-ca.key", ec_key())
    mismatched = doctor(offline_config(deployment, tmp_path, labels=pump_labels(pump_ca)))
    assert mismatched.exit_code == 1
    assert has_line(mismatched, "FAIL", "labels.pumps.ca key", "labels.pumps.ca.key_file", "does not belong to labels.pumps.ca.cert_file")
    assert has_line(mismatched, "OK", "ca key", "matches the CA certificate")

    key = serialization.load_pem_private_key((pump_ca_dir / "pump-ca.key").read_bytes(), None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"long passphrase"))
    (pump_ca / "pump-ca.key").write_bytes(encrypted)
    credential = "/run/credentials/est.service/pump-ca-key-passphrase"
    result = doctor(offline_config(deployment, tmp_path, labels=pump_labels(pump_ca, key_passphrase_file=credential)))
    assert has_line(result, "WARN", "labels.pumps.ca key", f"not checked against the CA certificate: {credential} exists only while est.service runs")
    assert not lines(result, "FAIL", "config") and not lines(result, "FAIL", "labels.pumps.ca key")


# --- which clients can read each label's answers --------------------------------------------------

LABELS = {
    "pumps": {"response_format": "der"},
    "wrapped": {"base64_line_length": 64},
    "chained": {"include_chain": True},  # one line, like the default here
}


def test_label_formats_and_the_clients_that_read_them(deployment, serve, tmp_path):
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=deployment / "config.yaml").exit_code == 0
    server = serve(base64_line_length=0, labels=LABELS)
    result = doctor(server.config)
    assert result.exit_code == 0, result.output

    # One line: strongSwan reads it (confirmed with pki itself, which serves only the unlabelled path).
    assert has_line(result, "OK", "label default", "cacerts is base64 on one line", "read by strongSwan pki, libest estclient")
    pki("--estca", "--url", server.url, "--cacert", server.ca_file, "--caout", tmp_path / "ca-out.pem", "--outform", "pem")
    # 64 columns: libest and openssl read it, strongSwan does not.
    assert has_line(result, "OK", "label wrapped", "cacerts is base64 wrapped at 64 columns", "not by strongSwan pki (needs one line: base64_line_length: 0)")
    # DER: only a gateway set to DER (openssl pkcs7 -inform DER), not the base64 clients.
    assert has_line(
        result, "OK", "label pumps", "cacerts is raw DER, without Content-Transfer-Encoding", "read by a gateway set to DER;",
        "not by strongSwan pki, libest estclient, GlobalSign estclient, openssl base64 -d (expect base64: response_format: base64)",
    )
    assert pkcs7_certs(call(server, "pumps/cacerts").body)
    # One line with the chain: too long for libest and openssl, two certificates for GlobalSign.
    chained = lines(result, "OK", "label chained")
    answer = next(line for line in chained if "enrollment answer" in line)
    assert "read by strongSwan pki;" in answer and "2 certificates" in answer
    assert re.search(r"not by libest estclient, openssl base64 -d \(lose lines of [\d,]+ characters, need under 1,000", answer)
    assert "not by GlobalSign estclient (refuses 2 certificates in an enrollment answer: include_chain: false)" in answer

    # ...and openssl, given a real enrollment answer of that label, does lose it.
    csr = base64.b64encode(der(make_csr("NPPBBB4")))
    reply = call(server, "chained/simpleenroll", "--user", f"{USER}:{PASSWORD}", "--header", "Content-Type: application/pkcs10", body=csr)
    assert reply.status == 200 and len(reply.body.strip()) >= 1000
    decoded = run("openssl", "base64", "-d", input=reply.body).stdout
    assert run("openssl", "pkcs7", "-inform", "DER", "-noout", input=decoded, check=False).returncode != 0
    assert len(pkcs7_certs(base64.b64decode(reply.body))) == 2  # the answer itself is fine

    # The client the gateway uses, named: where it cannot read, FAIL and exit 1.
    strict = doctor(server.config, "--label", "pumps", "--client", "libest")
    assert strict.exit_code == 1
    assert has_line(strict, "FAIL", "label pumps", "cacerts is raw DER", "libest estclient cannot read it")
    assert not lines(strict, r"\w+", "label default")  # --label: only that label
    assert doctor(server.config, "--label", "default", "--client", "strongswan").exit_code == 0

    # A label added to the file but not yet loaded by the running server.
    data = yaml.safe_load(server.config.read_text())
    data["labels"]["pumps-b64"] = {"response_format": "base64"}
    server.config.write_text(yaml.safe_dump(data))
    stale = doctor(server.config, "--label", "pumps-b64")
    assert stale.exit_code == 1
    assert has_line(stale, "FAIL", "label pumps-b64", "answered 404: unknown EST label 'pumps-b64'", "restart est")


# --- --request: a captured body, and the label's verdict --------------------------------------------


@pytest.mark.parametrize(
    "shape, body, form",
    [
        ("der", lambda csr: der(csr), "raw DER"),
        ("pem", lambda csr: pem(csr), "PEM (CERTIFICATE REQUEST) wrapped at 64 columns"),
        ("wrapped", lambda csr: base64.encodebytes(der(csr)).replace(b"\n", b"\r\n"), "base64 wrapped at 76 columns (4 lines, CRLF), with a trailing newline"),
        ("one-line", lambda csr: base64.b64encode(der(csr)), "base64 on one line of"),
    ],
)
def test_request_of_each_shape_is_accepted(deployment, tmp_path, shape, body, form):
    path = tmp_path / f"captured.{shape}"
    path.write_bytes(body(make_csr("NPPBBB4")))
    result = doctor(offline_config(deployment, tmp_path), "--request", str(path))
    assert result.exit_code == 0, result.output
    assert has_line(result, "OK", "request", form)
    assert has_line(result, "OK", "request", "CSR subject CN=NPPBBB4, key EC P-256")
    assert has_line(result, "OK", "label default", "would accept it for device 'NPPBBB4'")
    assert not lines(result, "OK", "server")  # --request checks the body, not the deployment


def test_request_garbage_and_damaged_der(deployment, tmp_path):
    config = offline_config(deployment, tmp_path)
    garbage = tmp_path / "form.txt"
    garbage.write_bytes(b"csr=MIIB%2Bz")
    result = doctor(config, "--request", str(garbage))
    assert result.exit_code == 1
    assert has_line(result, "OK", "request", "neither DER, PEM nor base64")
    assert has_line(result, "FAIL", "label default", "would answer 400: body is not DER, PEM or base64: expected a PKCS#10 CSR")

    newline = tmp_path / "csr.der"
    newline.write_bytes(der(make_csr("NPPBBB4")) + b"\n")
    result = doctor(config, "--request", str(newline))
    assert result.exit_code == 1
    assert has_line(result, "OK", "request", "raw DER followed by 1 more byte(s)")
    assert has_line(result, "FAIL", "label default", "would answer 400", "send the file unchanged")

    newline.write_bytes(der(make_csr("NPPBBB4"))[:-20])
    result = doctor(config, "--request", str(newline))
    assert has_line(result, "OK", "request", "raw DER, truncated: 20 byte(s) missing at the end")
    assert has_line(result, "FAIL", "label default", "would answer 400", "the body was cut short")


def test_request_refused_by_the_labels_cn_pattern(deployment, tmp_path):
    config = offline_config(deployment, tmp_path, labels={"pumps": {"subject_cn_pattern": "NPP[A-Z0-9]{4}"}})
    path = tmp_path / "csr.b64"
    path.write_bytes(base64.b64encode(der(make_csr("XNPPBBB4"))))
    refused = doctor(config, "--label", "pumps", "--request", str(path))
    assert refused.exit_code == 1
    assert has_line(refused, "FAIL", "label pumps", "would answer 400: CSR commonName 'XNPPBBB4' does not match this label's pattern 'NPP[A-Z0-9]{4}'")
    # The same body is fine on the unlabelled path, which has no pattern.
    assert doctor(config, "--request", str(path)).exit_code == 0
    # A control character is refused on every label, and device-supplied text never reaches the terminal raw.
    path.write_bytes(base64.b64encode(der(make_csr("NPPBBB4\x1b[2J"))))
    escaped = doctor(config, "--request", str(path))
    assert escaped.exit_code == 1 and "\x1b" not in escaped.output
    assert has_line(escaped, "FAIL", "label default", "would answer 400: CSR", "\\x1b[2J", "control or formatting character")
    assert has_line(doctor(config, "--label", "nosuch", "--request", str(path)), "FAIL", "label nosuch", "not in the configuration")


def test_a_database_password_that_is_an_absent_systemd_credential_is_reported_not_a_traceback(deployment, tmp_path):
    """CONFIGURATION.md puts database.password_file at /run/credentials/est.service/db-password: it exists only while
    est.service runs, so doctor run from a shell finds it absent. It says so, and checks the rest, as for the CA's."""
    credential = "/run/credentials/est.service/db-password"
    config = offline_config(
        deployment, tmp_path,
        database={"url": f"postgresql+psycopg://est@127.0.0.1:{free_port()}/est", "password_file": credential, "connect_timeout": 1},
    )
    result = doctor(config)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert has_line(result, "OK", "database.password_file", f"{credential} is a systemd credential, present only while est.service runs")
    assert has_line(result, "WARN", "database", "not checked", credential)
    assert lines(result, "OK", "config")  # the rest was checked all the same


def test_a_database_password_file_that_cannot_be_read_fails_in_one_line(deployment, tmp_path):
    unreadable = tmp_path / "db-password"
    unreadable.mkdir()  # read even by root: it fails as a file the service user may not read would
    config = offline_config(
        deployment, tmp_path,
        database={"url": f"postgresql+psycopg://est@127.0.0.1:{free_port()}/est", "password_file": str(unreadable), "connect_timeout": 1},
    )
    result = doctor(config)
    assert result.exit_code == 1 and not isinstance(result.exception, ConfigError), result.exception
    assert has_line(result, "FAIL", "database", f"database.password_file {unreadable}: cannot read it")
