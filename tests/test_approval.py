"""Manual approval (issue 9, RFC 7030 4.2.3) through the test client, the CLI and the admin API."""

from __future__ import annotations

import base64
import html
from datetime import timedelta

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from est_app.state import state
from est_app.store.schema import enrollment_requests

from .conftest import basic_auth, run_cli
from .pki import der, ec_key, make_csr, pem
from .test_admin_api import ADMIN, ADMIN_PASSWORD, add_admin
from .test_dashboard import ADMIN as ADMIN_NAME
from .test_dashboard import XSS, Browser, field, make_dashboard  # noqa: F401  (make_dashboard: a fixture)

ENROLL = "/.well-known/est/simpleenroll"
KEYGEN = "/.well-known/est/serverkeygen"
MANUAL = {"mode": "manual", "retry_after_seconds": 7}


def fresh_key():
    return ec_key(ec.SECP256R1())


def post(client, csr, path: str = ENROLL):
    return client.post(path, data=base64.b64encode(der(csr)), headers={"Content-Type": "application/pkcs10", **basic_auth()})


def certificate_of(response):
    body = response.get_data()
    if response.headers.get("Content-Transfer-Encoding") == "base64":
        body = base64.b64decode(body)
    (certificate,) = pkcs7.load_der_pkcs7_certificates(body)
    return certificate


def pending(app) -> list:
    with app.app_context():
        with state().store.engine.connect() as conn:
            return conn.execute(enrollment_requests.select().order_by(enrollment_requests.c.id)).all()


def test_auto_is_todays_behaviour(make_app):
    client = make_app().test_client()
    assert post(client, make_csr("NPPAUTO1")).status_code == 200


@pytest.mark.both_databases
def test_manual_waits_then_issues_the_stored_csr_once_approved(make_app, make_config):
    app = make_app(approval=MANUAL)
    client = app.test_client()
    csr = make_csr("NPPBBB4", key=fresh_key())

    first = post(client, csr)
    assert first.status_code == 202
    assert first.headers["Retry-After"] == "7"
    assert first.content_type.startswith("text/plain")
    assert "waiting for an operator" in first.get_data(as_text=True)
    assert "Content-Transfer-Encoding" not in first.headers
    again = post(client, csr)
    assert again.status_code == 202
    (row,) = pending(app)
    assert (row.status, row.device_key, row.operation, row.requester) == ("pending", "NPPBBB4", "simpleenroll", "user:gateway")

    listed = run_cli("request", "list", config=make_config(approval=MANUAL))
    assert listed.exit_code == 0 and "NPPBBB4" in listed.output and str(row.id) in listed.output
    shown = run_cli("request", "show", str(row.id), config=make_config(approval=MANUAL))
    assert shown.exit_code == 0 and "public_key: ec-p256" in shown.output and "BEGIN CERTIFICATE REQUEST" in shown.output
    assert run_cli("request", "show", "999", config=make_config(approval=MANUAL)).exit_code == 1
    approved = run_cli("request", "approve", str(row.id), config=make_config(approval=MANUAL))
    assert approved.exit_code == 0, approved.output

    issued = post(client, csr)
    assert issued.status_code == 200, issued.get_data(as_text=True)
    certificate = certificate_of(issued)
    assert certificate.public_key() == csr.public_key()
    assert pending(app)[0].status == "collected"
    with app.app_context():
        events = [e.event for e in state().store.audit_events(device="NPPBBB4")]
    assert events == ["request", "request-approve", "enroll", "request-collect"]


def test_rejected_requests_get_the_operators_reason(make_app, make_config):
    app = make_app(approval=MANUAL)
    client = app.test_client()
    csr = make_csr("NPPREJ1")
    assert post(client, csr).status_code == 202
    (row,) = pending(app)
    refused_without_reason = run_cli("request", "reject", str(row.id), config=make_config(approval=MANUAL))
    assert refused_without_reason.exit_code != 0
    rejected = run_cli("request", "reject", str(row.id), "--reason", "not in the asset list", config=make_config(approval=MANUAL))
    assert rejected.exit_code == 0, rejected.output
    answer = post(client, csr)
    assert answer.status_code == 403
    assert "not in the asset list" in answer.get_data(as_text=True)
    assert post(client, csr).status_code == 403  # the same CSR stays refused


