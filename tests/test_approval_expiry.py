"""Enrollment requests that outlive ``approval.pending_hours``: pending ones undecided, approved ones uncollected.

Operators see such a request expired at once, in the CLI, the admin API and the dashboard, before any
device retries (the status is computed from the clock, not waited for); a decision on it is refused;
the device's next try is refused with 403 saying why, and the try after that files a new request.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from est_app.state import state
from est_app.store.schema import enrollment_requests

from .conftest import basic_auth, run_cli
from .pki import make_csr
from .test_admin_api import ADMIN, ADMIN_PASSWORD, add_admin
from .test_approval import certificate_of, fresh_key, pending, post
from .test_dashboard import Browser, make_dashboard  # noqa: F401  (a fixture)
from .test_label_ca import app_config

ONE_HOUR = {"mode": "manual", "pending_hours": 1}


def age(app, request_id: int, hours: float) -> None:
    """Move a request's filing and decision ``hours`` into the past."""
    c = enrollment_requests.c
    with app.app_context():
        with state().store.engine.begin() as conn:
            row = conn.execute(sa.select(c.created_at, c.decided_at).where(c.id == request_id)).one()
            shift = timedelta(hours=hours)
            decided_at = row.decided_at - shift if row.decided_at else None
            conn.execute(enrollment_requests.update().where(c.id == request_id).values(created_at=row.created_at - shift, decided_at=decided_at))


def cli_statuses(config, status: str) -> dict[str, str]:
    result = run_cli("request", "list", "--status", status, "--json", config=config)
    assert result.exit_code == 0, result.output
    return {r["device"]: r["status"] for r in map(json.loads, result.output.splitlines())}


@pytest.mark.both_databases
def test_an_approved_request_not_collected_in_time_expires(make_app, make_config):
    app = make_app(approval=ONE_HOUR)
    config = make_config(approval=ONE_HOUR)
    add_admin(config)
    client = app.test_client()
    late, prompt = make_csr("NPPLATE1", key=fresh_key()), make_csr("NPPSOON1", key=fresh_key())
    assert post(client, late).status_code == 202 and post(client, prompt).status_code == 202
    late_row, prompt_row = pending(app)
    with app.app_context():
        for row in (late_row, prompt_row):
            state().approval.decide(row.id, True, "admin:test")
    age(app, late_row.id, 0.5)  # filed and approved half an hour ago: still collectable
    assert cli_statuses(config, "approved") == {"NPPLATE1": "approved", "NPPSOON1": "approved"}
    age(app, late_row.id, 1)  # approved an hour and a half ago

    # Without any device retry, every operator's view says expired.
    assert cli_statuses(config, "approved") == {"NPPSOON1": "approved"}
    assert cli_statuses(config, "expired") == {"NPPLATE1": "expired"}
    assert cli_statuses(config, "all") == {"NPPLATE1": "expired", "NPPSOON1": "approved"}
    shown = run_cli("request", "show", str(late_row.id), config=config)
    assert shown.exit_code == 0 and "status: expired" in shown.output.splitlines()
    admin = basic_auth(ADMIN, ADMIN_PASSWORD)
    assert [r["device"] for r in client.get("/api/v1/requests?status=expired", headers=admin).get_json()["items"]] == ["NPPLATE1"]
    assert [r["device"] for r in client.get("/api/v1/requests?status=approved", headers=admin).get_json()["items"]] == ["NPPSOON1"]
    assert client.get(f"/api/v1/requests/{late_row.id}", headers=admin).get_json()["status"] == "expired"
    assert client.get(f"/api/v1/requests/{late_row.id}", headers=admin).get_json()["expires_at"] is None  # no deadline ahead
    (soon,) = client.get("/api/v1/requests?status=approved", headers=admin).get_json()["items"]
    when = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    assert when(soon["expires_at"]) - when(soon["decided_at"]) == timedelta(hours=1)
    assert f"expires_at: {soon['expires_at']}" in run_cli("request", "show", str(soon["id"]), config=config).output.splitlines()
    assert pending(app)[0].status == "approved"  # computed, not written, by looking

    # The device's retry: 403 saying so, recorded; the try after files a new request. The prompt one collects.
    answer = post(client, late)
    assert answer.status_code == 403
    assert "was approved but expired: not collected within 1 hours of the approval" in answer.get_data(as_text=True)
    assert pending(app)[0].status == "expired"
    with app.app_context():
        assert [e.event for e in state().store.audit_events(device="NPPLATE1")][-1] == "request-expire"
    assert post(client, late).status_code == 202
    assert [r.status for r in pending(app)] == ["expired", "approved", "pending"]
    collected = post(client, prompt)
    assert collected.status_code == 200 and certificate_of(collected).public_key() == prompt.public_key()


def test_a_pending_request_past_pending_hours_is_expired_in_every_list_and_cannot_be_decided(make_dashboard):
    app = make_dashboard(approval=ONE_HOUR)
    config = app_config(app)
    client = app.test_client()
    assert post(client, make_csr("NPPSTALE", key=fresh_key())).status_code == 202
    assert post(client, make_csr("NPPFRESH", key=fresh_key())).status_code == 202
    stale, fresh = pending(app)
    age(app, stale.id, 1.5)

    assert cli_statuses(config, "pending") == {"NPPFRESH": "pending"}
    assert cli_statuses(config, "expired") == {"NPPSTALE": "expired"}
    browser = Browser(app)
    assert browser.login().status_code == 302
    page = browser.get("/admin/requests").get_data(as_text=True)
    assert "1 enrollment request waiting" in page and "NPPFRESH" in page and "NPPSTALE" not in page
    deadline = (fresh.created_at + timedelta(hours=1)).isoformat(timespec="seconds")
    assert f"<dt>Expires</dt><dd>{deadline}" in page

    refused = run_cli("request", "approve", str(stale.id), config=config)
    assert refused.exit_code == 1 and f"enrollment request {stale.id} is expired already" in refused.output
    assert pending(app)[0].status == "pending"  # the store still says pending until the device's try records it
    answer = post(client, make_csr("NPPSTALE", key=fresh_key()))  # even another CSR: the request is over
    assert answer.status_code == 403 and "expired after 1 hours without an operator's decision" in answer.get_data(as_text=True)
    assert run_cli("request", "approve", str(fresh.id), config=config).exit_code == 0
