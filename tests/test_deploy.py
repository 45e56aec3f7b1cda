"""The IQE deployment as shipped: config-iqe.yaml, the gunicorn options it yields, deploy/est.service.

config-iqe.yaml names files under /etc/est and /run/credentials; the tests swap
in the test PKI made by `est init` (the CA key re-encrypted, its passphrase in a
file as systemd would hand it over) and change nothing else.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import typing
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from limits import parse_many

from est_app.ca import load_authority
from est_app.ca.development import create_root_ca
from est_app.config import LabelSettings, Settings, parse_config
from est_app.encoding import Base64Encoding, DerEncoding
from est_app.profiles import build_profiles
from est_app.server import gunicorn_options
from est_app.worker import ESTWorker

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, make_csr

REPO = Path(__file__).resolve().parent.parent
IQE_CONFIG = REPO / "config-iqe.yaml"
UNIT = REPO / "deploy" / "est.service"
CONFIGURATION_DOC = REPO / "docs" / "CONFIGURATION.md"


def iqe_data() -> dict:
    return yaml.safe_load(IQE_CONFIG.read_text())


def unit_entries(path: Path = UNIT) -> dict[str, list[tuple[str, str]]]:
    """The unit file as {section: [(key, value), ...]}, keeping repeated keys in order (as systemd does)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"entry outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def service_values(key: str) -> list[str]:
    return [v for k, v in unit_entries()["Service"] if k == key]


def service_value(key: str) -> str:
    values = service_values(key)
    assert len(values) == 1, f"{key}= appears {len(values)} times in {UNIT.name}"
    return values[0]


@pytest.fixture
def iqe_settings_data(pki_dir, tmp_path) -> dict:
    """config-iqe.yaml with the test PKI in place of /etc/est; the CA key encrypted as in production."""
    passphrase = secrets.token_urlsafe(24)
    passphrase_file = tmp_path / "ca-key-passphrase"
    passphrase_file.write_text(passphrase + "\n")  # as `openssl rand -base64 32 > file` writes it
    key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )
    (tmp_path / "ca.key").write_bytes(encrypted)
    data = iqe_data()
    data["ca"].update(
        cert_file=str(pki_dir / "ca.pem"),
        key_file=str(tmp_path / "ca.key"),
        key_passphrase_file=str(passphrase_file),
    )
    data["tls"].update(cert_file=str(pki_dir / "tls.pem"), key_file=str(pki_dir / "tls.key"))
    data["database"] = {"url": f"sqlite:///{tmp_path / 'est.db'}"}
    return data


@pytest.fixture
def iqe_settings(iqe_settings_data, tmp_path):
    return parse_config(iqe_settings_data, base_dir=tmp_path, source="config-iqe.yaml")


# (a) config-iqe.yaml


def test_iqe_config_names_the_deployment_paths():
    data = iqe_data()
    for section in ("ca", "tls"):
        for key in ("cert_file", "key_file"):
            assert data[section][key].startswith("/etc/est/"), f"{section}.{key}"
    assert data["database"]["url"] == "sqlite:////var/lib/est/est.db"
    assert "key_passphrase_env" not in data["ca"]
    # The passphrase path is where systemd puts the unit's credential: /run/credentials/<unit>/<id>.
    (credential,) = service_values("LoadCredential")
    credential_id = credential.split(":", 1)[0]
    assert data["ca"]["key_passphrase_file"] == f"/run/credentials/{UNIT.name}/{credential_id}"


def test_iqe_config_validates_with_the_gateway_settings(iqe_settings):
    s = iqe_settings
    assert s.response_format == "der"
    assert s.server.bind == "0.0.0.0:8445"
    assert s.server.bind.rsplit(":", 1)[1] == "8445"
    assert s.ca.cert_validity_days == 365
    assert s.ca.extended_key_usage == ("clientAuth",)
    assert s.include_chain is False
    assert s.tls.min_version == "1.2"
    assert s.rate_limit.enabled is True


def test_rate_limit_is_sized_for_a_gateway_batch(iqe_settings):
    """One address enrolls every pump (about 3 requests each): at least 100 pumps a minute must pass."""
    limits = parse_many(iqe_settings.rate_limit.limit)  # the config loader does not parse it; the limiter would, per request
    assert limits
    for item in limits:
        per_minute = item.amount * 60 / item.get_expiry()
        assert per_minute >= 300, f"{item} is too tight for a gateway"


def test_ca_key_loads_with_the_passphrase_from_a_file(iqe_settings):
    authority = load_authority(iqe_settings.ca)
    assert authority.certificate.subject == authority.certificate.issuer


def test_iqe_profile_answers_in_der_and_base64_is_one_line_away(iqe_settings_data, tmp_path):
    settings = parse_config(iqe_settings_data, base_dir=tmp_path)
    assert isinstance(build_profiles(settings)[None].encoding, DerEncoding)

    for line_length in (64, 0):
        data = {**iqe_settings_data, "response_format": "base64", "base64_line_length": line_length}
        encoding = build_profiles(parse_config(data, base_dir=tmp_path))[None].encoding
        assert encoding == Base64Encoding(line_length)


