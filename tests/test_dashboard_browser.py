"""The dashboard in a real browser: headless Chromium, driven by Selenium, against the real server.

The server is ``est-server`` (gunicorn, TLS) on a loopback port, with users
added through the CLI and devices enrolled over HTTPS with HTTP Basic, one of
them with the commonName ``<script>alert(1)</script>``. Chromium is Debian's
(``/usr/bin/chromium`` with ``/usr/bin/chromedriver``); it trusts the test
server's development CA only through ``--ignore-certificate-errors`` and is
pointed at a dead proxy, so it can reach nothing but loopback. The overview
is saved to ``test-artifacts/dashboard-overview.png``.
"""

from __future__ import annotations

import base64
import http.client
import os
import ssl
from pathlib import Path

import pytest

from est_app.store import Store

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, make_csr
from .server import REPO, RunningServer, start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "test-artifacts"
ADMIN = "admin1"
ADMIN_PASSWORD = "browser test admin password"
XSS = "<script>alert(1)</script>"
DEVICES = ["NPP-A0001", "NPP-B0001", "NPP-B0002", "NPP-B0003", "NPP-C0001", XSS]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
        "install with: apt-get install chromium chromium-driver",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def enroll(server: RunningServer, cn: str) -> None:
    """simpleenroll over HTTPS with Basic auth, as the gateway does it (base64 CSR)."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=15)
    try:
        body = base64.b64encode(der(make_csr(cn)))
        conn.request("POST", "/.well-known/est/simpleenroll", body=body, headers={"Content-Type": "application/pkcs10", **basic_auth()})
        response = conn.getresponse()
        reply = response.read()
    finally:
        conn.close()
    assert response.status == 200, reply


@pytest.fixture(scope="module")
def server(pki_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dashboard")
    server = start_server(pki_dir, workdir, database={"url": f"sqlite:///{workdir / 'est.db'}"}, rate_limit={"enabled": False})
    try:
        for args, password in (((USER,), PASSWORD), ((ADMIN, "--admin"), ADMIN_PASSWORD)):
            result = run_cli("user", "add", *args, input=password + "\n", config=server.config)
            assert result.exit_code == 0, result.output
        for cn in DEVICES:
            enroll(server, cn)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def store(server) -> Store:
    import yaml

    return Store(yaml.safe_load(server.config.read_text())["database"]["url"])


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--ignore-certificate-errors",  # the test's own loopback server and its development CA, nothing else
        "--proxy-server=http://127.0.0.1:9",  # everything but loopback goes to a dead port: no network
        "--window-size=1366,1000",
        "--lang=en-GB",
    ):
        options.add_argument(argument)
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    try:
        browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    finally:
        if previous is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = previous
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


def visit(driver, server: RunningServer, path: str) -> None:
    """Open ``path``, signing in through the form first if the dashboard asks for it."""
    driver.get(server.url + path)
    if "/admin/login" in driver.current_url:
        sign_in(driver)
        assert "/admin/login" not in driver.current_url, driver.page_source


OLD_PAGE = "estOldPage"  # a mark set on the page being left; the new document does not carry it


def next_page(driver, action, *expected: str) -> None:
    """Do ``action`` (a click or submit), then wait for the new page: loaded, and holding ``expected`` (a CSS selector).

    The wait asks about the new document only (the old one is marked and must be gone); it never
    holds a reference to an element of the old page, which Chromium may drop mid-navigation
    ("Node with given id does not belong to the document"). Errors while the browser is between
    documents count as "not yet".
    """
    driver.execute_script(f"document.documentElement.dataset.{OLD_PAGE} = '1'")
    action()

    def arrived(d) -> bool:
        try:
            loaded = d.execute_script(
                f"return document.readyState === 'complete' && !document.documentElement.dataset.{OLD_PAGE}"
            )
            return bool(loaded) and all(d.find_elements(By.CSS_SELECTOR, selector) for selector in expected)
        except WebDriverException:
            return False

    WebDriverWait(driver, 30, poll_frequency=0.1).until(arrived, f"no new page with {expected} at {driver.current_url}")


def sign_in(driver, name: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
    driver.find_element(By.ID, "username").clear()
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    next_page(driver, driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click, "h1")


def heading(driver) -> str:
    return driver.find_element(By.TAG_NAME, "h1").text


def test_sign_in_search_open_and_revoke_with_confirmation(server, driver, store):
    driver.delete_all_cookies()
    driver.get(server.url + "/admin/")
    assert "/admin/login" in driver.current_url and heading(driver) == "Sign in"
    sign_in(driver, ADMIN, "not the password")
    assert "Incorrect username or password." in driver.find_element(By.CSS_SELECTOR, ".flash-error").text
    sign_in(driver)
    assert driver.current_url == server.url + "/admin/" and heading(driver) == "Overview"

    next_page(driver, driver.find_element(By.LINK_TEXT, "Devices").click, "#q")
    search = driver.find_element(By.ID, "q")
    search.send_keys("NPP-B")
    next_page(driver, search.submit, ".results-count")
    assert "3 devices match" in driver.find_element(By.CSS_SELECTOR, ".results-count").text
    listed = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "a.device-link")]
    assert listed == ["NPP-B0003", "NPP-B0002", "NPP-B0001"]

    next_page(driver, driver.find_element(By.LINK_TEXT, "NPP-B0002").click, "#device-key")
    assert driver.find_element(By.ID, "device-key").text == "NPP-B0002"
    (device,) = store.find_devices(search="NPP-B0002")
    assert store.get_certificate(device.current_serial).status == "valid"

    next_page(driver, driver.find_element(By.LINK_TEXT, "Revoke current certificate").click, "#reason")
    assert heading(driver) == "Revoke the current certificate?"
    assert store.get_certificate(device.current_serial).status == "valid"  # the confirmation page changes nothing
    Select(driver.find_element(By.ID, "reason")).select_by_value("keyCompromise")
    next_page(driver, driver.find_element(By.XPATH, "//button[normalize-space()='Revoke certificate']").click, ".flash-success")

    assert driver.current_url == f"{server.url}/admin/devices/{device.id}"
    assert "is revoked (keyCompromise)" in driver.find_element(By.CSS_SELECTOR, ".flash-success").text
    facts = driver.find_element(By.CSS_SELECTOR, ".facts").text
    assert "revoked" in facts and "keyCompromise" in facts
    assert not driver.find_elements(By.LINK_TEXT, "Revoke current certificate")
    record = store.get_certificate(device.current_serial)
    assert record.status == "revoked" and record.revocation_reason == "keyCompromise"
    (event,) = [e for e in store.audit_events(device="NPP-B0002") if e.event == "revoke"]
    assert event.actor == f"admin:{ADMIN}" and event.client_address == "127.0.0.1"


def test_device_named_like_a_script_is_only_text(server, driver):
    visit(driver, server, "/admin/devices?q=script")
    link = driver.find_element(By.CSS_SELECTOR, "a.device-link")
    assert link.text == XSS
    next_page(driver, link.click, "#device-key")
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert
    assert driver.find_element(By.ID, "device-key").text == XSS
    assert XSS in driver.find_element(By.TAG_NAME, "body").text
    assert driver.find_elements(By.TAG_NAME, "script") == []
    visit(driver, server, "/admin/")
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert
    assert XSS in driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby=activity-title] table").text  # as text


def test_overview_renders_and_is_saved_as_a_screenshot(server, driver):
    visit(driver, server, "/admin/")
    assert heading(driver) == "Overview"
    stats = driver.find_element(By.CSS_SELECTOR, ".stats").text
    assert f"{len(DEVICES)}\nDevices enrolled" in stats and "1\nRevoked certificates" in stats
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg .day")) == 30
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg rect.bar")) == 1
    # The stylesheet loaded (no CSP or path trouble): the top bar has its dark background.
    assert driver.find_element(By.CSS_SELECTOR, ".topbar").value_of_css_property("background-color") == "rgba(19, 38, 61, 1)"

    driver.set_window_size(1280, 1000)
    # Names in Recent activity wrap between words, never inside one ("admin:admin1" stays on one line).
    split = driver.execute_script(
        """return [...document.querySelectorAll("section[aria-labelledby=activity-title] td.wrap-words")]
             .filter(td => { const r = document.createRange(); r.selectNodeContents(td); return r.getClientRects().length > 1; })
             .map(td => td.textContent)"""
    )
    assert split == []
    assert driver.find_element(By.LINK_TEXT, "Full audit trail »").get_attribute("href").endswith("/admin/activity")
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    assert height < 1900, f"the overview is {height} px tall at 1280 px"  # it was 2,250 with 20 activity rows
    driver.set_window_size(1280, min(height + chrome, 4000))  # the whole page, no scrollbar
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-overview.png"
    shot.unlink(missing_ok=True)
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, tall = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1000 and tall >= 700 and len(data) > 20_000
    driver.set_window_size(1366, 1000)


def test_device_list_and_activity_trail_at_1280(server, driver):
    driver.set_window_size(1280, 1000)
    visit(driver, server, "/admin/devices")
    rows = {row.find_element(By.CSS_SELECTOR, "a.device-link").text: row.text for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert "revoked 20" in rows["NPP-B0002"] and "in 36" not in rows["NPP-B0002"]  # revoked <date>, not "in 365 days"
    assert "in 36" in rows["NPP-A0001"]
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "dashboard-devices.png"))

    next_page(driver, driver.find_element(By.LINK_TEXT, "Activity").click, "section[aria-labelledby=trail-title] table")
    assert driver.current_url == server.url + "/admin/activity" and heading(driver) == "Activity"
    actors = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "td.wrap-words")]
    assert f"admin:{ADMIN}" in actors and f"user:{USER}" in actors
    assert driver.save_screenshot(str(ARTIFACTS / "dashboard-activity.png"))
    driver.set_window_size(1366, 1000)


def test_sign_out(server, driver):
    visit(driver, server, "/admin/")
    next_page(driver, driver.find_element(By.XPATH, "//button[normalize-space()='Sign out']").click, ".flash-success")
    assert "/admin/login" in driver.current_url
    assert "You have signed out." in driver.find_element(By.CSS_SELECTOR, ".flash-success").text
    driver.get(server.url + "/admin/devices")
    assert "/admin/login" in driver.current_url
