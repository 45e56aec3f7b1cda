"""The operator surfaces on a bad day: sessions, network gate, password back-off, and the review's smaller findings.

Through the Flask test client on real SQLite files; two ``create_app()`` on one
file stand for two gunicorn workers. Time passing is simulated by moving the
stored timestamps back, never by patching the clock.
"""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import timedelta

import pytest
import sqlalchemy as sa

from est_app import create_app
from est_app.auth import fingerprint
from est_app.proxy import client_key
from est_app.config import ConfigError
from est_app.state import state
from est_app.store import utcnow
from est_app.store.schema import admin_sessions, auth_failures

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, make_csr, pem
from .test_dashboard import ADMIN, ADMIN_PASSWORD, BASE, Browser, field, make_dashboard, text  # noqa: F401  (make_dashboard: a fixture)
from .test_enroll import certs_from, enroll
from .test_metrics import delta, scrape
from .test_protocol import RA_LABELS, ca, client_certs, foreign_ca, mint, store  # noqa: F401  (ca, client_certs, foreign_ca: fixtures)

ENROLL = "/.well-known/est/simpleenroll"


@pytest.fixture
def app(make_dashboard):
    return make_dashboard()


def second_worker(app):
    """Another app on the same configuration and database file: what a second gunicorn worker is."""
    other = create_app(app.config["est_config_path"])
    other.config["TESTING"] = True
    return other


def rows(app, table) -> list:
    with store(app).engine.connect() as conn:
        return conn.execute(table.select()).all()


def age(app, table, **columns: timedelta) -> None:
    """Move the given timestamp columns of every row of ``table`` back by the given amounts."""
    with store(app).engine.begin() as conn:
        for row in conn.execute(table.select()).all():
            key = table.primary_key.columns.values()[0]
            values = {name: getattr(row, name) - delta for name, delta in columns.items()}
            conn.execute(table.update().where(key == getattr(row, key.name)).values(**values))


def audit(app, event: str) -> list:
    return [e for e in store(app).audit_events() if e.event == event]


def admin_basic(password: str = ADMIN_PASSWORD, name: str = ADMIN) -> dict[str, str]:
    return basic_auth(name, password)


# --- sessions -----------------------------------------------------------------


def test_the_cookie_is_a_random_token_and_the_store_keeps_only_its_hash(app):
    browser = Browser(app)
    assert browser.login().status_code == 302
    token = browser.client.get_cookie("est_admin", domain="localhost", path="/admin").value
    (row,) = rows(app, admin_sessions)
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    database = app.config["est_config_path"].parent / "est.db"
    with sqlite3.connect(database) as conn:
        dump = "\n".join(conn.iterdump())
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert token not in dump and "app_secrets" not in tables
    assert not app.secret_key  # no key exists that could sign or forge anything


def test_a_copied_cookie_stops_working_at_sign_out_in_every_worker(app):
    browser = Browser(app)
    browser.login()
    token = browser.client.get_cookie("est_admin", domain="localhost", path="/admin").value
    thief = Browser(second_worker(app))
    thief.client.set_cookie("est_admin", token, domain="localhost", path="/admin")
    assert thief.get("/admin/").status_code == 200  # a live session is one session for every worker
    out = browser.post("/admin/logout", {"csrf": browser.csrf()})
    assert out.status_code == 302
    refused = thief.get("/admin/devices")
    assert refused.status_code == 302 and refused.headers["Location"].startswith("/admin/login")
    assert "notice=ended" in refused.headers["Location"]
    assert rows(app, admin_sessions) == []


def test_password_change_ends_every_session_of_the_account(app):
    browsers = [Browser(app), Browser(second_worker(app))]
    for browser in browsers:
        assert browser.login().status_code == 302
    new_password = "a brand new admin password"
    result = run_cli("user", "passwd", ADMIN, input=new_password + "\n", config=app.config["est_config_path"])
    assert result.exit_code == 0 and "sessions have ended" in result.output, result.output
    for browser in browsers:
        assert browser.get("/admin/").status_code == 302
    assert rows(app, admin_sessions) == []
    assert Browser(app).login(ADMIN, ADMIN_PASSWORD).status_code == 403
    assert Browser(app).login(ADMIN, new_password).status_code == 302
    (event,) = audit(app, "user-passwd")
    assert event.detail == ADMIN and new_password not in event.detail


