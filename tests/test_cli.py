"""The `est` CLI for real: init, and users as the running app sees them."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
from pathlib import Path

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, make_csr

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
