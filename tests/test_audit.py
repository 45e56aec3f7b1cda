"""The audit trail: one event per operation with who, what and where; one per refusal; never a secret.

Operations run for real through the Flask test client (EST) and the CLI (revocation, devices,
users, RAs); events are read back from the store and through `est audit`.
"""

from __future__ import annotations

import base64
import getpass
import json
import sqlite3
import time
from datetime import datetime, timezone
from email import message_from_bytes
from email.policy import HTTP
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from est_app import create_app
from est_app.auth import fingerprint
from est_app.state import state

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, make_csr, pem
from .test_enroll import certs_from

CLI = f"cli:{getpass.getuser()}"
FIELDS = {"id", "at", "event", "outcome", "actor", "client_address", "label", "device_name", "serial", "detail"}
LABELS = {"pumps": {"auth": ["cert"]}, "unique": {"duplicate_policy": "reject"}}
WRONG_PASSWORD = "not the right password at all"


@pytest.fixture
def env(make_config, tmp_path) -> SimpleNamespace:
    """An app with bootstrap on and the labels above; the test user added through the CLI."""
    config = make_config(bootstrap_enabled=True, labels=LABELS)
    result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=config)
    assert result.exit_code == 0, result.output
    app = create_app(config)
    app.config["TESTING"] = True
    return SimpleNamespace(app=app, client=app.test_client(), config=config, db=tmp_path / "est.db", seen=0)


def new_events(env: SimpleNamespace) -> list:
    """The events written since the last call."""
    with env.app.app_context():
        events = [e for e in state().store.audit_events() if e.id > env.seen]
    if events:
        env.seen = events[-1].id
    return events


def one_event(env: SimpleNamespace):
    events = new_events(env)
    assert len(events) == 1, events
    return events[0]


def cli(env: SimpleNamespace, *args: str, input: str | None = None):
    return run_cli(*args, input=input, config=env.config)


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def post(env, op: str, body: bytes, *, label: str | None = None, auth: dict | None = None, cert: x509.Certificate | None = None):
    path = f"/.well-known/est/{label}/{op}" if label else f"/.well-known/est/{op}"
    environ = {"SSL_CLIENT_CERT": pem(cert).decode()} if cert is not None else {}
    headers = {"Content-Type": "application/pkcs10", **(basic_auth() if auth is None else auth)}
    return env.client.post(path, data=body, headers=headers, environ_base=environ)


def enrolled(response) -> x509.Certificate:
    assert response.status_code == 200, response.get_data(as_text=True)
    (cert,) = certs_from(response)
    return cert


def enroll(env, cn: str = "NPPBBB4", key=None, **kw) -> x509.Certificate:
    return enrolled(post(env, "simpleenroll", der(make_csr(cn, key)), **kw))


def assert_event(record, **expected) -> None:
    actual = {name: getattr(record, name) for name in expected}
    assert actual == expected
    assert record.at is not None and abs((datetime.now(timezone.utc).replace(tzinfo=None) - record.at).total_seconds()) < 30


# --- one event per operation ---------------------------------------------------------------------


def test_user_add_written_by_the_fixture(env):
    event = one_event(env)
    assert_event(event, event="user-add", outcome="ok", actor=CLI, label="", device="", serial="", detail=f"{USER} (est)")


def test_enroll(env):
    new_events(env)
    cert = enroll(env)
    assert_event(
        one_event(env), event="enroll", outcome="ok", actor=f"user:{USER}", client_address="127.0.0.1",
        label="default", device="NPPBBB4", serial=serial(cert), detail="",
    )
    cert = enroll(env, "NPPLABEL", label="unique")
    assert_event(one_event(env), event="enroll", outcome="ok", actor=f"user:{USER}", label="unique", device="NPPLABEL", serial=serial(cert))