def test_labels_and_the_commented_example_validate(iqe_settings_data, tmp_path):
    lines = IQE_CONFIG.read_text().splitlines()
    start = lines.index("#   iqe-b64:")
    example = yaml.safe_load("\n".join(line[2:] for line in lines[start:] if line.startswith("# ")))
    data = {**iqe_settings_data, "labels": {**iqe_settings_data["labels"], **example}}
    profiles = build_profiles(parse_config(data, base_dir=tmp_path))
    assert isinstance(profiles["iqe-b64"].encoding, Base64Encoding)
    pumps = profiles["pumps"]
    assert isinstance(pumps.encoding, DerEncoding) and pumps.auth == {"basic", "cert"}
    assert pumps.csr_policy.subject_cn_pattern.fullmatch("NPPBBB4")


def test_every_config_key_is_documented():
    """docs/CONFIGURATION.md names every key the loader accepts, as `key`, `section.key` or `labels.<name>.key`."""
    doc = CONFIGURATION_DOC.read_text()
    missing = []

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if f"`{key}`" not in doc:
                missing.append(key)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{key}.")

    walk(Settings, "")
    walk(LabelSettings, "labels.<name>.")
    assert not missing, f"not documented in docs/{CONFIGURATION_DOC.name}: {', '.join(missing)}"


# (b) gunicorn options


