"""The dashboard under /admin through the Flask test client.

Requests go to ``https://localhost``: the session cookie is Secure, so the
test client only sends it back over HTTPS. Admins are added and removed
through the real CLI; devices enroll through the EST endpoint.
"""

from __future__ import annotations

import html
import re

import pytest
import sqlalchemy as sa
from cryptography import x509

from est_app.admin import dashboard
from est_app.state import state

from .conftest import run_cli
from .pki import der, make_csr
from .test_admin_api import enroll_under_shared_name
from .test_enroll import enroll
from .test_revocation import token_unplugged

BASE = "https://localhost"
ADMIN = "alice"
ADMIN_PASSWORD = "infusion pumps need care"
XSS = "<script>alert(1)</script>"


class Browser:
    """The Flask test client over HTTPS, with the form tokens a person's browser would carry."""

    def __init__(self, app, **environ) -> None:
        self.app = app
        self.client = app.test_client()
        self.environ = environ

    def get(self, path: str, **kwargs):
        return self.client.get(path, base_url=BASE, environ_base=self.environ, **kwargs)

    def post(self, path: str, data: dict | None = None, **kwargs):
        return self.client.post(path, base_url=BASE, data=data or {}, environ_base=self.environ, **kwargs)

    def login(self, name: str = ADMIN, password: str = ADMIN_PASSWORD, next: str | None = None):
        form = self.get("/admin/login" + (f"?next={next}" if next else ""))
        assert form.status_code == 200
        data = {"csrf": field(form, "csrf"), "username": name, "password": password}
        if next:
            data["next"] = next
        return self.post("/admin/login", data)

    def csrf(self) -> str:
        """The session's token, as every signed-in page carries it (the sign-out form)."""
        return field(self.get("/admin/"), "csrf")


