"""Configuration validation: every mistake stops start-up with a message naming the key or path."""

from __future__ import annotations

import pytest
import yaml

from est_app import create_app, instance_path
from est_app.cli.database import open_store
from est_app.config import ConfigError, DatabaseSettings, database_url, load_config


def write(tmp_path, pki_dir, text_or_data) -> object:
    path = tmp_path / "config.yaml"
    if isinstance(text_or_data, str):
        path.write_text(text_or_data)
    else:
        base = yaml.safe_load((pki_dir / "config.yaml").read_text())
        base.update(text_or_data)
        path.write_text(yaml.safe_dump(base))
    return path


def test_init_config_loads_with_its_values(pki_dir):
    settings = load_config(pki_dir / "config.yaml")
    assert settings.response_format == "base64" and settings.base64_line_length == 64
    assert settings.ca.cert_file == pki_dir / "ca.pem"
    assert settings.server.bind == "127.0.0.1:8445"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"respons_format": "der"}, "respons_format: unknown key"),
        ({"response_format": "pem"}, "response_format: 'pem' is not one of base64, der"),
        ({"base64_line_length": 63}, "multiple of 4"),
        ({"base64_line_length": "64"}, "base64_line_length: expected a whole number"),
        ({"server": {"workers": 0}}, "workers must be at least 1"),
        ({"server": {"bind": "0.0.0.0:8445", "wrokers": 2}}, "server.wrokers: unknown key"),
        ({"ca": {"cert_file": "/nonexistent/ca.pem", "key_file": "/nonexistent/ca.key"}}, "ca.cert_file: no such file: /nonexistent/ca.pem"),
        ({"ca": {"key_file": "x"}}, "ca.cert_file: required key is missing"),
        ({"labels": {"cacerts": {}}}, "label 'cacerts' is reserved"),
        ({"labels": {"bad/label": {}}}, "label 'bad/label'"),
        ({"labels": {"pumps": {"extended_key_usage": ["codeSigning"]}}}, "labels.pumps: extended_key_usage: 'codeSigning'"),
        ({"labels": {"pumps": {"subject_cn_pattern": "("}}}, "not a regular expression"),
        ({"rate_limit": {"enabled": "yes"}}, "rate_limit.enabled: expected true or false"),
        ({"tls": {"cert_file": "/etc/hostname"}}, "cert_file and key_file go together"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, pki_dir, change, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, pki_dir, change))
    assert message in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path, pki_dir):
    with pytest.raises(ConfigError, match="cannot read configuration .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, pki_dir, "ca: [unclosed"))


def test_relative_paths_are_taken_from_the_config_folder(tmp_path, pki_dir):
    for name in ("ca.pem", "ca.key"):
        (tmp_path / name).write_bytes((pki_dir / name).read_bytes())
    settings = load_config(write(tmp_path, pki_dir, {"ca": {"cert_file": "ca.pem", "key_file": "ca.key"}, "tls": {}}))
    assert settings.ca.cert_file == tmp_path / "ca.pem"


def test_the_default_database_is_est_db_in_the_instance_folder(tmp_path, pki_dir):
    assert database_url(DatabaseSettings(), tmp_path) == f"sqlite:///{tmp_path / 'est.db'}"
    postgresql = DatabaseSettings(url="postgresql+psycopg://est@db.example/est")
    assert database_url(postgresql, tmp_path) == postgresql.url
    # est-admin's commands (db, doctor) open the file est-server opens: create_app's instance folder's
    settings = load_config(write(tmp_path, pki_dir, {"database": {}}))
    assert settings.database.url is None
    assert open_store(settings).engine.url.database == str(instance_path() / "est.db")  # not connected: nothing created


def test_ca_key_not_matching_certificate_stops_start(tmp_path, pki_dir):
    path = write(tmp_path, pki_dir, {"ca": {"cert_file": str(pki_dir / "ca.pem"), "key_file": str(pki_dir / "tls.key")}})
    with pytest.raises(ConfigError, match="does not belong to ca.cert_file"):
        create_app(path)


def test_non_ca_certificate_stops_start(tmp_path, pki_dir):
    path = write(tmp_path, pki_dir, {"ca": {"cert_file": str(pki_dir / "tls.pem"), "key_file": str(pki_dir / "tls.key")}})
    with pytest.raises(ConfigError, match="not a CA certificate"):
        create_app(path)


def test_a_database_from_an_older_version_stops_start_with_a_clear_message(make_config, tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "est.db")
    db.execute("CREATE TABLE certificates (serial VARCHAR(64) PRIMARY KEY, der BLOB NOT NULL)")
    db.commit()
    with pytest.raises(ConfigError, match=r"table certificates lacks column\(s\) device_id, common_name.*not a database est_app can upgrade in place"):
        create_app(make_config())
    assert db.execute("SELECT count(*) FROM certificates").fetchone() == (0,)  # nothing dropped or altered