def test_gunicorn_options_from_iqe_config(iqe_settings, pki_dir):
    options = gunicorn_options(iqe_settings)
    assert options["bind"] == ["0.0.0.0:8445"]
    assert issubclass(options["worker_class"], ESTWorker) and options["worker_class"].limits == iqe_settings.server
    assert options["workers"] >= 1 and options["worker_connections"] == iqe_settings.server.max_connections
    assert options["keepalive"] == 30
    assert options["certfile"] == str(pki_dir / "tls.pem")
    assert options["keyfile"] == str(pki_dir / "tls.key")
    assert options["control_socket_disable"] is True  # no socket in $HOME under ProtectHome=
    assert "ca_certs" not in options  # no RA client CA configured yet

    def factory():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        return context

    context = options["ssl_context"](None, factory)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_client_certificates_are_requested_not_required_and_chain_to_the_ca_or_client_ca(iqe_settings_data, pki_dir, tmp_path):
    _, gateway_root = create_root_ca("Gateway Issuing CA")
    (tmp_path / "client-ca.pem").write_bytes(gateway_root.public_bytes(serialization.Encoding.PEM))
    data = {**iqe_settings_data, "tls": {**iqe_settings_data["tls"], "client_ca_file": str(tmp_path / "client-ca.pem"), "min_version": "1.3"}}
    options = gunicorn_options(parse_config(data, base_dir=tmp_path))
    context = options["ssl_context"](None, lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_OPTIONAL
    anchors = {dict(entry[0] for entry in ca["subject"])["commonName"] for ca in context.get_ca_certs()}
    assert anchors == {"est_app development CA", "Gateway Issuing CA"}


# (c) deploy/est.service

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


def test_unit_runs_est_server_as_est_with_the_credential():
    assert service_value("ExecStart") == "/opt/est/venv/bin/est-server --config /etc/est/config.yaml"
    assert service_value("User") == "est"
    assert service_value("Group") == "est"
    assert service_values("LoadCredential") == ["ca-key-passphrase:/etc/est/ca-key-passphrase"]
    assert service_value("StateDirectory") == "est"
    assert service_value("ConfigurationDirectory") == "est"
    assert service_value("ReadWritePaths") == "/var/lib/est"
    assert service_value("Restart") == "on-failure"
    assert service_value("StandardOutput") == "journal"
    assert service_value("StandardError") == "journal"
    assert service_value("SyslogIdentifier") == "est"
    assert "DynamicUser" not in dict(unit_entries()["Service"]) or service_value("DynamicUser") == "no"
    assert unit_entries()["Install"] == [("WantedBy", "multi-user.target")]


def test_unit_hardening():
    for key, value in HARDENING.items():
        assert service_value(key) == value, key
    assert service_value("CapabilityBoundingSet") == ""  # port 8445 needs no capability
    assert set(service_value("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    filters = service_values("SystemCallFilter")
    assert filters[0] == "@system-service"
    assert all(f == "@system-service" or f.startswith("~") for f in filters)


def test_unit_holds_no_secret():
    text = UNIT.read_text()
    assert not re.search(r"^\s*(Environment|SetCredential)\s*=.*(PASS|SECRET|KEY)", text, re.I | re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart's binary exists: point it at this venv's est-server.
    est_server = Path(sys.executable).parent / "est-server"
    if not est_server.exists():
        est_server = Path(shutil.which("est-server") or "/bin/true")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/est/venv/bin/est-server", str(est_server)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or invalid values; those are warnings naming the file.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# The whole IQE flow over the real server, configured by config-iqe.yaml.


@pytest.mark.e2e
def test_iqe_config_serves_der_over_tls(iqe_settings_data, pki_dir, tmp_path):
    from .server import start_server

    overrides = dict(iqe_settings_data)
    overrides["server"] = {k: v for k, v in overrides["server"].items() if k != "bind"}  # a free loopback port instead
    server = start_server(pki_dir, tmp_path, **overrides)
    try:
        result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config)
        assert result.exit_code == 0, result.output
        context = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # what libest speaks

        with urllib.request.urlopen(f"{server.url}/.well-known/est/cacerts", context=context, timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/pkcs7-mime"
            assert r.headers.get("Content-Transfer-Encoding") is None
            body = r.read()
        assert body[0] == 0x30
        (root,) = pkcs7.load_der_pkcs7_certificates(body)
        assert root.subject == root.issuer

        # The gateway's way: base64 CSR with a Content-Transfer-Encoding header, Basic credentials.
        request = urllib.request.Request(
            f"{server.url}/.well-known/est/pumps/simpleenroll",  # pump names are reserved to the pumps label
            data=base64.encodebytes(der(make_csr("NPPBBB4"))),
            headers={"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64", **basic_auth()},
            method="POST",
        )
        with urllib.request.urlopen(request, context=context, timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/pkcs7-mime; smime-type=certs-only"
            assert r.headers.get("Content-Transfer-Encoding") is None
            body = r.read()
        (cert,) = pkcs7.load_der_pkcs7_certificates(body)
        assert cert.subject.rfc4514_string() == "CN=NPPBBB4"
        assert cert.issuer == root.subject
        validity = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert timedelta(days=365) <= validity <= timedelta(days=365, minutes=10)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert [oid.dotted_string for oid in eku] == ["1.3.6.1.5.5.7.3.2"]
        assert server.alive()
    finally:
        server.stop()


@pytest.mark.e2e
def test_tls_1_2_offers_only_forward_secret_aead_suites(pki_dir, tmp_path):
    from .server import start_server

    server = start_server(pki_dir, tmp_path)

    def s_client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-CAfile", str(pki_dir / "ca.pem"), *args],
            input="", capture_output=True, text=True, timeout=30,
        )

    try:
        for refused in ("AES128-SHA256", "AES256-SHA", "ECDHE:!AESGCM:!CHACHA20"):  # static RSA; CBC; ECDHE with CBC
            result = s_client("-tls1_2", "-cipher", refused)
            assert result.returncode != 0 and "Cipher is (NONE)" in result.stdout + result.stderr, (refused, result.stdout)
        default = s_client("-tls1_2")  # what libest and curl offer by default
        assert default.returncode == 0, default.stdout + default.stderr
        assert re.search(r"Cipher is ECDHE-\S+-(AES\d+-GCM-SHA\d+|CHACHA20-POLY1305)", default.stdout), default.stdout
        assert "Verify return code: 0 (ok)" in default.stdout
        tls13 = s_client("-tls1_3")
        assert tls13.returncode == 0 and "TLSv1.3" in tls13.stdout
        assert server.alive()
    finally:
        server.stop()


def test_est_server_on_a_port_in_use_says_so_in_one_line_and_exits_2(pki_dir, tmp_path):
    from .server import BIN, write_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(pki_dir, tmp_path / "config.yaml", port)
        result = subprocess.run([BIN / "est-server", "--config", config], capture_output=True, text=True, timeout=60)
    # Before gunicorn starts: none of its five "Retrying in 1 second." lines, not its exit status 1.
    assert result.returncode == 2
    assert result.stderr == f"est-server: server.bind 127.0.0.1:{port}: cannot listen there: Address already in use\n"
    assert result.stdout == ""


def test_haproxy_cfg_is_valid_and_strips_what_est_app_believes_from_a_proxy(pki_dir, tmp_path):
    """deploy/haproxy.cfg (rendered as tests/haproxy.py runs it) passes `haproxy -c -f`; every header
    est_app believes from a trusted proxy is deleted before the proxy sets it; passed-through TLS
    reaches the hosts from another address than the trusted one."""
    from .haproxy import SHIPPED, check, proxy_files, render

    config = tmp_path / "haproxy.cfg"
    config.write_text(render(proxy_files(pki_dir, tmp_path), (18001, 18002), 18003, 18004, tmp_path / "haproxy.sock"))
    result = check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    config.write_text(config.read_text().replace("balance roundrobin", "balance no-such-algorithm", 1))
    assert check(config).returncode != 0  # the check can fail

    lines = [line.split("#")[0].strip() for line in SHIPPED.read_text().splitlines()]
    for header in (Settings.__dataclass_fields__["client_cert_header"].default, "X-Forwarded-For"):
        deleted = lines.index(f"http-request del-header {header}")
        (set_at,) = [i for i, line in enumerate(lines) if line.startswith(f"http-request set-header {header} ")]
        assert deleted < set_at
    sources = [line for line in lines if line.startswith("source ")]
    assert len(sources) == 3 and len(set(sources)) == 2  # terminated traffic (2 backends) from one address, passthrough from another
