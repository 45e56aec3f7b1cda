"""The `est` CLI for real: init, and users as the running app sees them."""

from __future__ import annotations

import base64
import json
import os
import pty
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from est_app import create_app, instance_path
from est_app.cli.accounts import MIN_PASSWORD_LENGTH
from est_app.state import state

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, encrypt_key_file, make_csr
from .test_admin_api import enroll, enroll_under_shared_name

ENROLL = "/.well-known/est/simpleenroll"
BODY = base64.b64encode(der(make_csr()))


def test_init_creates_everything_once_and_never_overwrites(tmp_path):
    first = run_cli("init", "--dir", str(tmp_path))
    assert first.exit_code == 0 and "created development CA" in first.output
    for name in ("ca.key", "tls.key", "est.db"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".pem", ".key", ".yaml")}
    second = run_cli("init", "--dir", str(tmp_path))
    assert second.exit_code == 0 and "created" not in second.output and "kept the existing TLS certificate" in second.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".pem", ".key", ".yaml")} == before


def test_init_refuses_a_lone_key(tmp_path):
    (tmp_path / "ca.key").write_text("x")
    result = run_cli("init", "--dir", str(tmp_path))
    assert result.exit_code != 0 and "must both exist or neither" in result.output


def test_user_lifecycle_is_seen_by_the_running_app(make_app, tmp_path):
    client = make_app().test_client()
    path = tmp_path / "config.yaml"  # where make_config wrote it

    listed = run_cli("user", "list", config=path)
    assert listed.exit_code == 0 and listed.output.startswith(USER + "\t")
    assert client.post(ENROLL, data=BODY, headers={"Content-Type": "application/pkcs10", **basic_auth()}).status_code == 200

    # Removed, then re-added with a new password: the old one stops working at once,
    # even though its check was just cached.
    assert run_cli("user", "remove", USER, config=path).exit_code == 0
    assert client.post(ENROLL, data=BODY, headers={"Content-Type": "application/pkcs10", **basic_auth()}).status_code == 401
    assert run_cli("user", "add", USER, input="another long password\n", config=path).exit_code == 0
    assert client.post(ENROLL, data=BODY, headers={"Content-Type": "application/pkcs10", **basic_auth()}).status_code == 401
    new = basic_auth(USER, "another long password")
    assert client.post(ENROLL, data=BODY, headers={"Content-Type": "application/pkcs10", **new}).status_code == 200


def test_user_add_refuses_short_duplicate_and_unknown(make_app, tmp_path):
    make_app()
    path = tmp_path / "config.yaml"
    short = run_cli("user", "add", "nurse", input="short\n", config=path)
    assert short.exit_code != 0 and "at least 12 characters" in short.output
    duplicate = run_cli("user", "add", USER, input=PASSWORD + "\n", config=path)
    assert duplicate.exit_code != 0 and "exists already" in duplicate.output
    missing = run_cli("user", "remove", "nobody", config=path)
    assert missing.exit_code != 0 and "no user 'nobody'" in missing.output