def test_another_csr_replaces_the_pending_request(make_app):
    app = make_app(approval=MANUAL)
    client = app.test_client()
    assert post(client, make_csr("NPPREP1")).status_code == 202
    second_key = fresh_key()
    second = make_csr("NPPREP1", key=second_key)
    assert post(client, second).status_code == 202
    (row,) = pending(app)  # replaced, not added
    assert row.csr == der(second)
    resigned = make_csr("NPPREP1", key=second_key)  # the same key and subject signed again: the same request
    assert post(client, resigned).status_code == 202
    assert pending(app)[0].csr == der(second)
    with app.app_context():
        assert "request-replace" in [e.event for e in state().store.audit_events(device="NPPREP1")]


def test_a_request_past_pending_hours_is_refused_as_expired(make_app):
    app = make_app(approval={"mode": "manual", "pending_hours": 1})
    client = app.test_client()
    csr = make_csr("NPPOLD1")
    assert post(client, csr).status_code == 202
    with app.app_context():
        with state().store.engine.begin() as conn:
            created_at = conn.execute(sa.select(enrollment_requests.c.created_at)).scalar_one()
            conn.execute(enrollment_requests.update().values(created_at=created_at - timedelta(hours=2)))
    answer = post(client, csr)
    assert answer.status_code == 403
    assert "expired after 1 hours" in answer.get_data(as_text=True)
    assert pending(app)[0].status == "expired"
    assert post(client, csr).status_code == 202  # the next try files a new request
    assert [r.status for r in pending(app)] == ["expired", "pending"]


def test_inventory_devices_issue_at_once_others_wait(make_app, make_config, tmp_path):
    settings = {"approval": {"mode": "auto"}, "labels": {"pumps": {"approval": {"mode": "inventory"}}}}
    app = make_app(**settings)
    client = app.test_client()
    listing = tmp_path / "inventory.csv"
    listing.write_text("asset,serial\n1,NPPINV1\n2,NPPINV2\n")
    added = run_cli("device", "allow", "--label", "pumps", "--file", str(listing), "--column", "serial", config=make_config(**settings))
    assert added.exit_code == 0, added.output
    assert post(client, make_csr("NPPINV1"), "/.well-known/est/pumps/simpleenroll").status_code == 200
    assert post(client, make_csr("NPPOTHER"), "/.well-known/est/pumps/simpleenroll").status_code == 202
    assert post(client, make_csr("NPPOTHER2")).status_code == 200  # the unlabelled path is auto


def test_serverkeygen_makes_the_key_only_when_collected(make_app, make_config):
    app = make_app(approval=MANUAL)
    client = app.test_client()
    csr = make_csr("NPPKEY1", key=fresh_key())
    assert post(client, csr, KEYGEN).status_code == 202
    (row,) = pending(app)
    assert row.operation == "serverkeygen"
    assert run_cli("request", "approve", str(row.id), config=make_config(approval=MANUAL)).exit_code == 0
    answer = post(client, csr, KEYGEN)
    assert answer.status_code == 200
    assert answer.content_type.startswith("multipart/mixed")
    with app.app_context():
        with state().store.engine.connect() as conn:
            assert b"PRIVATE" not in conn.execute(sa.select(enrollment_requests.c.csr)).scalar_one()


