"""One catalogue, three renderers: a failure has the same status, message and headers on the
EST paths (text/plain), the admin API (JSON) and the dashboard (an HTML page)."""

from __future__ import annotations

import html
import re

import pytest

from est_app.enrollment import EnrollmentService
from est_app.store.reports import Reports

from .conftest import basic_auth
from .pki import der, make_csr
from .test_dashboard import ADMIN, ADMIN_PASSWORD, Browser, make_dashboard  # noqa: F401  (fixture)

ENROLL = "/.well-known/est/simpleenroll"
PKCS10 = {"Content-Type": "application/pkcs10"}
FAULT = re.compile(r"Internal server error \(request id ([0-9a-f]{16})\); the operator's log has details")


def est_message(response) -> str:
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    return response.get_data(as_text=True).rstrip("\n")


def api_message(response) -> str:
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["status"] == response.status_code
    return body["error"]


def page_message(response) -> str:
    assert response.mimetype == "text/html"
    match = re.search(r'<h1 id="error-title">[^<]*</h1>\s*<p>([^<]*)</p>', response.get_data(as_text=True))
    assert match, response.get_data(as_text=True)
    return html.unescape(match.group(1))


@pytest.fixture
def surfaces(make_dashboard):
    app = make_dashboard()
    browser = Browser(app)
    assert browser.login().status_code == 302
    return app, browser


def test_a_fault_is_a_500_with_a_logged_request_id_on_every_surface(surfaces, monkeypatch, caplog):
    app, browser = surfaces

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(EnrollmentService, "enroll", broken)
    monkeypatch.setattr(Reports, "statistics", broken)
    responses = {
        "est": app.test_client().post(ENROLL, data=der(make_csr()), headers={**PKCS10, **basic_auth()}),
        "api": app.test_client().get("/api/v1/statistics", headers=basic_auth(ADMIN, ADMIN_PASSWORD)),
        "dashboard": browser.get("/admin/"),
    }
    messages = {
        "est": est_message(responses["est"]), "api": api_message(responses["api"]), "dashboard": page_message(responses["dashboard"]),
    }
    logged = " ".join(r.getMessage() for r in caplog.records)
    for surface, message in messages.items():
        assert responses[surface].status_code == 500, surface
        match = FAULT.fullmatch(message)
        assert match, (surface, message)
        assert match.group(1) in logged and "secret internals" not in responses[surface].get_data(as_text=True)
    assert len({FAULT.fullmatch(m).group(1) for m in messages.values()}) == 3  # one id per request


def test_a_refusal_reads_the_same_on_the_api_and_the_dashboard(surfaces):
    app, browser = surfaces
    outside = {"REMOTE_ADDR": "10.1.2.3"}
    api = app.test_client().get("/api/v1/statistics", headers=basic_auth(ADMIN, ADMIN_PASSWORD), environ_base=outside)
    page = Browser(app, **outside).get("/admin/")
    assert api.status_code == page.status_code == 403
    assert api_message(api) == page_message(page) == "the admin interface is not available from 10.1.2.3"


def test_a_body_over_the_limit_is_the_same_413_on_every_surface(surfaces):
    app, browser = surfaces
    body = b"A" * (64 * 1024 + 1)
    est = app.test_client().post(ENROLL, data=body, headers={**PKCS10, **basic_auth()})
    api = app.test_client().post(
        "/api/v1/certificates/1/revoke", data=body, headers={"Content-Type": "application/json", **basic_auth(ADMIN, ADMIN_PASSWORD)}
    )
    page = browser.post("/admin/login", data={"username": "A" * (64 * 1024 + 1)})
    assert est.status_code == api.status_code == page.status_code == 413
    expected = "request body larger than 65536 bytes; an EST request is a few KiB"
    assert est_message(est) == api_message(api) == page_message(page) == expected