def test_console_scripts_and_flask_cli_work(tmp_path):
    bin_dir = Path(sys.executable).parent
    init = subprocess.run([bin_dir / "est-admin", "init", "--dir", tmp_path], capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    add = subprocess.run(
        [bin_dir / "flask", "est", "--config", tmp_path / "config.yaml", "user", "add", "ra1"],
        input="a password of some length\n", capture_output=True, text=True,
    )
    assert add.returncode == 0 and "added user ra1" in add.stdout, add.stderr
    listed = subprocess.run([bin_dir / "est-admin", "--config", tmp_path / "config.yaml", "user", "list"], capture_output=True, text=True)
    assert listed.stdout.startswith("ra1\t")
    bad = subprocess.run([bin_dir / "est-server", "--config", tmp_path / "missing.yaml"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read configuration" in bad.stderr


# --- devices by name or number, lists for people and scripts, the CA key only when signing ---


def test_device_commands_take_the_name_or_the_number_and_a_shared_name_needs_the_label(make_app, tmp_path):
    app = make_app(labels={"pumps": {}})
    client, path = app.test_client(), tmp_path / "config.yaml"
    enroll(client, "NPPBBB4")
    enroll_under_shared_name(app, "NPPBBB4", "pumps")
    enroll(client, "NPPCCC7", "pumps")
    with app.app_context():
        devices = {(d.label, d.device_key): d for d in state().store.find_devices()}

    shown = run_cli("device", "show", "NPPCCC7", config=path)
    assert shown.exit_code == 0 and shown.output.startswith(f"device NPPCCC7 (number {devices[('pumps', 'NPPCCC7')].id}) on label pumps")
    assert run_cli("device", "show", str(devices[("pumps", "NPPCCC7")].id), config=path).output == shown.output

    for command in (["show"], ["revoke"], ["delete"]):
        shared = run_cli("device", *command, "NPPBBB4", config=path)
        assert shared.exit_code == 1, shared.output
        (line,) = shared.output.splitlines()  # one line, naming both labels and the way out
        assert "'NPPBBB4' fits 2 devices" in line and "label 'default'" in line and "label 'pumps'" in line and "--label" in line
    unknown = run_cli("device", "show", "NPPZZZ9", config=path)
    assert unknown.exit_code == 1 and "no device named 'NPPZZZ9'" in unknown.output
    assert "on label 'default'" in run_cli("device", "show", "NPPCCC7", "--label", "default", config=path).output

    revoked = run_cli("device", "revoke", "NPPBBB4", "--label", "pumps", "--reason", "keyCompromise", config=path)
    assert revoked.exit_code == 0, revoked.output
    with app.app_context():
        store = state().store
        assert store.get_certificate(devices[("pumps", "NPPBBB4")].current_serial).revocation_reason == "keyCompromise"
        assert store.get_certificate(devices[("default", "NPPBBB4")].current_serial).status == "valid"
    deleted = run_cli("device", "delete", "NPPBBB4", "--label", "default", config=path)
    assert deleted.exit_code == 0 and "deleted device NPPBBB4" in deleted.output
    with app.app_context():
        assert [(d.label, d.device_key) for d in state().store.find_devices(search="NPPBBB4")] == [("pumps", "NPPBBB4")]
    assert run_cli("device", "show", "NPPBBB4", config=path).exit_code == 0  # one left: the name alone will do


def test_lists_print_tsv_piped_json_on_request_and_a_sentence_when_empty(make_app, tmp_path):
    path = tmp_path / "config.yaml"
    empty = {
        ("device", "list"): "No devices are enrolled yet.",
        ("ra", "list"): "No RAs registered",
        ("cert", "expiring"): "No valid certificate expires within 30 days.",
        ("device", "list", "--search", "NPP"): "No devices match.",
    }
    app = make_app()
    for args, sentence in empty.items():
        for extra in ((), ("--json",)):
            result = run_cli(*args, *extra, config=path)
            assert result.exit_code == 0 and result.stdout == "" and sentence in result.stderr, (args, result.output)

    enroll(app.test_client(), "NPPBBB4")
    with app.app_context():
        (device,) = state().store.find_devices()
    rows = run_cli("device", "list", config=path).stdout.splitlines()
    assert rows == [f"{device.id}\tdefault\tNPPBBB4\t{device.current_serial}\t{device.last_enrolled:%Y-%m-%dT%H:%M:%S}Z\tvalid"]
    (record,) = [json.loads(line) for line in run_cli("device", "list", "--json", config=path).stdout.splitlines()]
    assert (record["number"], record["name"], record["label"], record["status"]) == (device.id, "NPPBBB4", "default", "valid")
    (user,) = [json.loads(line) for line in run_cli("user", "list", "--json", config=path).stdout.splitlines()]
    assert (user["name"], user["role"]) == (USER, "est")
    expiring = [json.loads(line) for line in run_cli("cert", "expiring", "--days", "400", "--json", config=path).stdout.splitlines()]
    assert [(c["serial"], c["device_number"]) for c in expiring] == [(device.current_serial, device.id)]
    events = [json.loads(line) for line in run_cli("audit", "--device", "NPPBBB4", "--json", config=path).stdout.splitlines()]
    assert [(e["event"], e["device_name"]) for e in events] == [("enroll", "NPPBBB4")]
    assert "No audit events match." in run_cli("audit", "--device", "NPPZZZ9", config=path).stderr


def on_a_terminal(*argv: str | Path) -> str:
    """What a command prints when its stdout is a terminal (a real pseudo-terminal)."""
    controller, terminal = pty.openpty()
    with subprocess.Popen([Path(sys.executable).parent / "est-admin", *argv], stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL) as process:
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command has exited and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(timeout=60)
    os.close(controller)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_lists_have_a_header_on_a_terminal(make_app, tmp_path):
    app = make_app()
    enroll(app.test_client(), "NPPBBB4")
    config = tmp_path / "config.yaml"
    header, row = on_a_terminal("--config", config, "device", "list").splitlines()
    assert header.split() == ["NUMBER", "LABEL", "NAME", "CURRENT", "SERIAL", "LAST", "ENROLLED", "STATUS"]
    assert row.split()[1:3] == ["default", "NPPBBB4"] and row.split()[-1] == "valid" and header.index("NAME") == row.index("NPPBBB4")
    assert on_a_terminal("--config", config, "user", "list").splitlines()[0].split() == ["NAME", "ROLE", "CREATED"]
    assert on_a_terminal("--config", config, "cert", "expiring").strip() == "No valid certificate expires within 30 days."


def test_user_add_says_when_no_password_was_given_and_help_states_the_minimum(make_app, tmp_path):
    make_app()
    none = run_cli("user", "add", "nurse", input="", config=tmp_path / "config.yaml")
    assert none.exit_code == 1 and "no password given" in none.output and "12" not in none.output
    assert f"at least {MIN_PASSWORD_LENGTH} characters" in " ".join(run_cli("user", "add", "--help").output.split())


def test_config_help_and_error_name_the_fallback_and_the_production_path(tmp_path, monkeypatch):
    monkeypatch.delenv("EST_CONFIG", raising=False)
    assert str(instance_path() / "config.yaml") in " ".join(run_cli("--help").output.split())
    monkeypatch.chdir(tmp_path)
    missing = subprocess.run(
        [Path(sys.executable).parent / "est-admin", "user", "list"], capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "EST_CONFIG"},
    )
    if (instance_path() / "config.yaml").exists():
        pytest.skip(f"{instance_path() / 'config.yaml'} exists in this checkout: the fallback is taken")
    assert missing.returncode == 1 and "/etc/est/config.yaml" in missing.stderr and "EST_CONFIG" in missing.stderr


def test_store_commands_run_without_the_ca_key_passphrase_and_signing_ones_say_why_not(pki_dir, make_config, tmp_path):
    """The passphrase as a systemd credential: a file that exists only while the service runs."""
    passphrase = tmp_path / "credentials" / "ca-key-passphrase"
    passphrase.parent.mkdir()
    passphrase.write_text("a passphrase for the CA key\n")
    encrypt_key_file(pki_dir / "ca.key", tmp_path / "ca.key", b"a passphrase for the CA key")
    path = make_config(ca={"key_file": str(tmp_path / "ca.key"), "key_passphrase_file": str(passphrase)})
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=path).exit_code == 0
    app = create_app(path)  # the service, with its credential
    enroll(app.test_client(), "NPPBBB4")
    with app.app_context():
        (device,) = state().store.find_devices()

    passphrase.unlink()  # the service has stopped
    for args in (["user", "list"], ["device", "list"], ["device", "show", "NPPBBB4"], ["audit"], ["ra", "list"], ["cert", "expiring", "--days", "400"]):
        result = run_cli(*args, config=path)
        assert result.exit_code == 0, (args, result.output)
    assert run_cli("user", "add", "nurse", input="a long enough password\n", config=path).exit_code == 0
    for args in (["cert", "revoke", device.current_serial], ["device", "revoke", "NPPBBB4"], ["crl"]):
        refused = run_cli(*args, config=path)
        assert refused.exit_code == 1, (args, refused.output)
        (line,) = refused.output.splitlines()
        assert "without the CA key" in line and f"ca.key_passphrase_file {passphrase}: cannot read it" in line, line
    with app.app_context():
        assert state().store.get_certificate(device.current_serial).status == "valid"  # nothing half-done