def test_the_admin_api_lists_shows_decides_and_edits_the_inventory(make_app, make_config):
    app = make_app(approval=MANUAL)
    config = make_config(approval=MANUAL)
    add_admin(config)
    client = app.test_client()
    admin = basic_auth(ADMIN, ADMIN_PASSWORD)
    as_json = {**admin, "Content-Type": "application/json"}
    hostile = make_csr("<script>alert(1)</script>", key=fresh_key())
    assert post(client, hostile).status_code == 202
    assert post(client, make_csr("NPPAPI2", key=fresh_key())).status_code == 202

    listed = client.get("/api/v1/requests", headers=admin).get_json()["items"]
    assert [r["device"] for r in listed] == ["<script>alert(1)</script>", "NPPAPI2"]
    assert client.get("/api/v1/requests", headers={**basic_auth()}).status_code in (401, 403)  # not an admin
    shown = client.get(f"/api/v1/requests/{listed[1]['id']}", headers=admin).get_json()
    assert shown["csr_pem"].startswith("-----BEGIN CERTIFICATE REQUEST-----") and shown["public_key"] == "ec-p256"
    assert client.get("/api/v1/requests/999", headers=admin).status_code == 404

    no_reason = client.post(f"/api/v1/requests/{listed[0]['id']}/reject", headers=as_json, data="{}")
    assert no_reason.status_code == 400 and "reason" in no_reason.get_json()["error"]
    rejected = client.post(f"/api/v1/requests/{listed[0]['id']}/reject", headers=as_json, data='{"reason": "unknown device"}')
    assert rejected.status_code == 200 and rejected.get_json()["decided_by"] == f"admin:{ADMIN}"
    approved = client.post(f"/api/v1/requests/{listed[1]['id']}/approve", headers=as_json, data="{}")
    assert approved.get_json()["status"] == "approved"
    again = client.post(f"/api/v1/requests/{listed[1]['id']}/approve", headers=as_json, data="{}")
    assert again.status_code == 409
    with app.app_context():
        decisions = [(e.event, e.actor) for e in state().store.audit_events() if e.event.startswith("request-")]
    assert decisions == [("request-reject", f"admin:{ADMIN}"), ("request-approve", f"admin:{ADMIN}")]

    added = client.post("/api/v1/inventory", headers=as_json, data='{"devices": ["NPPINV9", "NPPINV9", "NPPINV8"]}')
    assert added.get_json() == {"label": "default", "added": 2, "listed_already": 0}
    assert client.post("/api/v1/inventory", headers=as_json, data='{"label": "nosuch", "devices": ["X"]}').status_code == 400
    items = client.get("/api/v1/inventory", headers=admin).get_json()["items"]
    assert [i["device"] for i in items] == ["NPPINV8", "NPPINV9"]
    assert client.delete("/api/v1/inventory/default/NPPINV8", headers=admin).status_code == 204
    assert client.delete("/api/v1/inventory/default/NPPINV8", headers=admin).status_code == 404