def test_enroll_by_an_ra(env, tmp_path):
    ra_key = ec.generate_private_key(ec.SECP256R1())
    ra_cert = enroll(env, "IQE-Gateway", ra_key)
    ra_file = tmp_path / "ra.pem"
    ra_file.write_bytes(pem(ra_cert))
    new_events(env)
    result = cli(env, "ra", "add", str(ra_file), "--label", "pumps")
    assert result.exit_code == 0, result.output
    event = one_event(env)
    assert_event(event, event="ra-add", outcome="ok", actor=CLI, label="", device="", serial="")
    assert fingerprint(ra_cert) in event.detail and "CN=IQE-Gateway" in event.detail and "pumps" in event.detail

    cert = enroll(env, "NPPRA01", label="pumps", auth={}, cert=ra_cert)
    assert_event(
        one_event(env), event="enroll", outcome="ok", actor=f"ra:{fingerprint(ra_cert)}", label="pumps", device="NPPRA01", serial=serial(cert)
    )

    result = cli(env, "ra", "remove", fingerprint(ra_cert))
    assert result.exit_code == 0, result.output
    assert_event(one_event(env), event="ra-remove", outcome="ok", actor=CLI, detail=fingerprint(ra_cert))
    result = cli(env, "ra", "remove", fingerprint(ra_cert))
    assert result.exit_code == 1
    assert new_events(env) == []  # nothing removed, nothing recorded




def reenroll(env):
    key = ec.generate_private_key(ec.SECP256R1())
    old = enroll(env, "NPPRE", key)
    new_events(env)
    new = enrolled(post(env, "simplereenroll", der(make_csr("NPPRE", key)), auth={}, cert=old))
    return old, new, one_event(env)


def test_reenroll(env):
    old, new, event = reenroll(env)
    assert_event(
        event, event="reenroll", outcome="ok", client_address="127.0.0.1", label="default",
        device="NPPRE", serial=serial(new), detail=f"supersedes {serial(old)}",
    )


def test_reenroll_actor_is_the_device(env):
    old, _, event = reenroll(env)
    assert event.actor == f"device:{serial(old)}"


def serverkeygen_key(response) -> bytes:
    """The PKCS#8 DER of a serverkeygen answer (multipart/mixed, each part base64 by default)."""
    assert response.status_code == 200, response.get_data(as_text=True)
    message = message_from_bytes(
        f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode() + response.get_data(), policy=HTTP
    )
    (key_part,) = [p for p in message.iter_parts() if p.get_content_type() == "application/pkcs8"]
    return base64.b64decode(key_part.get_payload())


def test_keygen(env):
    new_events(env)
    response = post(env, "serverkeygen", der(make_csr("NPPKG")))
    key = serialization.load_der_private_key(serverkeygen_key(response), None)
    event = one_event(env)
    assert_event(event, event="keygen", outcome="ok", actor=f"user:{USER}", label="default", device="NPPKG")
    with env.app.app_context():
        record = state().store.get_certificate(event.serial)
    assert x509.load_der_x509_certificate(record.der).public_key() == key.public_key()


def test_bootstrap(env):
    new_events(env)
    cert = enrolled(post(env, "bootstrap", der(make_csr("NPPBOOT"))))
    assert_event(one_event(env), event="bootstrap", outcome="ok", label="default", device="NPPBOOT", serial=serial(cert))


def test_bootstrap_actor_is_the_user(env):
    new_events(env)
    enrolled(post(env, "bootstrap", der(make_csr("NPPBOOT"))))
    assert one_event(env).actor == f"user:{USER}"


@pytest.mark.parametrize("how", ["cert revoke", "device revoke"])
def test_revoke_via_cli(env, how):
    cert = enroll(env, "NPPSTOLEN", label="unique")
    new_events(env)
    if how == "cert revoke":
        result = cli(env, "cert", "revoke", serial(cert).upper(), "--reason", "keyCompromise")
    else:
        with env.app.app_context():
            (device,) = state().store.find_devices(search="NPPSTOLEN")
        result = cli(env, "device", "revoke", str(device.id), "--reason", "keyCompromise")
    assert result.exit_code == 0, result.output
    assert_event(
        one_event(env), event="revoke", outcome="ok", actor=CLI, label="unique", device="NPPSTOLEN",
        serial=serial(cert), detail="keyCompromise",
    )
    # refused revocations (already revoked, unknown serial) leave nothing
    assert cli(env, "cert", "revoke", serial(cert)).exit_code == 1
    assert cli(env, "cert", "revoke", "abcdef").exit_code == 1
    assert new_events(env) == []