def test_passwd_refuses_an_unknown_user_and_a_short_password(app):
    config = app.config["est_config_path"]
    assert "no user 'nobody'" in run_cli("user", "passwd", "nobody", input="long enough password\n", config=config).output
    short = run_cli("user", "passwd", ADMIN, input="short\n", config=config)
    assert short.exit_code != 0 and "at least 12 characters" in short.output
    assert Browser(app).login().status_code == 302  # unchanged


def test_removing_the_account_deletes_its_sessions(app):
    Browser(app).login()
    assert len(rows(app, admin_sessions)) == 1
    assert run_cli("user", "remove", ADMIN, config=app.config["est_config_path"]).exit_code == 0
    assert rows(app, admin_sessions) == []


def test_idle_timeout_and_absolute_lifetime(make_dashboard):
    app = make_dashboard(admin={"session_minutes": 30, "session_max_hours": 12})
    browser = Browser(app)
    browser.login()
    age(app, admin_sessions, last_seen=timedelta(minutes=29))
    assert browser.get("/admin/").status_code == 200  # still within the idle timeout, and now seen again
    (row,) = rows(app, admin_sessions)
    assert utcnow() - row.last_seen < timedelta(minutes=1)

    # Kept busy, a session still ends at its absolute lifetime.
    age(app, admin_sessions, created_at=timedelta(hours=12, minutes=1))
    assert browser.get("/admin/").status_code == 302

    browser = Browser(app)
    browser.login()
    age(app, admin_sessions, last_seen=timedelta(minutes=31))
    response = browser.get("/admin/")
    assert response.status_code == 302 and "notice=ended" in response.headers["Location"]


# --- network gate -------------------------------------------------------------


@pytest.mark.parametrize("address, status", [("127.0.0.1", 200), ("127.8.9.10", 200), ("::1", 200), ("10.1.2.3", 403), ("::ffff:10.1.2.3", 403), ("2001:db8::5", 403)])
def test_operator_surfaces_answer_only_loopback_by_default(app, address, status):
    client = app.test_client()
    environ = {"REMOTE_ADDR": address}
    assert client.get("/api/v1/statistics", headers=admin_basic(), environ_base=environ).status_code == status
    assert client.get("/admin/login", base_url=BASE, environ_base=environ).status_code == status
    assert client.get("/metrics", environ_base=environ).status_code == status
    assert client.get("/.well-known/est/cacerts", environ_base=environ).status_code == 200  # EST is for everyone


def test_behind_a_trusted_proxy_the_forwarded_address_counts(make_dashboard):
    app = make_dashboard(trusted_proxies=["127.0.0.1"], admin={"allowed_networks": ["10.20.0.0/16"]})
    client = app.test_client()
    inside = client.get("/api/v1/statistics", headers={**admin_basic(), "X-Forwarded-For": "10.20.1.2"})
    assert inside.status_code == 200
    outside = client.get("/api/v1/statistics", headers={**admin_basic(), "X-Forwarded-For": "192.0.2.7"})
    assert outside.status_code == 403 and "not available from 192.0.2.7" in outside.get_json()["error"]
    assert client.get("/metrics").status_code == 403  # the proxy itself is not an operator network


def test_a_proxy_that_is_not_trusted_cannot_pass_for_loopback(app):
    """A same-host proxy without trusted_proxies would make every client look like 127.0.0.1."""
    response = app.test_client().get("/metrics", headers={"X-Forwarded-For": "192.0.2.7"})
    assert response.status_code == 403 and "through a proxy outside trusted_proxies" in text(response)