def test_the_dashboard_page_shows_escaped_requests_and_decides_with_csrf(make_dashboard):
    app = make_dashboard(approval=MANUAL)
    client = app.test_client()
    assert post(client, make_csr(XSS, key=fresh_key())).status_code == 202
    assert post(client, make_csr("NPPDASH2", key=fresh_key())).status_code == 202
    hostile, plain = pending(app)
    admin = Browser(app)
    assert admin.login().status_code == 302

    page = admin.get("/admin/requests")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert XSS not in body and html.escape(XSS) in body  # the CN a device chose is shown, never run
    assert "BEGIN CERTIFICATE REQUEST" in body and "ec-p256" in body
    token = field(page, "csrf")

    forged = admin.post(f"/admin/requests/{plain.id}/approve", {"csrf": "forged"})
    assert forged.status_code == 400
    assert pending(app)[1].status == "pending"
    approved = admin.post(f"/admin/requests/{plain.id}/approve", {"csrf": token})
    assert approved.status_code == 302
    no_reason = admin.post(f"/admin/requests/{hostile.id}/reject", {"csrf": token, "reason": " "})
    assert no_reason.status_code == 400
    assert admin.post(f"/admin/requests/{hostile.id}/reject", {"csrf": token, "reason": "unknown pump"}).status_code == 302
    assert [r.status for r in pending(app)] == ["rejected", "approved"]
    assert [r.decided_by for r in pending(app)] == [f"admin:{ADMIN_NAME}"] * 2
    again = admin.post(f"/admin/requests/{plain.id}/approve", {"csrf": token})
    assert again.status_code == 409

    assert admin.post("/admin/inventory", {"csrf": token, "label": "default", "devices": "NPPINV1\nNPPINV2\n"}).status_code == 302
    assert admin.post("/admin/inventory", {"csrf": "forged", "label": "default", "devices": "NPPEVIL"}).status_code == 400
    listed = admin.get("/admin/requests").get_data(as_text=True)
    assert "NPPINV1" in listed and "NPPINV2" in listed and "NPPEVIL" not in listed
    assert admin.post("/admin/inventory/remove", {"csrf": token, "label": "default", "device": "NPPINV1"}).status_code == 302
    remaining = admin.get("/admin/requests").get_data(as_text=True)
    assert 'name="device" value="NPPINV1"' not in remaining and 'name="device" value="NPPINV2"' in remaining
    with app.app_context():
        events = [(e.event, e.actor) for e in state().store.audit_events() if e.event.startswith(("request-", "inventory-"))]
    assert events == [
        ("request-approve", f"admin:{ADMIN_NAME}"), ("request-reject", f"admin:{ADMIN_NAME}"),
        ("inventory-add", f"admin:{ADMIN_NAME}"), ("inventory-remove", f"admin:{ADMIN_NAME}"),
    ]


def approve_all(app) -> None:
    with app.app_context():
        for row in pending(app):
            if row.status == "pending":
                state().approval.decide(row.id, True, "admin:test")


@pytest.mark.parametrize("reenrollment_waits", [False, True])
def test_simplereenroll_waits_only_where_the_label_says(make_app, reenrollment_waits):
    app = make_app(approval={**MANUAL, "simplereenroll": reenrollment_waits})
    client = app.test_client()
    key = fresh_key()
    csr = make_csr("NPPRENEW", key=key)
    assert post(client, csr).status_code == 202
    approve_all(app)
    old = certificate_of(post(client, csr))

    def reenroll():
        return client.post(
            "/.well-known/est/simplereenroll", data=der(make_csr("NPPRENEW", key=key)),
            headers={"Content-Type": "application/pkcs10"}, environ_base={"SSL_CLIENT_CERT": pem(old).decode()},
        )

    if reenrollment_waits:
        assert reenroll().status_code == 202
        assert pending(app)[-1].operation == "simplereenroll"
        approve_all(app)
    renewed = reenroll()
    assert renewed.status_code == 200, renewed.get_data(as_text=True)
    assert certificate_of(renewed).serial_number != old.serial_number
    assert len(pending(app)) == (2 if reenrollment_waits else 1)


def test_a_collected_certificate_sent_for_again_is_a_retry_not_a_new_request(make_app, make_config):
    # The device lost the 200 that collected its approved certificate and sends the same CSR again.
    app = make_app(approval=MANUAL, retry_window_minutes=60)
    client = app.test_client()
    csr = make_csr("NPPLOST1", key=fresh_key())
    assert post(client, csr).status_code == 202
    (row,) = pending(app)
    assert run_cli("request", "approve", str(row.id), config=make_config(approval=MANUAL)).exit_code == 0
    collected = certificate_of(post(client, csr))

    again = post(client, csr)
    assert again.status_code == 200, again.get_data(as_text=True)
    assert certificate_of(again).serial_number == collected.serial_number
    assert [r.status for r in pending(app)] == ["collected"]  # no second request filed
    with app.app_context():
        events = [(e.event, e.serial) for e in state().store.audit_events(device="NPPLOST1")]
    assert events[-1] == ("retry", format(collected.serial_number, "x"))
    # Another key for the same device is no retry: it waits for an operator again.
    assert post(client, make_csr("NPPLOST1", key=fresh_key())).status_code == 202