def test_device_delete(env):
    enroll(env, "NPPGONE", label="unique")
    with env.app.app_context():
        (device,) = state().store.find_devices(search="NPPGONE")
    new_events(env)
    result = cli(env, "device", "delete", str(device.id))
    assert result.exit_code == 0, result.output
    revoked, deleted = new_events(env)  # one transaction: the current certificate is revoked with the device
    assert_event(revoked, event="revoke", outcome="ok", actor=CLI, label="unique", device="NPPGONE", serial=device.current_serial, detail="cessationOfOperation")
    assert_event(deleted, event="device-delete", outcome="ok", actor=CLI, label="unique", device="NPPGONE", serial=device.current_serial,
                 detail=f"device {device.id}; its certificates revoked")
    assert cli(env, "device", "delete", str(device.id)).exit_code == 1
    assert new_events(env) == []


def test_user_add_and_remove(env):
    new_events(env)
    result = cli(env, "user", "add", "nurse-admin", "--admin", input="another long password\n")
    assert result.exit_code == 0, result.output
    assert_event(one_event(env), event="user-add", outcome="ok", actor=CLI, detail="nurse-admin (admin)")
    assert cli(env, "user", "add", "nurse-admin", input="another long password\n").exit_code == 1  # exists
    assert cli(env, "user", "add", "shorty", input="short\n").exit_code == 1  # password too short
    assert new_events(env) == []
    result = cli(env, "user", "remove", "nurse-admin")
    assert result.exit_code == 0, result.output
    assert_event(one_event(env), event="user-remove", outcome="ok", actor=CLI, detail="nurse-admin")
    assert cli(env, "user", "remove", "nurse-admin").exit_code == 1
    assert new_events(env) == []


# --- one event per refusal -----------------------------------------------------------------------


def _duplicate(env):
    enroll(env, "NPPDUP", label="unique")
    new_events(env)
    return post(env, "simpleenroll", der(make_csr("NPPDUP")), label="unique")


def _revoked_reenroll(env):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = enroll(env, "NPPREV", key)
    assert cli(env, "cert", "revoke", serial(cert)).exit_code == 0
    new_events(env)
    return post(env, "simplereenroll", der(make_csr("NPPREV", key)), auth={}, cert=cert)


# (id, request, status, event, actor, phrase in detail)
REFUSALS = [
    ("bad CSR", lambda env: post(env, "simpleenroll", b"this is not a CSR"), 400, "enroll", f"user:{USER}", "400 "),
    ("weak key", lambda env: post(env, "simpleenroll", der(make_csr("NPPWEAK", _rsa1024()))), 400, "enroll", f"user:{USER}", "400 "),
    ("wrong password", lambda env: post(env, "simpleenroll", der(make_csr()), auth=basic_auth(USER, WRONG_PASSWORD)), 401, "enroll", "anonymous", "401 credentials not accepted"),
    ("no credentials", lambda env: post(env, "simpleenroll", der(make_csr()), auth={}), 401, "enroll", "anonymous", "401 authentication required"),
    ("password on a cert-only label", lambda env: post(env, "simpleenroll", der(make_csr()), label="pumps"), 403, "enroll", "anonymous", "403 label 'pumps' does not accept passwords"),
    ("duplicate under reject", _duplicate, 409, "enroll", f"user:{USER}", "409 device 'NPPDUP'"),
    ("serverkeygen, wrong password", lambda env: post(env, "serverkeygen", der(make_csr()), auth=basic_auth(USER, WRONG_PASSWORD)), 401, "keygen", "anonymous", "401 "),
    ("bootstrap, no credentials", lambda env: post(env, "bootstrap", der(make_csr()), auth={}), 401, "bootstrap", "anonymous", "401 "),
    ("reenroll without a certificate", lambda env: post(env, "simplereenroll", der(make_csr()), auth={}), 401, "reenroll", "anonymous", "401 re-enrollment needs the current certificate"),
    ("reenroll with a revoked certificate", _revoked_reenroll, 401, "reenroll", "anonymous", "is revoked"),
]
REFUSALS_AFTER_AUTHENTICATION = [
    pytest.param(lambda env: _other_subject(env), 403, "reenroll", "device", "403 CSR subject", id="reenroll, other subject"),
    pytest.param(lambda env: _bootstrap_twice(env), 409, "bootstrap", f"user:{USER}", "409 device 'NPPBOOT2'", id="bootstrap, duplicate"),
]