def field(response, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', response.get_data(as_text=True))
    assert match, f"no {name} field in the page"
    return html.unescape(match.group(1))


def text(response) -> str:
    return response.get_data(as_text=True)


def stat(page: str, label: str) -> int:
    match = re.search(r'<span class="stat-value">([\d,]+)</span>\s*<span class="stat-label">' + re.escape(label), page)
    assert match, f"no {label!r} figure on the page"
    return int(match.group(1).replace(",", ""))


@pytest.fixture
def make_dashboard(make_app, tmp_path):
    """``make_dashboard(**overrides)``: an app with the EST test user and an admin (both via the CLI)."""

    def build(**overrides):
        app = make_app(**overrides)
        app.config["est_config_path"] = config = tmp_path / "config.yaml"
        result = run_cli("user", "add", ADMIN, "--admin", input=ADMIN_PASSWORD + "\n", config=config)
        assert result.exit_code == 0, result.output
        return app

    return build


@pytest.fixture
def app(make_dashboard):
    return make_dashboard()


@pytest.fixture
def browser(app) -> Browser:
    return Browser(app)


@pytest.fixture
def admin(browser) -> Browser:
    assert browser.login().status_code == 302
    return browser


def enroll_device(app, cn: str, label: str | None = None):
    """Enroll ``cn`` through simpleenroll and return its device row."""
    path = f"/.well-known/est/{label}/simpleenroll" if label else "/.well-known/est/simpleenroll"
    response = enroll(app.test_client(), der(make_csr(cn)), path)
    assert response.status_code == 200, text(response)
    with app.app_context():
        (device,) = [d for d in state().store.find_devices(search=cn) if d.device_key == cn and d.label == (label or "default")]
    return device


def certificate(app, serial: str):
    with app.app_context():
        return state().store.get_certificate(serial)


def audit(app, event: str):
    with app.app_context():
        return [e for e in state().store.audit_events() if e.event == event]


# --- signing in ---


@pytest.mark.parametrize("path", ["/admin/", "/admin/devices?q=NPP", "/admin/devices/1", "/admin/devices/1/revoke", "/admin/devices/1/delete"])
def test_every_page_needs_a_signed_in_admin(browser, path):
    response = browser.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/admin/login?next=")


def test_changes_without_a_session_only_lead_to_the_sign_in_form(app, browser):
    device = enroll_device(app, "NPPBBB4")
    for action in ("revoke", "delete"):
        response = browser.post(f"/admin/devices/{device.id}/{action}", {"csrf": "x", "serial": device.current_serial, "reason": "keyCompromise"})
        assert response.status_code == 302 and response.headers["Location"].startswith("/admin/login")
    assert certificate(app, device.current_serial).status == "valid"
    with app.app_context():
        assert state().store.get_device(device.id) is not None


def test_sign_in_form_is_accessible_and_locked_down(browser):
    response = browser.get("/admin/login")
    assert response.status_code == 200
    page = text(response)
    assert '<label for="username">' in page and '<label for="password">' in page
    assert 'autocomplete="current-password"' in page
    assert "<script" not in page  # no JavaScript anywhere
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    css = browser.get("/static/admin.css")
    assert css.status_code == 200 and css.mimetype == "text/css"


def test_admin_signs_in_with_a_hardened_cookie_and_signs_out(app, browser):
    response = browser.login()
    assert response.status_code == 302 and response.headers["Location"] == "/admin/"
    cookie = next(v for k, v in response.headers.items() if k == "Set-Cookie" and v.startswith("est_admin="))
    attributes = cookie.lower()
    assert "secure" in attributes and "httponly" in attributes and "samesite=strict" in attributes and "expires=" in attributes
    page = browser.get("/admin/")
    assert page.status_code == 200 and f"Signed in as <strong>{ADMIN}</strong>" in text(page)
    (event,) = [e for e in audit(app, "admin-login") if e.outcome == "ok"]
    assert event.actor == f"admin:{ADMIN}" and event.client_address == "127.0.0.1"

    assert browser.post("/admin/logout").status_code == 400  # no token: nothing happens
    assert browser.get("/admin/").status_code == 200
    out = browser.post("/admin/logout", {"csrf": browser.csrf()})
    assert out.status_code == 302 and out.headers["Location"] == "/admin/login?notice=signed-out"
    assert "You have signed out" in text(browser.get(out.headers["Location"]))
    assert browser.get("/admin/").status_code == 302


def test_session_changes_at_sign_in(browser):
    browser.client.set_cookie("est_admin", "planted-by-someone-else", domain="localhost", path="/admin")
    browser.login()
    after = browser.client.get_cookie("est_admin", domain="localhost", path="/admin").value
    assert after != "planted-by-someone-else" and len(after) >= 43  # a fresh 256-bit token


def test_est_user_is_refused_clearly(app, browser):
    from .conftest import PASSWORD, USER

    response = browser.login(USER, PASSWORD)
    assert response.status_code == 403
    assert "is an EST account" in html.unescape(text(response)) and "cannot sign in to the dashboard" in text(response)
    assert browser.get("/admin/").status_code == 302
    refused = [e for e in audit(app, "admin-login") if e.outcome == "refused"]
    assert refused and refused[-1].detail == "an EST user, not an admin" and refused[-1].client_address == "127.0.0.1"


@pytest.mark.parametrize("name, password", [(ADMIN, "not the password"), ("mallory", ADMIN_PASSWORD), ("", "")])
def test_wrong_credentials_are_refused_alike(app, browser, name, password):
    response = browser.login(name, password)
    assert response.status_code == 403
    assert "Incorrect username or password." in text(response)
    assert ADMIN_PASSWORD not in text(response)
    assert browser.get("/admin/").status_code == 302
    assert all(ADMIN_PASSWORD not in e.detail for e in audit(app, "admin-login"))


def test_sign_in_needs_the_form_token(browser):
    browser.get("/admin/login")
    response = browser.post("/admin/login", {"username": ADMIN, "password": ADMIN_PASSWORD})
    assert response.status_code == 400 and "form had expired" in text(response)
    assert browser.get("/admin/").status_code == 302


@pytest.mark.parametrize(
    "next_target, landing",
    [
        ("/admin/devices?q=NPP", "/admin/devices?q=NPP"),
        ("https://evil.example/admin/", "/admin/"),
        ("//evil.example/admin/", "/admin/"),
        ("/admin/\\evil.example", "/admin/"),
        ("/.well-known/est/cacerts", "/admin/"),
    ],
)
def test_sign_in_returns_only_to_dashboard_pages(browser, next_target, landing):
    response = browser.login(next=next_target)
    assert response.status_code == 302 and response.headers["Location"] == landing


def test_removed_admin_is_out_at_the_next_request(app, admin):
    device = enroll_device(app, "NPPBBB4")
    token = admin.csrf()
    result = run_cli("user", "remove", ADMIN, config=app.config["est_config_path"])
    assert result.exit_code == 0, result.output
    response = admin.get("/admin/devices")
    assert response.status_code == 302 and response.headers["Location"].startswith("/admin/login")
    assert "no longer an administrator" in text(admin.get(response.headers["Location"]))
    # Nor can the old session's token still do anything.
    revoked = admin.post(f"/admin/devices/{device.id}/revoke", {"csrf": token, "serial": device.current_serial, "reason": "keyCompromise"})
    assert revoked.status_code == 302 and revoked.headers["Location"].startswith("/admin/login")
    assert certificate(app, device.current_serial).status == "valid"


def test_admin_networks_are_enforced(make_dashboard):
    app = make_dashboard(admin={"allowed_networks": ["10.20.0.0/16"]})
    outside = Browser(app)
    response = outside.get("/admin/login")
    assert response.status_code == 403 and "not available from 127.0.0.1" in text(response)
    assert outside.get("/admin/").status_code == 403
    assert outside.get("/.well-known/est/cacerts").status_code == 200  # EST itself is not limited
    inside = Browser(app, REMOTE_ADDR="10.20.1.2")
    assert inside.login().status_code == 302
    assert inside.get("/admin/").status_code == 200


def test_dashboard_can_be_switched_off(make_dashboard):
    app = make_dashboard(admin={"enabled": False})
    assert Browser(app).get("/admin/login").status_code == 404


# --- overview ---


def test_overview_shows_counts_chart_and_activity(app, admin):
    for cn in ("NPP0001", "NPP0002", "NPP0003"):
        enroll_device(app, cn)
    renewed = enroll_device(app, "NPP0002")  # renew: the first certificate is superseded
    result = run_cli("device", "revoke", str(renewed.id), config=app.config["est_config_path"])
    assert result.exit_code == 0, result.output

    response = admin.get("/admin/")
    assert response.status_code == 200
    page = text(response)
    assert stat(page, "Devices enrolled") == 3
    assert stat(page, "Valid certificates") == 2
    assert stat(page, "Revoked certificates") == 1
    assert stat(page, "Superseded by renewal") == 1
    # certificates valid for a year by default: none expires within 90 days
    for window in (30, 60, 90):
        assert re.search(rf'href="/admin/devices\?status=valid&amp;expiring={window}">\s*<span class="stat-value">0</span>', page)
    assert "<svg" in page and 'role="img"' in page
    assert len(re.findall(r'<rect class="bar"', page)) == 1  # today
    assert len(re.findall(r'<g class="day">', page)) == 30
    assert "4 issued" in page and "4 certificates in total" in page
    assert "Recent activity" in page and ">enroll<" in page and ">revoke<" in page


def test_overview_shows_ten_events_and_the_activity_page_pages_the_whole_trail(app, admin, monkeypatch):
    for n in range(12):
        enroll_device(app, f"NPP{n:04d}")
    with app.app_context():
        trail = [e.id for e in reversed(state().store.audit_events())]  # newest first, sign-in included
    overview = text(admin.get("/admin/"))
    assert overview.count("<td class=\"nowrap\">enroll</td>") == 10
    assert f"The latest 10 of {len(trail)} audit events" in overview and 'href="/admin/activity"' in overview

    monkeypatch.setattr(dashboard, "PAGE_SIZE", 5)
    seen, url = [], "/admin/activity"
    while url:
        body = text(admin.get(url))
        assert f"{len(trail)} audit events" in body
        seen.append(len(re.findall(r'<td class="nowrap">\d{4}-\d\d-\d\d \d\d:\d\d UTC</td>', body)))
        match = re.search(r'rel="next" href="([^"]+)"', body)
        url = html.unescape(match.group(1)) if match else None
    assert seen == [5, 5, 5] and sum(seen) == len(trail)  # 2 users added, a sign-in, 12 enrollments
    assert "No older events." in text(admin.get("/admin/activity?after=1"))
    assert admin.get("/admin/activity?after=x" + "9" * 30).status_code == 200


def test_a_revoked_certificate_shows_when_it_was_revoked_not_when_it_would_expire(app, admin):
    device = enroll_device(app, "NPPBBB4")
    enroll_device(app, "NPPCCC7")
    assert run_cli("device", "revoke", "NPPBBB4", config=app.config["est_config_path"]).exit_code == 0
    rows = {name: row for row, name in re.findall(r'(<tr>.*?>(NPP\w+)</a>.*?</tr>)', text(admin.get("/admin/devices")), re.S)}
    revoked_on = certificate(app, device.current_serial).revoked_at
    assert f"revoked {revoked_on:%Y-%m-%d}" in rows["NPPBBB4"] and "in 36" not in rows["NPPBBB4"]
    assert "in 36" in rows["NPPCCC7"] and "revoked" not in rows["NPPCCC7"]


def test_device_pages_take_a_name_too_and_a_shared_name_asks_for_the_label(make_dashboard):
    app = make_dashboard(labels={"pumps": {}})
    admin = Browser(app)
    assert admin.login().status_code == 302
    default = enroll_device(app, "NPPBBB4")
    enroll_under_shared_name(app, "NPPBBB4", "pumps")
    with app.app_context():
        (pumps,) = state().store.find_devices(label="pumps", search="NPPBBB4")
    single = enroll_device(app, "NPPCCC7")
    assert "NPPCCC7" in text(admin.get("/admin/devices/NPPCCC7")) and f"<dd>{single.id}</dd>" in text(admin.get("/admin/devices/NPPCCC7"))
    shared = admin.get("/admin/devices/NPPBBB4")
    assert shared.status_code == 400 and "fits 2 devices" in text(shared) and "?label=" in text(shared)
    assert f"<dd>{pumps.id}</dd>" in text(admin.get("/admin/devices/NPPBBB4?label=pumps"))
    assert f"<dd>{default.id}</dd>" in text(admin.get(f"/admin/devices/{default.id}"))


def test_chart_geometry():
    days = [{"date": f"2024-05-{d:02d}", "count": c} for d, c in zip(range(1, 31), [0] * 20 + [3, 7, 0, 12, 1, 0, 0, 5, 9, 2])]
    chart = dashboard.bar_chart(days)
    assert chart.peak == 12 and [v for _, v in chart.ticks] == [0, 5, 10, 15]
    tallest = max(chart.bars, key=lambda b: b.height)
    assert tallest.count == 12 and abs(tallest.y + tallest.height - chart.baseline) < 0.2
    assert [b.tick for b in chart.bars if b.tick] == ["2 May", "9 May", "16 May", "23 May", "30 May"]
    assert all(b.x >= chart.left and b.x + b.width <= chart.right for b in chart.bars)
    empty = dashboard.bar_chart([{"date": "2024-05-01", "count": 0}])
    assert empty.peak == 0 and [v for _, v in empty.ticks] == [0, 1]
    assert [v for _, v in dashboard.bar_chart([{"date": "2024-05-01", "count": 4321}]).ticks] == [0, 2000, 4000, 6000]


# --- the device list ---


def test_device_list_searches_filters_and_pages(app, admin, monkeypatch):
    monkeypatch.setattr(dashboard, "PAGE_SIZE", 3)
    devices = [enroll_device(app, f"NPP{n:04d}") for n in range(7)] + [enroll_device(app, "OTHER-1")]
    revoked = devices[2]
    assert run_cli("device", "revoke", str(revoked.id), config=app.config["est_config_path"]).exit_code == 0

    page = text(admin.get("/admin/devices"))
    assert "8 devices" in page

    seen, url = [], "/admin/devices?q=NPP"
    while url:
        response = admin.get(url)
        assert response.status_code == 200
        body = text(response)
        assert "7 devices match" in body
        seen += [int(i) for i in re.findall(r'href="/admin/devices/(\d+)"', body)]
        match = re.search(r'rel="next" href="([^"]+)"', body)
        url = html.unescape(match.group(1)) if match else None
        if url:
            assert "q=NPP" in url and "after=" in url
    assert seen == sorted((d.id for d in devices[:7]), reverse=True)

    by_number = text(admin.get(f"/admin/devices?q={devices[4].id}"))
    assert f'href="/admin/devices/{devices[4].id}"' in by_number

    only_revoked = text(admin.get("/admin/devices?status=revoked"))
    assert "1 device match" in only_revoked and f'href="/admin/devices/{revoked.id}"' in only_revoked

    assert "0 devices match" in text(admin.get("/admin/devices?label=pumps"))
    assert "8 devices match" in text(admin.get("/admin/devices?label=default"))
    assert "0 devices match" in text(admin.get("/admin/devices?expiring=30"))
    assert "No devices match these filters" in text(admin.get("/admin/devices?q=nothing-like-this"))


def test_device_list_shrugs_off_odd_input(admin):
    for query in ("after=99999999999999999999999", "after=abc", "expiring=7", "status=bogus", "q=%25_%25", "q=" + "9" * 30, "label=" + "x" * 500):
        response = admin.get(f"/admin/devices?{query}")
        assert response.status_code == 200, query
    assert "0 devices match" in text(admin.get("/admin/devices?q=" + "9" * 30))  # searched as text
    missing = admin.get("/admin/devices/999999999999999999999999")
    assert missing.status_code == 404 and "There is no device" in text(missing)
    assert admin.get("/admin/devices/12345").status_code == 404


# --- one device ---


def test_device_page_shows_facts_certificates_and_events(app, admin):
    device = enroll_device(app, "NPPBBB4")
    renewed = enroll_device(app, "NPPBBB4")
    response = admin.get(f"/admin/devices/{device.id}")
    assert response.status_code == 200
    page = text(response)
    assert "NPPBBB4" in page and "user:gateway" in page
    assert device.current_serial in page and renewed.current_serial in page
    assert page.count('class="row-current"') == 1
    assert ">superseded<" in page and ">valid<" in page
    assert page.count(">enroll<") == 2
    assert f'href="/admin/devices/{device.id}/revoke"' in page and f'href="/admin/devices/{device.id}/delete"' in page


def test_revoke_needs_confirmation_and_the_token(app, admin):
    device = enroll_device(app, "NPPBBB4")
    serial = device.current_serial

    confirm = admin.get(f"/admin/devices/{device.id}/revoke")
    assert confirm.status_code == 200
    assert certificate(app, serial).status == "valid"  # GET changes nothing
    page = text(confirm)
    assert '<label for="reason">' in page and 'value="cessationOfOperation" selected' in page
    token = field(confirm, "csrf")

    path = f"/admin/devices/{device.id}/revoke"
    assert admin.post(path, {"serial": serial, "reason": "keyCompromise"}).status_code == 400
    assert admin.post(path, {"csrf": token + "x", "serial": serial, "reason": "keyCompromise"}).status_code == 400
    assert admin.post(path, {"csrf": token, "serial": serial, "reason": "because"}).status_code == 400
    assert certificate(app, serial).status == "valid"
    assert not audit(app, "revoke")

    done = admin.post(path, {"csrf": token, "serial": serial, "reason": "keyCompromise"})
    assert done.status_code == 302 and done.headers["Location"] == f"/admin/devices/{device.id}"
    record = certificate(app, serial)
    assert record.status == "revoked" and record.revocation_reason == "keyCompromise"
    (event,) = audit(app, "revoke")
    assert (event.actor, event.client_address, event.serial, event.detail, event.device) == (
        f"admin:{ADMIN}", "127.0.0.1", serial, "keyCompromise", "NPPBBB4"
    )
    with app.app_context():
        crl = x509.load_der_x509_crl(state().crl.current().der)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    page = text(admin.get(f"/admin/devices/{device.id}"))
    assert "is revoked (keyCompromise)" in page and ">revoked<" in page
    assert "Revoke current certificate" not in page

    again = admin.post(path, {"csrf": token, "serial": serial, "reason": "keyCompromise"})
    assert again.status_code == 302 and "revoked already" in text(admin.get(again.headers["Location"]))
    assert len(audit(app, "revoke")) == 1


def test_a_revocation_whose_crl_cannot_be_signed_says_so(app, admin):
    device = enroll_device(app, "NPPUNPLUG")
    with token_unplugged(app):
        done = admin.post(f"/admin/devices/{device.id}/revoke", {"csrf": admin.csrf(), "serial": device.current_serial, "reason": "keyCompromise"})
        page = text(admin.get(done.headers["Location"]))
    assert certificate(app, device.current_serial).status == "revoked"
    assert "is revoked (keyCompromise), but the CRL of ca could not be re-signed (see the log): it is marked stale" in page
    assert "the CRL has been re-signed" not in page


def test_revoke_never_hits_a_certificate_the_admin_did_not_see(app, admin):
    device = enroll_device(app, "NPPBBB4")
    token = admin.csrf()
    renewed = enroll_device(app, "NPPBBB4")  # between the confirmation page and the click
    response = admin.post(f"/admin/devices/{device.id}/revoke", {"csrf": token, "serial": device.current_serial, "reason": "keyCompromise"})
    assert response.status_code == 302 and response.headers["Location"] == f"/admin/devices/{device.id}/revoke"
    assert certificate(app, renewed.current_serial).status == "valid"
    assert certificate(app, device.current_serial).status == "superseded"


def test_delete_needs_confirmation_and_the_token(app, admin):
    device = enroll_device(app, "NPPBBB4")
    confirm = admin.get(f"/admin/devices/{device.id}/delete")
    assert confirm.status_code == 200 and "the current one is revoked" in text(confirm)
    assert 'name="keep_certificate"' in text(confirm) and "checked" not in text(confirm)  # revoking is the default
    with app.app_context():
        assert state().store.get_device(device.id) is not None

    path = f"/admin/devices/{device.id}/delete"
    assert admin.post(path).status_code == 400
    assert admin.post(path, {"csrf": "forged"}).status_code == 400
    with app.app_context():
        assert state().store.get_device(device.id) is not None

    done = admin.post(path, {"csrf": field(confirm, "csrf")})
    assert done.status_code == 302 and done.headers["Location"] == "/admin/devices"
    assert f"is deleted; it may enroll again. Its certificate {device.current_serial} is revoked" in text(admin.get("/admin/devices"))
    with app.app_context():
        assert state().store.get_device(device.id) is None
    record = certificate(app, device.current_serial)  # stays on record, revoked
    assert (record.status, record.revocation_reason) == ("revoked", "cessationOfOperation")
    (event,) = audit(app, "device-delete")
    assert (event.actor, event.client_address, event.device, event.label) == (f"admin:{ADMIN}", "127.0.0.1", "NPPBBB4", "default")
    (revoked,) = audit(app, "revoke")
    assert (revoked.actor, revoked.serial, revoked.detail) == (f"admin:{ADMIN}", device.current_serial, "cessationOfOperation")
    assert admin.get(f"/admin/devices/{device.id}").status_code == 404


def test_delete_can_keep_the_certificate(app, admin):
    device = enroll_device(app, "NPPBBB4")
    done = admin.post(f"/admin/devices/{device.id}/delete", {"csrf": admin.csrf(), "keep_certificate": "yes"})
    assert done.status_code == 302
    assert f"Its certificate {device.current_serial} stays valid until it expires" in text(admin.get("/admin/devices"))
    assert certificate(app, device.current_serial).status == "valid"
    assert audit(app, "revoke") == []


def test_device_supplied_text_is_escaped_everywhere(app, admin):
    device = enroll_device(app, XSS)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    pages = ["/admin/", "/admin/devices", f"/admin/devices?q={XSS}", f"/admin/devices/{device.id}",
             f"/admin/devices/{device.id}/revoke", f"/admin/devices/{device.id}/delete"]
    for path in pages:
        page = text(admin.get(path))
        assert XSS not in page, path
        assert escaped in page, path
    token = admin.csrf()
    admin.post(f"/admin/devices/{device.id}/revoke", {"csrf": token, "serial": device.current_serial, "reason": "keyCompromise"})
    flashed = text(admin.get(f"/admin/devices/{device.id}"))  # the flash message names the device
    assert XSS not in flashed and f"of {escaped} is revoked" in flashed
    admin.post(f"/admin/devices/{device.id}/delete", {"csrf": token})
    listed = text(admin.get("/admin/devices"))
    assert XSS not in listed and f"Device {escaped} (number {device.id}) is deleted" in listed


def test_failed_sign_in_name_is_escaped_on_the_overview(app, browser):
    browser.login(XSS, "whatever")
    browser.login()
    page = text(browser.get("/admin/"))
    assert "admin-login" in page and XSS not in page and "&lt;script&gt;" in page


# --- cost: a fixed handful of queries per page, however many rows (timed in tests/benchmarks/bench_operations.py) ---


def queries(app, browser, path: str) -> list[str]:
    """The SQL statements one request runs."""
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    with app.app_context():
        engine = state().store.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        response = browser.get(path)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200, path
    return [s for s in statements if s not in ("BEGIN", "COMMIT", "ROLLBACK")]


def test_pages_run_the_same_queries_however_many_rows(app, admin):
    first = enroll_device(app, "NPP0000")
    pages = [
        "/admin/", "/admin/devices", "/admin/devices?q=NPP&status=valid&expiring=90", f"/admin/devices/{first.id}", "/admin/devices/NPP0000",
        "/admin/activity", "/admin/activity?after=5",
    ]
    few = {path: len(queries(app, admin, path)) for path in pages}
    for n in range(1, 12):
        enroll_device(app, f"NPP{n:04d}")
    for _ in range(4):
        enroll_device(app, "NPP0000")  # more certificates and events for the one device
    many = {path: len(queries(app, admin, path)) for path in pages}
    assert many == few
    assert many["/admin/devices"] <= 4  # the session, its user, the page, the count
    assert many["/admin/"] <= 11  # the session, its user, statistics (7), recent events and their count
    assert many["/admin/activity"] <= 4  # the session, its user, the page, the count