def test_an_empty_network_list_is_refused_at_start(make_config):
    with pytest.raises(ConfigError, match=r"admin: allowed_networks may not be empty.*0\.0\.0\.0/0"):
        create_app(make_config(admin={"allowed_networks": []}))


# --- back-off -----------------------------------------------------------------


def test_a_hundred_wrong_passwords_then_the_right_one_is_not_simply_answered(app):
    browser = Browser(app)
    statuses = [browser.login(ADMIN, f"guess {n}").status_code for n in range(100)]
    assert statuses[:5] == [403] * 5 and set(statuses[5:]) == {429}
    right = browser.login()
    assert right.status_code == 429 and 1 <= int(right.headers["Retry-After"]) <= 30
    assert "Too many failed sign-ins" in text(right) and "Signed in as" not in text(browser.get("/admin/"))
    # Only the five checked passwords were refused as wrong; the rest never reached a password check.
    assert len([e for e in audit(app, "admin-login") if e.outcome == "refused"]) == 5
    (backoff,) = audit(app, "auth-backoff")
    assert backoff.actor == f"admin:{ADMIN}" and f"account:{ADMIN}: 5 failed" in backoff.detail and "address:127.0.0.1" in backoff.detail

    age(app, auth_failures, blocked_until=timedelta(seconds=31))  # the delay passes
    assert browser.login().status_code == 302
    assert [r.subject for r in rows(app, auth_failures)] == ["address:127.0.0.1"]  # the account's count is cleared