def _other_subject(env):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = enroll(env, "NPPSUBJ", key)
    env.device_actor = f"device:{serial(cert)}"
    new_events(env)
    return post(env, "simplereenroll", der(make_csr("NPPOTHER", key)), auth={}, cert=cert)


def _bootstrap_twice(env):
    enrolled(post(env, "bootstrap", der(make_csr("NPPBOOT2"))))
    new_events(env)
    return post(env, "bootstrap", der(make_csr("NPPBOOT2")))


def _rsa1024():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.mark.parametrize(
    "request_, status, event_name, actor, phrase", [pytest.param(*r[1:], id=r[0]) for r in REFUSALS] + REFUSALS_AFTER_AUTHENTICATION
)
def test_a_refusal_leaves_exactly_one_event(env, request_, status, event_name, actor, phrase):
    new_events(env)
    response = request_(env)
    actor = getattr(env, "device_actor", actor) if actor == "device" else actor
    assert response.status_code == status, response.get_data(as_text=True)
    message = response.get_data(as_text=True).strip()
    event = one_event(env)
    assert_event(event, event=event_name, outcome="refused", actor=actor, client_address="127.0.0.1", serial="")
    assert event.detail == f"{status} {message}"  # the status and the very line the client got
    assert phrase in event.detail


def test_a_refused_request_is_followed_by_normal_service(env):
    new_events(env)
    assert post(env, "simpleenroll", b"garbage").status_code == 400
    cert = enroll(env, "NPPAFTER")
    refusal, success = new_events(env)
    assert (refusal.outcome, success.outcome, success.serial) == ("refused", "ok", serial(cert))


# --- secrets never reach the trail ---------------------------------------------------------------


def test_no_event_holds_a_password_or_a_private_key(env, tmp_path):
    # every kind of event, with secrets in flight: passwords (right and wrong) and a server-made key
    post(env, "simpleenroll", der(make_csr()), auth=basic_auth(USER, WRONG_PASSWORD))
    post(env, "simpleenroll", der(make_csr()), auth=basic_auth("nobody", PASSWORD))
    enroll(env, "NPPSECRET")
    response = post(env, "serverkeygen", der(make_csr("NPPKEY")))
    key_der = serverkeygen_key(response)
    key = serialization.load_der_private_key(key_der, None)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert cli(env, "user", "add", "second-user", input="second secret password\n").exit_code == 0
    cert = enroll(env, "NPPREVOKE")
    assert cli(env, "cert", "revoke", serial(cert)).exit_code == 0

    with sqlite3.connect(env.db) as db:
        rows = db.execute("SELECT * FROM audit_events").fetchall()
    assert len(rows) >= 8
    text = "\n".join("\t".join(str(v) for v in row) for row in rows)
    dump = run_cli("audit", "--json", config=env.config).output + run_cli("audit", config=env.config).output
    secrets = {
        "test password": PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "second user's password": "second secret password",
        "Basic header": basic_auth()["Authorization"].split()[1],
        "serverkeygen key, base64": base64.b64encode(key_der).decode(),
        "serverkeygen key, first base64 line": base64.b64encode(key_der).decode()[:64],
        "serverkeygen key, hex": key_der.hex(),
        "serverkeygen key, PEM body": key_pem.decode().splitlines()[1],
        "private scalar": format(key.private_numbers().private_value, "x"),
    }
    for what, secret in secrets.items():
        assert secret not in text, f"{what} found in audit_events"
        assert secret not in dump, f"{what} found in `est audit` output"
    assert "PRIVATE KEY" not in text


