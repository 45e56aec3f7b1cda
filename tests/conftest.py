"""Shared fixtures: a real development PKI made by `est init`; apps built from Settings made in code, or from real YAML files."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from werkzeug.security import generate_password_hash

from est_app import create_app
from est_app.audit import cli_actor
from est_app.ca.development import create_root_ca, write_certificate, write_private_key
from est_app.cli import est
from est_app.config import Settings, load_config, parse_config
from est_app.state import state
from est_app.store import AuditEvent, Store

USER = "gateway"
PASSWORD = "correct horse battery staple"


def run_cli(*args: str, input: str | None = None, config: Path | None = None):
    """Run an `est` CLI command for real (as `est-admin`) and return click's result."""
    argv = (["--config", str(config)] if config else []) + list(args)
    return CliRunner().invoke(est, argv, input=input, catch_exceptions=False)


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory) -> Path:
    """A directory initialised by `est init`: CA, TLS certificate, database, config.yaml."""
    directory = tmp_path_factory.mktemp("pki")
    result = run_cli("init", "--dir", str(directory))
    assert result.exit_code == 0, result.output
    turn_off_retries(directory / "config.yaml")
    return directory


def turn_off_retries(config: Path) -> None:
    """Tests send one fixed key's CSR again and again and expect a new answer each time; tests/test_retries.py
    turns the retry window (60 minutes by default) back on where it is under test."""
    with config.open("a") as file:
        file.write("\nretry_window_minutes: 0\n")


@pytest.fixture(scope="session")
def password_hash() -> str:
    """The test user's password hash, made once: scrypt is slow on purpose, and the same password may share one hash."""
    return generate_password_hash(PASSWORD)


@pytest.fixture
def config_data(pki_dir, tmp_path, new_database):
    """``config_data(**overrides)``: `est init`'s configuration as data, ``overrides`` merged in, on the test's
    own fresh database (one per test, made at the first call: ``new_database``)."""
    base = yaml.safe_load((pki_dir / "config.yaml").read_text())
    database: dict = {}

    def merge(**overrides) -> dict:
        if not database:
            database.update(new_database(tmp_path))
        data = {**base, "database": dict(database), "rate_limit": {"enabled": False}}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return data

    return merge


@pytest.fixture
def make_config(config_data, tmp_path):
    """Write a config.yaml: `est init`'s, with ``overrides`` merged in, on a fresh database."""

    def write(**overrides) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config_data(**overrides)))
        return path

    return write


@pytest.fixture
def make_settings(config_data, tmp_path):
    """``make_settings(**overrides)``: the validated Settings ``make_config(**overrides)`` would hold, built in code."""

    def build(**overrides) -> Settings:
        return parse_config(config_data(**overrides), base_dir=tmp_path, source="test settings")

    return build


@pytest.fixture
def make_app(make_config, make_settings, password_hash):
    """An app built from ``make_settings(**overrides)``, with the test user in its store.

    The same settings are written to the test's config.yaml (``make_config``) for the CLI
    commands a test runs against the app's database.
    """

    def build(**overrides):
        make_config(**overrides)
        app = create_app(make_settings(**overrides))
        app.config["TESTING"] = True
        with app.app_context():
            state().store.add_user(USER, password_hash, audit=AuditEvent(event="user-add", actor=cli_actor(), detail=f"{USER} (est)"))
        return app

    return build


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def basic_auth(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="session")
def pump_ca_dir(tmp_path_factory) -> Path:
    """A second CA, for a label of its own (``labels.pumps.ca``): pump-ca.pem and pump-ca.key."""
    directory = tmp_path_factory.mktemp("pump-ca")
    key, certificate = create_root_ca("est_app test pump CA")
    write_private_key(directory / "pump-ca.key", key)
    write_certificate(directory / "pump-ca.pem", certificate)
    return directory


@pytest.fixture(scope="session")
def postgres_cluster():
    """One throwaway PostgreSQL cluster for the session (tests/postgres.py); tests take databases from it."""
    from .postgres import PostgresCluster

    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.remove()


DATABASES = ("sqlite", "postgresql")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "both_databases: run once on SQLite and once on PostgreSQL (the `database` fixture)")


def pytest_generate_tests(metafunc) -> None:
    # Only tests that are marked and reach the database (through make_config or new_database) run twice.
    if "database" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_databases"):
        metafunc.parametrize("database", DATABASES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def database(request) -> str:
    """Which database the tests' configs use: "sqlite", unless the test is marked ``both_databases``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="module")
def new_database(request, database):
    """``new_database(directory)``: the YAML ``database`` section of a new, empty database of that kind
    (SQLite: ``directory``/est.db; PostgreSQL: on the session's cluster, its password in ``password_file``)."""

    cluster = request.getfixturevalue("postgres_cluster") if database == "postgresql" else None

    def make(directory: Path) -> dict:
        if cluster is None:
            return {"url": f"sqlite:///{directory / 'est.db'}"}
        name = cluster.create_database()
        # The schema first: gunicorn workers starting together on an empty PostgreSQL database race to create it.
        store = Store(cluster.url(name))
        store.create_schema()
        store.engine.dispose()
        return {"url": cluster.url(name, password=False), "password_file": str(cluster.password_file)}

    return make


def open_store(config: Path) -> Store:
    """The store a config.yaml names, opened as the server opens it (password file, timeouts)."""
    settings = load_config(config)
    return Store(settings.database.url, settings.database)


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    """A SQLAlchemy URL (password included) of a new, empty database on the session's cluster."""
    return postgres_cluster.url(postgres_cluster.create_database())