def test_the_back_off_holds_across_workers_for_the_admin_api(app):
    one, two = app.test_client(), second_worker(app).test_client()
    statuses = [one.get("/api/v1/statistics", headers=admin_basic(f"guess {n}")).status_code for n in range(100)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    right = two.get("/api/v1/statistics", headers=admin_basic())
    assert right.status_code == 429 and right.mimetype == "application/json"
    assert 1 <= int(right.headers["Retry-After"]) <= 30 and "retry in" in right.get_json()["error"]
    age(app, auth_failures, blocked_until=timedelta(seconds=31))
    assert two.get("/api/v1/statistics", headers=admin_basic()).status_code == 200


def test_the_account_rule_reaches_other_addresses_and_nothing_else(app):
    attacker = {"REMOTE_ADDR": "127.0.0.66"}
    client = app.test_client()
    for n in range(5):
        assert client.get("/api/v1/statistics", headers=admin_basic(f"guess {n}"), environ_base=attacker).status_code == 401
    # The admin, from another address, waits out the account's back-off (its rule is per account) ...
    assert client.get("/api/v1/statistics", headers=admin_basic(), environ_base={"REMOTE_ADDR": "127.0.0.7"}).status_code == 429
    # ... but another admin from that address is not held up, nor is the gateway enrolling from anywhere.
    run_cli("user", "add", "bob", "--admin", input="bob's long password\n", config=app.config["est_config_path"])
    other = client.get("/api/v1/statistics", headers=admin_basic("bob's long password", "bob"), environ_base={"REMOTE_ADDR": "127.0.0.7"})
    assert other.status_code == 200
    assert enroll(client, der(make_csr("NPPBBB4"))).status_code == 200


def test_the_address_rule_stops_a_password_spray(app):
    client = app.test_client()
    sprayer = {"REMOTE_ADDR": "127.0.0.66"}
    for n in range(5):
        client.get("/api/v1/statistics", headers=basic_auth(f"name{n}", "Winter2026!"), environ_base=sprayer)
    assert client.get("/api/v1/statistics", headers=admin_basic(), environ_base=sprayer).status_code == 429
    assert client.get("/api/v1/statistics", headers=admin_basic()).status_code == 200  # the admin elsewhere


def test_est_basic_auth_backs_off_per_address_before_hashing(app, monkeypatch):
    """Bogus credentials cannot make the server burn scrypt: after five, the address waits unhashed."""
    import est_app.auth

    hashed = []
    real = est_app.auth.check_password_hash
    monkeypatch.setattr(est_app.auth, "check_password_hash", lambda h, p: hashed.append(p) or real(h, p))
    client = app.test_client()
    assert enroll(client, der(make_csr("NPPBBB4"))).status_code == 200  # the gateway, remembered
    bogus = {"REMOTE_ADDR": "127.0.0.66"}
    hashed.clear()
    statuses = [
        client.post(ENROLL, data=der(make_csr()), headers={"Content-Type": "application/pkcs10", **basic_auth(USER, f"guess {n}")}, environ_base=bogus).status_code
        for n in range(30)
    ]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    assert len(hashed) == 5
    # Even the right (and remembered) password waits there: the memory must not become a free oracle.
    blocked = client.post(ENROLL, data=der(make_csr()), headers={"Content-Type": "application/pkcs10", **basic_auth()}, environ_base=bogus)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1 and blocked.mimetype == "text/plain"
    # The gateway's account is not locked: from its own address it enrolls, its password not even re-hashed.
    assert enroll(client, der(make_csr("NPPCCC7"))).status_code == 200
    assert len(hashed) == 5
    (backoff,) = audit(app, "auth-backoff")
    assert backoff.detail.startswith("est: address:127.0.0.66: 5 failed") and "account:" not in backoff.detail
    # The throttled requests cost no audit row each: 5 refusals before the back-off, then none.
    refused = [e for e in store(app).audit_events() if e.event == "enroll" and e.client_address == "127.0.0.66"]
    assert len(refused) == 5


def test_ipv6_clients_back_off_per_64(app):
    client = app.test_client()
    for n in range(5):
        client.get("/api/v1/statistics", headers=admin_basic(f"guess {n}", f"name{n}"), environ_base={"REMOTE_ADDR": "::1"})
    assert {r.subject for r in rows(app, auth_failures)} >= {"address:::/64"}


def test_refusals_and_back_off_are_counted_in_metrics(app):
    client = app.test_client()
    before = scrape(client)
    for n in range(7):
        client.get("/api/v1/statistics", headers=admin_basic(f"guess {n}"))
    after = scrape(client)
    assert delta(before, after, "est_password_refusals_total", surface="api", reason="wrong_password") == 5
    assert delta(before, after, "est_password_refusals_total", surface="api", reason="backoff") == 2


# --- the review's smaller findings ---------------------------------------------

LONG_NAME = "x" * 5500


def test_an_overlong_user_name_is_refused_unlooked_and_clipped_in_the_trail(app):
    statements: list[str] = []
    engine = store(app).engine
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cursor, statement, *rest: statements.append(statement))
    client = app.test_client()
    api = client.get("/api/v1/statistics", headers=basic_auth(LONG_NAME, "whatever it is"))
    assert api.status_code == 401
    login = Browser(app).login(LONG_NAME, "whatever it is")
    assert login.status_code == 403 and LONG_NAME not in text(login)
    est = client.post(ENROLL, data=der(make_csr()), headers={"Content-Type": "application/pkcs10", **basic_auth(LONG_NAME, "whatever it is")})
    assert est.status_code == 401
    assert not [s for s in statements if "FROM users" in s]
    refused = [e for e in store(app).audit_events() if LONG_NAME[:128] in e.actor]
    assert len(refused) == 2  # the API's and the dashboard's refusals
    for event in refused:
        assert event.actor == f"admin:{'x' * 128}...[5500 characters]" and "longer than 128" in event.detail
    assert all(len(e.actor) < 200 and LONG_NAME not in e.detail for e in store(app).audit_events())


@pytest.mark.parametrize("next_target", ["/admin/devices\r\nSet-Cookie: x=1", "/admin/\r\nX: y", "/admin/\x00", "/admin/\tx", "/admin/\x7f"])
def test_control_characters_in_next_are_dropped_never_a_500(app, next_target):
    browser = Browser(app)
    form = browser.get("/admin/login", query_string={"next": next_target})
    assert form.status_code == 200 and 'name="next"' not in text(form)
    data = {"csrf": field(form, "csrf"), "username": ADMIN, "password": ADMIN_PASSWORD, "next": next_target}
    response = browser.post("/admin/login", data)
    assert response.status_code == 302 and response.headers["Location"] == "/admin/"
    signed_in = browser.get("/admin/login", query_string={"next": next_target})
    assert signed_in.status_code == 302 and signed_in.headers["Location"] == "/admin/"
    assert browser.get("/admin/").status_code == 200