# --- est audit -----------------------------------------------------------------------------------


def audit_json(env, *args: str) -> list[dict]:
    result = cli(env, "audit", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]  # stdout: an empty list's sentence goes to stderr


def test_est_audit_json_lines(env):
    cert = enroll(env, "NPPJSON")
    post(env, "simpleenroll", der(make_csr()), auth={})
    assert cli(env, "cert", "revoke", serial(cert), "--reason", "keyCompromise").exit_code == 0
    records = audit_json(env)
    assert all(set(r) == FIELDS for r in records)
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)  # oldest first
    for r in records:
        assert r["at"].endswith("Z")
        assert datetime.fromisoformat(r["at"].removesuffix("Z"))
    assert [(r["event"], r["outcome"], r["actor"], r["device_name"], r["serial"]) for r in records] == [
        ("user-add", "ok", CLI, "", ""),
        ("enroll", "ok", f"user:{USER}", "NPPJSON", serial(cert)),
        ("enroll", "refused", "anonymous", "", ""),
        ("revoke", "ok", CLI, "NPPJSON", serial(cert)),
    ]
    assert records[1]["label"] == "default" and records[1]["client_address"] == "127.0.0.1"
    assert records[2]["detail"].startswith("401 authentication required")
    assert records[3]["detail"] == "keyCompromise"


def test_est_audit_text_lines(env):
    cert = enroll(env, "NPPTEXT")
    result = cli(env, "audit")
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.output.splitlines()]
    assert all(len(fields) == 9 for fields in lines)
    assert lines[-1][1:] == ["enroll", "ok", f"user:{USER}", "127.0.0.1", "default", "NPPTEXT", serial(cert), ""]
    assert datetime.strptime(lines[-1][0], "%Y-%m-%dT%H:%M:%SZ")


def test_est_audit_since_and_device(env):
    early = enroll(env, "NPPEARLY")
    # --since takes whole seconds: start the next second, then act
    time.sleep(1.05 - datetime.now(timezone.utc).microsecond / 1e6)
    since = datetime.now(timezone.utc).replace(microsecond=0)
    late = enroll(env, "NPPLATE")
    assert cli(env, "cert", "revoke", serial(early)).exit_code == 0
    assert cli(env, "cert", "revoke", serial(late)).exit_code == 0

    for stamp in (since.strftime("%Y-%m-%d %H:%M:%S"), since.strftime("%Y-%m-%dT%H:%M:%S")):
        records = audit_json(env, "--since", stamp)
        assert [(r["event"], r["device_name"]) for r in records] == [("enroll", "NPPLATE"), ("revoke", "NPPEARLY"), ("revoke", "NPPLATE")]
    records = audit_json(env, "--device", "NPPEARLY")
    assert [(r["event"], r["serial"]) for r in records] == [("enroll", serial(early)), ("revoke", serial(early))]
    records = audit_json(env, "--device", "NPPEARLY", "--since", since.strftime("%Y-%m-%d %H:%M:%S"))
    assert [r["event"] for r in records] == ["revoke"]
    assert audit_json(env, "--device", "NOSUCHPUMP") == []
    assert len(audit_json(env, "--since", "2000-01-01")) == len(audit_json(env))
    result = cli(env, "audit", "--since", "yesterday")
    assert result.exit_code == 2 and "Invalid value for '--since'" in result.output