def test_redirects_are_relative_whatever_the_host_header(app):
    client = app.test_client()
    for path in ("/admin", "/admin/", "/admin/devices"):
        response = client.get(path, base_url="https://evil.example")
        assert response.status_code in (302, 308), path
        location = response.headers["Location"]
        assert location.startswith("/admin") and "evil" not in location, (path, location)


def test_serverkeygen_answers_are_not_cached(app):
    response = app.test_client().post(
        "/.well-known/est/serverkeygen", data=der(make_csr("NPPKEY1")), headers={"Content-Type": "application/pkcs10", **basic_auth()}
    )
    assert response.status_code == 200 and response.mimetype == "multipart/mixed"
    assert response.headers["Cache-Control"] == "no-store"
    refused = app.test_client().post("/.well-known/est/serverkeygen", data=b"x", headers={"Content-Type": "application/pkcs10", **basic_auth()})
    assert refused.status_code == 400


# --- RA registration ------------------------------------------------------------


def ra_add(config, cert, *args: str):
    path = config.parent / "candidate.pem"
    path.write_bytes(pem(cert))
    return run_cli("ra", "add", str(path), *args, config=config)


@pytest.mark.parametrize(
    "which, phrase",
    [("expired", "is expired or not yet valid"), ("not yet valid", "is expired or not yet valid"),
     ("serverAuth only", "lacks the clientAuth"), ("no EKU", "lacks the clientAuth")],
)
def test_ra_add_refuses_a_certificate_the_server_would_refuse(make_app, tmp_path, client_certs, which, phrase):
    app = make_app(labels=RA_LABELS)
    result = ra_add(tmp_path / "config.yaml", client_certs[which], "--label", "pumps", "--force")
    assert result.exit_code != 0 and phrase in result.output and "an RA cannot use it" in result.output
    assert store(app).list_ras() == []


def test_ra_add_refuses_a_revoked_certificate(make_app, tmp_path):
    app = make_app(auth=["basic", "cert"])
    (ra_cert,) = certs_from(enroll(app.test_client(), der(make_csr("IQE-Gateway"))))
    assert run_cli("cert", "revoke", format(ra_cert.serial_number, "x"), config=tmp_path / "config.yaml").exit_code == 0
    result = ra_add(tmp_path / "config.yaml", ra_cert, "--label", "default")
    assert result.exit_code != 0 and "is revoked" in result.output
    assert store(app).list_ras() == []


def test_ra_add_on_a_password_only_label_needs_force(make_app, tmp_path, client_certs):
    """Issue 12: registered silently on a password-only label, the RA met 401 and was audited as anonymous."""
    app = make_app(labels=RA_LABELS)
    config, ra = tmp_path / "config.yaml", client_certs["ra"]
    refused = ra_add(config, ra, "--label", "default", "--label", "passwords")
    assert refused.exit_code != 0
    assert "accept only passwords" in refused.output and "add cert to auth, labels.passwords.auth" in refused.output and "--force" in refused.output
    assert store(app).list_ras() == []
    forced = ra_add(config, ra, "--label", "passwords", "--force")
    assert forced.exit_code == 0 and "warning: label(s) passwords accept only passwords" in forced.output
    assert [r.fingerprint for r in store(app).list_ras()] == [fingerprint(ra)]
    ok = ra_add(config, ra, "--label", "pumps")
    assert ok.exit_code == 0 and "warning" not in ok.output


@pytest.mark.parametrize("address, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("not an address", "not an address"),
])
def test_one_client_key_for_the_back_off_and_the_connection_limit(address, key):
    assert client_key(address) == key
