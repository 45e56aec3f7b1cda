"""The admin JSON API under /api/v1, through the Flask test client.

Devices are enrolled through the real EST endpoint, admins and RAs are added
with the real CLI, and what the API claims is checked against the store, the
CRL the server publishes and the audit trail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from est_app import create_app
from est_app.state import state
from est_app.store.schema import devices

from .conftest import PASSWORD, USER, basic_auth, run_cli
from .pki import der, ec_key, make_csr, pem
from .test_enroll import certs_from

ADMIN = "admin1"
ADMIN_PASSWORD = "infusion pumps need a careful admin"
ENROLL = "/.well-known/est/simpleenroll"
JSON = "application/json"


# --- helpers -----------------------------------------------------------------


def serial_of(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def enroll(client, cn: str, label: str | None = None) -> x509.Certificate:
    """Enroll ``cn`` through the real EST endpoint with the test user's Basic credentials."""
    path = f"/.well-known/est/{label}/simpleenroll" if label else ENROLL
    response = client.post(path, data=der(make_csr(cn)), headers={"Content-Type": "application/pkcs10", **basic_auth()})
    assert response.status_code == 200, response.get_data(as_text=True)
    (cert,) = certs_from(response)
    return cert


def enroll_under_shared_name(app, name: str, label: str) -> None:
    """A second device called ``name`` on ``label``, as registries from before the one-label rule hold."""
    enroll(app.test_client(), "NPPSHR1", label)
    with app.app_context():
        engine = state().store.engine
    with engine.begin() as conn:
        conn.execute(devices.update().where(devices.c.device_key == "NPPSHR1").values(device_key=name))


def add_admin(config: Path) -> None:
    result = run_cli("user", "add", ADMIN, "--admin", input=ADMIN_PASSWORD + "\n", config=config)
    assert result.exit_code == 0, result.output


@dataclass
class Api:
    app: object
    client: object
    config: Path
    ra_pem: str = ""  # a registered RA's certificate (PEM), for who="ra"

    def call(self, method: str, path: str, who: str = "admin", *, environ: dict | None = None, **kwargs):
        headers = {**IDENTITIES[who][0], **kwargs.pop("headers", {})}
        environ = {**(environ or {})}
        if who == "ra":
            environ["SSL_CLIENT_CERT"] = self.ra_pem
        return self.client.open(path, method=method, headers=headers, environ_base=environ, **kwargs)

    def get(self, path: str, **kwargs) -> dict:
        """GET as the admin; must be 200 JSON. Returns the decoded body."""
        response = self.call("GET", path, **kwargs)
        assert response.status_code == 200, response.get_data(as_text=True)
        return decoded(response)

    def store(self):
        with self.app.app_context():
            return state().store


# who -> (headers, description)
IDENTITIES = {
    "none": ({}, "no credentials"),
    "user": (basic_auth(USER, PASSWORD), "an EST user"),
    "wrong password": (basic_auth(ADMIN, "not the password"), "an admin with a wrong password"),
    "ra": ({}, "a registered RA client certificate"),
    "admin": (basic_auth(ADMIN, ADMIN_PASSWORD), "an admin"),
}


def decoded(response) -> object:
    """The JSON body; every answer from this API is JSON and never carries anything private."""
    assert response.headers["Content-Type"] == JSON, response.headers
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    text = response.get_data(as_text=True)
    assert "PRIVATE KEY" not in text
    return json.loads(text)


def assert_error(response, status: int, phrase: str = "") -> dict:
    """The error shape: {"error": one line, "status": n}, application/json."""
    body = decoded(response)
    assert response.status_code == status, body
    assert set(body) == {"error", "status"} and body["status"] == status, body
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]
    assert phrase in body["error"], body
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Basic realm="EST admin"'
    return body


def mint_client_certificate(pki_dir: Path, cn: str) -> x509.Certificate:
    """A clientAuth certificate signed by this server's own CA key (what an RA gateway holds)."""
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(ec_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


@pytest.fixture
def make_api(make_app, tmp_path, pki_dir):
    """An app (from make_app) with an admin account and a registered RA, and its test client."""

    def build(**overrides) -> Api:
        app = make_app(**overrides)
        config = tmp_path / "config.yaml"
        add_admin(config)
        ra = mint_client_certificate(pki_dir, "iqe-gateway-ra")
        (tmp_path / "ra.pem").write_bytes(pem(ra))
        result = run_cli("ra", "add", str(tmp_path / "ra.pem"), "--label", "default", "--force", config=config)
        assert result.exit_code == 0, result.output
        return Api(app, app.test_client(), config, ra_pem=pem(ra).decode())

    return build


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


# --- 1. who may call what ----------------------------------------------------------

# (method, path, JSON body, status for an admin); {device} and {serial} are a freshly enrolled device's
ROUTES = [
    ("GET", "/api/v1/devices", None, 200),
    ("GET", "/api/v1/devices/{device}", None, 200),
    ("DELETE", "/api/v1/devices/{device}", None, 204),
    ("POST", "/api/v1/devices/{device}/revoke", {"reason": "keyCompromise"}, 200),
    ("GET", "/api/v1/certificates", None, 200),
    ("GET", "/api/v1/certificates/{serial}", None, 200),
    ("POST", "/api/v1/certificates/{serial}/revoke", {}, 200),
    ("GET", "/api/v1/statistics", None, 200),
    # Approval (tests/test_approval.py covers their successes): no request 1 and an empty inventory here, so 404 for the admin.
    ("GET", "/api/v1/requests", None, 200),
    ("GET", "/api/v1/requests/{request}", None, 404),
    ("POST", "/api/v1/requests/{request}/approve", {}, 404),
    ("POST", "/api/v1/requests/{request}/reject", {"reason": "unknown device"}, 404),
    ("GET", "/api/v1/inventory", None, 200),
    ("POST", "/api/v1/inventory", {"devices": ["NPPINV1"]}, 200),
    ("DELETE", "/api/v1/inventory/{label}/{device}", None, 404),
]


def test_the_matrix_covers_every_route(api):
    """If a route is added to the blueprint, it must be added to ROUTES (and so to the matrix)."""
    served = {
        (method, rule.rule.replace("<device>", "{device}").replace("<serial>", "{serial}").replace("<int:request_id>", "{request}").replace("<label>", "{label}"))
        for rule in api.app.url_map.iter_rules()
        if rule.endpoint.startswith("api.")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == {(method, path) for method, path, _, _ in ROUTES}


@pytest.mark.parametrize("method, path, body, admin_status", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_authorisation_matrix(make_api, method, path, body, admin_status):
    api = make_api(auth=["basic", "cert"])  # the RA could enroll: its 403 here is about role, not validity
    cert = enroll(api.client, "NPPBBB4")
    ra_enrolls = api.client.post(ENROLL, data=der(make_csr("NPPRA01")), headers={"Content-Type": "application/pkcs10"}, environ_base={"SSL_CLIENT_CERT": api.ra_pem})
    assert ra_enrolls.status_code == 200, ra_enrolls.get_data(as_text=True)
    (device,) = [d for d in api.store().find_devices() if d.device_key == "NPPBBB4"]
    url = path.format(device=device.id, serial=serial_of(cert), request=1, label="default")
    kwargs = {"json": body} if body is not None else {}

    expected = {"none": (401, "authentication required"), "wrong password": (401, "not accepted"),
                "user": (403, "EST user, not an admin"), "ra": (403, "client certificates cannot administer")}
    for who, (status, phrase) in expected.items():
        assert_error(api.call(method, url, who, **kwargs), status, phrase)
    # nothing the refused callers asked for happened
    assert api.store().get_device(device.id) is not None
    assert api.store().get_certificate(serial_of(cert)).status == "valid"

    response = api.call(method, url, "admin", **kwargs)
    assert response.status_code == admin_status, response.get_data(as_text=True)
    if admin_status == 204:
        assert response.get_data() == b"" and "Content-Type" not in response.headers
    else:
        decoded(response)


# --- 2. lists: pagination and filters --------------------------------------------------

FLEET = 120


def fleet_label(i: int) -> str:
    return "short" if i % 10 == 0 else ("pumps" if i % 3 == 0 else "default")


def module_api(pki_dir: Path, directory: Path, **overrides) -> Api:
    """What make_api builds, for a module-scoped fixture (make_app is per test): `est init`'s
    configuration with ``overrides`` merged in, a fresh database, the test user and an admin."""
    data = yaml.safe_load((pki_dir / "config.yaml").read_text())
    data.update(database={"url": f"sqlite:///{directory / 'est.db'}"}, rate_limit={"enabled": False}, **overrides)
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=config).exit_code == 0
    add_admin(config)
    app = create_app(config)
    app.config["TESTING"] = True
    return Api(app, app.test_client(), config)


@pytest.fixture(scope="module")
def fleet(pki_dir, tmp_path_factory):
    """120 devices enrolled through EST (12 on a 10-day label, 36 on "pumps"), 5 renewed, 2 revoked by the API."""
    api = module_api(pki_dir, tmp_path_factory.mktemp("fleet"), labels={"short": {"cert_validity_days": 10}, "pumps": {}})
    certs = {}
    for i in range(FLEET):
        label = fleet_label(i)
        certs[f"NPP{i:04d}"] = [enroll(api.client, f"NPP{i:04d}", None if label == "default" else label)]
    for i in range(1, 6):  # again on its own label, renew policy: the first certificate is superseded
        label = fleet_label(i)
        certs[f"NPP{i:04d}"].append(enroll(api.client, f"NPP{i:04d}", None if label == "default" else label))
    devices = {d.device_key: d for d in api.store().find_devices()}
    assert len(devices) == FLEET
    for cn in ("NPP0007", "NPP0008"):
        assert api.call("POST", f"/api/v1/devices/{devices[cn].id}/revoke", json={}).status_code == 200
    return api, devices, certs


def walk(api: Api, path: str, limit: int, **params) -> tuple[list[dict], list[int]]:
    """Every item of a list, following ``next`` until it is null; also each page's total."""
    items, totals, after = [], [], None
    for _ in range(1000):
        query = {**params, "limit": limit, **({"after": after} if after is not None else {})}
        page = api.get(path, query_string=query)
        assert set(page) == {"items", "next", "total"}
        assert len(page["items"]) <= limit
        items += page["items"]
        totals.append(page["total"])
        after = page["next"]
        if after is None:
            return items, totals
        assert len(page["items"]) == limit  # only a full page has a next
    raise AssertionError("pagination never ended")


@pytest.mark.parametrize("limit", [1, 7, 50, 119, 120, 500])
def test_device_pages_visit_every_device_once_newest_first(fleet, limit):
    api, devices, _ = fleet
    items, totals = walk(api, "/api/v1/devices", limit)
    ids = [item["number"] for item in items]
    assert ids == sorted((d.id for d in devices.values()), reverse=True)
    assert totals == [FLEET] * len(totals) and len(totals) == -(-FLEET // limit)


def test_device_items_carry_the_documented_fields(fleet):
    api, devices, certs = fleet
    (item,) = api.get("/api/v1/devices", query_string={"search": "NPP0003"})["items"]
    d = devices["NPP0003"]
    current = certs["NPP0003"][-1]
    assert item == {
        "number": d.id, "label": "pumps", "name": "NPP0003",
        "first_enrolled": d.first_enrolled.isoformat(timespec="seconds") + "Z",
        "last_enrolled": d.last_enrolled.isoformat(timespec="seconds") + "Z",
        "current_serial": serial_of(current), "status": "valid",
        "not_after": current.not_valid_after_utc.replace(tzinfo=None).isoformat(timespec="seconds") + "Z",
        "requester": f"user:{USER}", "client_address": "127.0.0.1",
    }


def _device_cases():
    """(id, query, predicate over (i, cn, label) of the fleet) — the expected devices, from what was enrolled."""
    revoked = {"NPP0007", "NPP0008"}
    return [
        ("search CN substring", {"search": "NPP011"}, lambda i, cn, label: "NPP011" in cn),
        ("search is case-sensitive text, wildcards literal", {"search": "%"}, lambda i, cn, label: False),
        ("search surrounding spaces ignored", {"search": "  NPP0099 "}, lambda i, cn, label: cn == "NPP0099"),
        ("label", {"label": "pumps"}, lambda i, cn, label: label == "pumps"),
        ("unknown label", {"label": "nosuch"}, lambda i, cn, label: False),
        ("status revoked", {"status": "revoked"}, lambda i, cn, label: cn in revoked),
        ("status valid", {"status": "valid"}, lambda i, cn, label: cn not in revoked),
        ("status superseded", {"status": "superseded"}, lambda i, cn, label: False),
        ("expires within 30 days", {"expires_within_days": "30"}, lambda i, cn, label: label == "short"),
        ("expires within 0 days", {"expires_within_days": "0"}, lambda i, cn, label: False),
        ("expires within 400 days", {"expires_within_days": "400"}, lambda i, cn, label: True),
        ("label and status", {"label": "default", "status": "revoked"}, lambda i, cn, label: cn in revoked),
        ("label and search", {"label": "short", "search": "NPP00"}, lambda i, cn, label: label == "short" and cn.startswith("NPP00")),
    ]


@pytest.mark.parametrize("query, predicate", [c[1:] for c in _device_cases()], ids=[c[0] for c in _device_cases()])
def test_device_filters(fleet, query, predicate):
    api, devices, _ = fleet
    items, totals = walk(api, "/api/v1/devices", 5, **query)
    expected = {devices[f"NPP{i:04d}"].id for i in range(FLEET) if predicate(i, f"NPP{i:04d}", fleet_label(i))}
    ids = [item["number"] for item in items]
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert ids == sorted(ids, reverse=True)
    assert set(totals) == {len(expected)}


def test_device_search_by_numeric_id(fleet):
    api, devices, _ = fleet
    target = devices["NPP0042"].id
    items = api.get("/api/v1/devices", query_string={"search": str(target), "limit": 500})["items"]
    expected = {target} | {d.id for d in devices.values() if str(target) in d.device_key}
    assert {item["number"] for item in items} == expected and target in expected


@pytest.mark.parametrize("search", ["²", "١٢", "9" * 30, "0" * 19 + "1"])
def test_device_search_that_only_looks_numeric_is_text(fleet, search):
    """Unicode digits and ids past 64 bits are searched as text (once a 500 from int())."""
    api, devices, _ = fleet
    page = api.get("/api/v1/devices", query_string={"search": search})
    assert page["total"] == sum(search in d.device_key for d in devices.values())


def test_certificate_pages_and_filters(fleet):
    api, devices, certs = fleet
    issued = {serial_of(c): cn for cn, chain in certs.items() for c in chain}
    items, totals = walk(api, "/api/v1/certificates", 11)
    serials = [item["serial"] for item in items]
    assert len(serials) == len(set(serials)) and set(serials) == set(issued)
    assert totals == [len(issued)] * len(totals)
    store = api.store()
    keys = [(store.get_certificate(s).issued_at, s) for s in serials]  # the API shows whole seconds; the store has more
    assert keys == sorted(keys, reverse=True)  # newest issue first
    assert all("pem" not in item and "der" not in item for item in items)

    by_status = {s: {item["serial"] for item in walk(api, "/api/v1/certificates", 13, status=s)[0]} for s in ("valid", "superseded", "revoked")}
    assert by_status["superseded"] == {serial_of(certs[f"NPP{i:04d}"][0]) for i in range(1, 6)}
    assert by_status["revoked"] == {serial_of(certs[cn][-1]) for cn in ("NPP0007", "NPP0008")}
    assert len(by_status["valid"]) == FLEET - 2

    short = walk(api, "/api/v1/certificates", 5, expires_within_days=30)[0]
    assert {item["common_name"] for item in short} == {f"NPP{i:04d}" for i in range(0, FLEET, 10)}
    assert {item["label"] for item in walk(api, "/api/v1/certificates", 500, label="short")[0]} == {"short"}
    cn_search = walk(api, "/api/v1/certificates", 500, search="NPP000")[0]
    assert sorted(item["common_name"] for item in cn_search) == sorted(cn for cn in issued.values() if "NPP000" in cn)
    one = serial_of(certs["NPP0050"][0])
    for form in (one, one.upper()):
        (item,) = api.get("/api/v1/certificates", query_string={"search": form})["items"]
        assert item["serial"] == one and item["device_number"] == devices["NPP0050"].id


def test_statistics(fleet):
    api, _, _ = fleet
    stats = api.get("/api/v1/statistics")
    assert stats["devices"] == FLEET
    assert stats["certificates"] == {"valid": FLEET - 2, "superseded": 5, "revoked": 2}
    assert stats["expiring"]["30d"] == 12 and stats["expiring"]["90d"] == 12
    assert stats["issued_per_day"][-1] == {"date": datetime.now(timezone.utc).date().isoformat(), "count": FLEET + 5}
    assert [e["event"] for e in stats["recent_events"][:2]] == ["revoke", "revoke"]
    assert stats["recent_events"][0]["actor"] == f"admin:{ADMIN}"


# --- 3. one device's life: history, revocation, the CRL, deletion, the audit trail ----------


def test_device_routes_take_the_device_name_or_number_and_a_label_settles_a_shared_name(make_api):
    api = make_api(labels={"pumps": {}})
    enroll(api.client, "NPPBBB4")
    enroll_under_shared_name(api.app, "NPPBBB4", "pumps")
    enroll(api.client, "NPPCCC7", "pumps")
    devices = {(d.label, d.device_key): d for d in api.store().find_devices()}
    ccc7 = devices[("pumps", "NPPCCC7")]

    # A name on one label: the name alone will do, as will the number.
    assert api.get("/api/v1/devices/NPPCCC7")["number"] == ccc7.id
    assert api.get(f"/api/v1/devices/{ccc7.id}")["name"] == "NPPCCC7"
    # A name on two labels: a one-line 400 naming both labels, until ?label= says which.
    body = assert_error(api.call("GET", "/api/v1/devices/NPPBBB4"), 400, "'NPPBBB4' fits 2 devices")
    assert "label 'default'" in body["error"] and "label 'pumps'" in body["error"] and "?label=" in body["error"]
    assert_error(api.call("POST", "/api/v1/devices/NPPBBB4/revoke", json={}), 400, "fits 2 devices")
    pumps = devices[("pumps", "NPPBBB4")]
    assert api.get("/api/v1/devices/NPPBBB4", query_string={"label": "pumps"})["number"] == pumps.id
    assert_error(api.call("GET", "/api/v1/devices/NPPCCC7", query_string={"label": "default"}), 404, "on label 'default'")

    revoked = api.call("POST", "/api/v1/devices/NPPBBB4/revoke?label=pumps", json={"reason": "keyCompromise"})
    assert revoked.status_code == 200 and decoded(revoked)["serial"] == pumps.current_serial
    assert api.store().get_certificate(devices[("default", "NPPBBB4")].current_serial).status == "valid"
    assert api.call("DELETE", "/api/v1/devices/NPPCCC7").status_code == 204
    assert api.store().get_device(ccc7.id) is None


def test_device_history_revoke_crl_delete_and_audit(api):
    first = enroll(api.client, "NPPBBB4")
    second = enroll(api.client, "NPPBBB4")  # same CN, renew policy: supersedes the first
    (device,) = api.store().find_devices()

    shown = api.get(f"/api/v1/devices/{device.id}")
    assert (shown["name"], shown["current_serial"], shown["status"]) == ("NPPBBB4", serial_of(second), "valid")
    assert [(c["serial"], c["status"], c["operation"]) for c in shown["certificates"]] == [
        (serial_of(first), "superseded", "simpleenroll"), (serial_of(second), "valid", "simpleenroll")]
    assert all(c["subject"] == "CN=NPPBBB4" and c["requester"] == f"user:{USER}" for c in shown["certificates"])
    assert [(e["event"], e["serial"], e["actor"]) for e in shown["events"]] == [
        ("enroll", serial_of(second), f"user:{USER}"), ("enroll", serial_of(first), f"user:{USER}")]

    # revoke the device: its current certificate, with the reason given
    revoked = api.call("POST", f"/api/v1/devices/{device.id}/revoke", json={"reason": "keyCompromise"})
    body = decoded(revoked)
    assert revoked.status_code == 200, body
    assert (body["serial"], body["status"], body["revocation_reason"]) == (serial_of(second), "revoked", "keyCompromise")
    assert body["revoked_at"].endswith("Z")
    assert api.get(f"/api/v1/devices/{device.id}")["status"] == "revoked"
    assert_error(api.call("POST", f"/api/v1/devices/{device.id}/revoke", json={}), 409, "revoked already")
    assert_error(api.call("POST", f"/api/v1/certificates/{serial_of(second)}/revoke", json={}), 409, "revoked already")

    # revoke the superseded one by serial, written the way operators copy it (upper case, colons), empty body
    colons = ":".join(f"{serial_of(first):0>40}".upper()[i:i + 2] for i in range(0, 40, 2))
    by_serial = api.call("POST", f"/api/v1/certificates/{colons}/revoke", data=b"", content_type=JSON)
    assert by_serial.status_code == 200 and decoded(by_serial)["revocation_reason"] == "unspecified"

    crl = x509.load_der_x509_crl(api.client.get("/crl").get_data())
    entry = crl.get_revoked_certificate_by_serial_number(second.serial_number)
    assert entry is not None and entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(first.serial_number) is not None

    # delete: 204, then gone; the same CN enrolls again as a new device; the certificates stay on record
    assert_error(api.call("DELETE", f"/api/v1/devices/{device.id}?keep_certificate=yes"), 400, "keep_certificate must be true or false, not 'yes'")
    assert_error(api.call("DELETE", f"/api/v1/devices/{device.id}?keep=true"), 400, "unknown query parameter(s) keep; this route takes: label, keep_certificate")
    deleted = api.call("DELETE", f"/api/v1/devices/{device.id}")
    assert deleted.status_code == 204 and deleted.get_data() == b""
    assert_error(api.call("GET", f"/api/v1/devices/{device.id}"), 404, f"no device number {device.id}")
    assert_error(api.call("DELETE", f"/api/v1/devices/{device.id}"), 404, f"no device number {device.id}")
    assert_error(api.call("POST", f"/api/v1/devices/{device.id}/revoke", json={}), 404, f"no device number {device.id}")
    kept = api.get(f"/api/v1/certificates/{serial_of(second)}")
    assert (kept["status"], kept["device_number"]) == ("revoked", None)
    third = enroll(api.client, "NPPBBB4")
    (again,) = api.store().find_devices()
    assert again.id != device.id and again.current_serial == serial_of(third)

    # every admin action is on the trail, with who and from where
    trail = [e for e in api.store().audit_events() if e.actor.startswith("admin:")]
    assert [(e.event, e.actor, e.client_address, e.label, e.device, e.serial, e.detail) for e in trail] == [
        ("revoke", f"admin:{ADMIN}", "127.0.0.1", "default", "NPPBBB4", serial_of(second), "keyCompromise"),
        ("revoke", f"admin:{ADMIN}", "127.0.0.1", "default", "NPPBBB4", serial_of(first), "unspecified"),
        ("device-delete", f"admin:{ADMIN}", "127.0.0.1", "default", "NPPBBB4", serial_of(second), f"device {device.id}; its certificates revoked"),
    ]  # no second revoke event: the current certificate was revoked already (keyCompromise stays its reason)
    assert api.get(f"/api/v1/certificates/{serial_of(second)}")["revocation_reason"] == "keyCompromise"


# (id, query string, status and reason of the certificate after the delete, in the CRL?)
DELETE_CASES = [
    ("default revokes", "", "revoked", "cessationOfOperation", True),
    ("keep_certificate=false revokes", "?keep_certificate=false", "revoked", "cessationOfOperation", True),
    ("keep_certificate=true keeps it valid", "?keep_certificate=true", "valid", None, False),
]


@pytest.mark.parametrize("query, status, reason, listed", [pytest.param(*c[1:], id=c[0]) for c in DELETE_CASES])
def test_delete_revokes_the_current_certificate_unless_kept(api, query, status, reason, listed):
    cert = enroll(api.client, "NPPBBB4")
    (device,) = api.store().find_devices()
    assert api.call("DELETE", f"/api/v1/devices/{device.id}{query}").status_code == 204
    shown = api.get(f"/api/v1/certificates/{serial_of(cert)}")
    assert (shown["status"], shown["revocation_reason"], shown["device_number"]) == (status, reason, None)
    crl = x509.load_der_x509_crl(api.client.get("/crl").get_data())  # re-signed at once, not at half-life
    assert (crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None) == listed
    events = [(e.event, e.detail) for e in api.store().audit_events() if e.actor == f"admin:{ADMIN}"]
    kept = "kept valid at the operator's request" if status == "valid" else "revoked"
    assert events == ([("revoke", reason)] if listed else []) + [("device-delete", f"device {device.id}; its certificates {kept}")]


def test_certificate_detail_has_the_pem_and_nothing_private(api, pki_dir):
    cert = enroll(api.client, "NPPBBB4")
    shown = api.get(f"/api/v1/certificates/{serial_of(cert)}")
    assert x509.load_pem_x509_certificate(shown["pem"].encode()) == cert
    assert set(shown) == {"serial", "common_name", "subject", "label", "device_number", "status", "operation", "requester",
                          "not_before", "not_after", "issued_at", "revoked_at", "revocation_reason", "pem"}
    assert shown["not_before"] == cert.not_valid_before_utc.replace(tzinfo=None).isoformat() + "Z"
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate(shown["pem"].encode()).verify_directly_issued_by(ca)
    assert api.get(f"/api/v1/certificates/00{serial_of(cert).upper()}")["serial"] == serial_of(cert)


def test_device_detail_events_belong_to_its_label(make_api):
    """A device moved to another label (deleted, enrolled again there) shows only the new label's events."""
    api = make_api(labels={"pumps": {}})
    enroll(api.client, "NPPBBB4")
    (old,) = api.store().find_devices()
    assert api.call("DELETE", f"/api/v1/devices/{old.id}").status_code == 204
    pump_cert = enroll(api.client, "NPPBBB4", "pumps")
    pump = next(d for d in api.store().find_devices() if d.label == "pumps")
    events = api.get(f"/api/v1/devices/{pump.id}")["events"]
    assert [(e["event"], e["label"], e["serial"]) for e in events] == [("enroll", "pumps", serial_of(pump_cert))]


# --- 4. switching the API off, and the network gate -----------------------------------


def test_admin_disabled_means_no_api(make_api):
    api = make_api(admin={"enabled": False})
    for path in ("/api/v1/devices", "/api/v1/statistics", "/api/v1/certificates"):
        assert api.call("GET", path).status_code == 404


@pytest.mark.parametrize(
    "remote_addr, who, status",
    [("127.0.0.1", "admin", 403), ("192.168.1.10", "admin", 403), ("127.0.0.1", "none", 403),
     ("10.1.2.3", "admin", 200), ("10.1.2.3", "none", 401), ("10.1.2.3", "user", 403)],
)
def test_allowed_networks(make_api, remote_addr, who, status):
    api = make_api(admin={"allowed_networks": ["10.0.0.0/8"]})
    response = api.call("GET", "/api/v1/statistics", who, environ={"REMOTE_ADDR": remote_addr})
    if status == 200:
        assert response.status_code == 200 and decoded(response)["devices"] == 0
    elif who != "admin" and remote_addr.startswith("10."):
        assert_error(response, status)
    else:
        assert_error(response, status, f"not available from {remote_addr}")
    # EST itself is not behind the admin gate
    assert api.client.get("/.well-known/est/cacerts", environ_base={"REMOTE_ADDR": remote_addr}).status_code == 200


# --- 5. errors are JSON ------------------------------------------------------------------

BIG = "A" * (64 * 1024 + 1)

# (id, who, method, path, kwargs, status, phrase, header that must be present)
ERROR_CASES = [
    ("limit not a number", "admin", "GET", "/api/v1/devices?limit=abc", {}, 400, "limit must be a whole number from 1 to 500", None),
    ("limit zero", "admin", "GET", "/api/v1/devices?limit=0", {}, 400, "from 1 to 500", None),
    ("limit too large", "admin", "GET", "/api/v1/certificates?limit=501", {}, 400, "from 1 to 500", None),
    ("negative limit", "admin", "GET", "/api/v1/devices?limit=-5", {}, 400, "from 1 to 500", None),
    ("unknown status", "admin", "GET", "/api/v1/devices?status=bogus", {}, 400, "status must be one of valid, superseded, revoked", None),
    ("status of certificates", "admin", "GET", "/api/v1/certificates?status=expired", {}, 400, "valid, superseded, revoked", None),
    ("negative expiry window", "admin", "GET", "/api/v1/devices?expires_within_days=-1", {}, 400, "expires_within_days", None),
    ("expiry window in words", "admin", "GET", "/api/v1/certificates?expires_within_days=soon", {}, 400, "expires_within_days", None),
    ("misspelt parameter", "admin", "GET", "/api/v1/devices?stauts=revoked", {}, 400, "unknown query parameter(s) stauts", None),
    ("parameter on a detail route", "admin", "GET", "/api/v1/statistics?days=7", {}, 400, "this route takes: none", None),
    ("repeated parameter", "admin", "GET", "/api/v1/devices?status=valid&status=revoked", {}, 400, "more than once", None),
    ("device cursor not a number", "admin", "GET", "/api/v1/devices?after=abc", {}, 400, "after must be a whole number", None),
    ("certificate cursor not hex", "admin", "GET", "/api/v1/certificates?after=zz", {}, 400, "not a certificate serial", None),
    ("certificate cursor unknown", "admin", "GET", "/api/v1/certificates?after=abcdef", {}, 400, "pass a page's 'next' as is", None),
    ("search too long", "admin", "GET", "/api/v1/devices?search=" + "x" * 300, {}, 400, "at most 256", None),
    ("serial not hex", "admin", "GET", "/api/v1/certificates/not-a-serial", {}, 400, "not a certificate serial", None),
    ("body not JSON", "admin", "POST", "/api/v1/certificates/{serial}/revoke", {"data": "reason=keyCompromise", "content_type": JSON}, 400, "not JSON", None),
    ("body not an object", "admin", "POST", "/api/v1/certificates/{serial}/revoke", {"json": ["keyCompromise"]}, 400, "JSON object", None),
    ("unknown reason", "admin", "POST", "/api/v1/certificates/{serial}/revoke", {"json": {"reason": "stolen"}}, 400, "reason must be one of unspecified, keyCompromise", None),
    ("reason not a string", "admin", "POST", "/api/v1/devices/{device}/revoke", {"json": {"reason": 1}}, 400, "reason must be one of", None),
    ("unknown field", "admin", "POST", "/api/v1/devices/{device}/revoke", {"json": {"reason": "superseded", "force": True}}, 400, "unknown field(s) force", None),
    ("form post (cross-site)", "admin", "POST", "/api/v1/devices/{device}/revoke", {"data": {"reason": "keyCompromise"}}, 415, "Content-Type must be application/json", None),
    ("no content type", "admin", "POST", "/api/v1/certificates/{serial}/revoke", {}, 415, "not missing", None),
    ("body over the limit", "admin", "POST", "/api/v1/certificates/{serial}/revoke", {"json": {"reason": BIG}}, 413, "larger than", None),
    ("no credentials", "none", "GET", "/api/v1/devices", {}, 401, "authentication required", "WWW-Authenticate"),
    ("wrong password", "wrong password", "GET", "/api/v1/statistics", {}, 401, "not accepted", "WWW-Authenticate"),
    ("malformed Authorization", "none", "GET", "/api/v1/devices", {"headers": {"Authorization": "Basic !!!"}}, 401, "authentication required", "WWW-Authenticate"),
    ("EST user", "user", "GET", "/api/v1/devices", {}, 403, "EST user, not an admin", None),
    ("RA certificate", "ra", "DELETE", "/api/v1/devices/{device}", {}, 403, "client certificates cannot administer", None),
    ("unknown route", "admin", "GET", "/api/v1/nosuch", {}, 404, "Not Found", None),
    ("unknown route, no credentials", "none", "GET", "/api/v1/nosuch", {}, 404, "Not Found", None),
    ("the prefix itself", "admin", "GET", "/api/v1", {}, 404, "Not Found", None),
    ("unknown device", "admin", "GET", "/api/v1/devices/999999", {}, 404, "no device number 999999", None),
    ("unknown device name", "admin", "GET", "/api/v1/devices/NOSUCH1", {}, 404, "no device named 'NOSUCH1'", None),
    ("unknown parameter on a device", "admin", "GET", "/api/v1/devices/{device}?lable=pumps", {}, 400, "unknown query parameter(s) lable", None),
    ("device number past 64 bits", "admin", "DELETE", "/api/v1/devices/99999999999999999999999", {}, 404, "no device number 99999999999999999999999", None),
    ("revoke device number past 64 bits", "admin", "POST", "/api/v1/devices/99999999999999999999999/revoke", {"json": {}}, 404, "no device", None),
    ("show device number past 64 bits", "admin", "GET", "/api/v1/devices/99999999999999999999999", {}, 404, "no device", None),
    ("unknown certificate", "admin", "GET", "/api/v1/certificates/abcdef0123", {}, 404, "no certificate with serial abcdef0123", None),
    ("revoke unknown certificate", "admin", "POST", "/api/v1/certificates/abcdef0123/revoke", {"json": {}}, 404, "no certificate", None),
    ("wrong method on a list", "admin", "POST", "/api/v1/devices", {}, 405, "Method Not Allowed", "Allow"),
    ("GET on revoke", "none", "GET", "/api/v1/certificates/{serial}/revoke", {}, 405, "Method Not Allowed", "Allow"),
    ("PUT on a device", "admin", "PUT", "/api/v1/devices/{device}", {}, 405, "Method Not Allowed", "Allow"),
    ("revoked already", "admin", "POST", "/api/v1/certificates/{revoked}/revoke", {"json": {}}, 409, "revoked already", None),
]


@pytest.fixture(scope="module")
def populated(pki_dir, tmp_path_factory):
    """One enrolled device and one revoked certificate, shared by the error cases (each checks it changed nothing)."""
    directory = tmp_path_factory.mktemp("errors")
    api = module_api(pki_dir, directory)
    ra = mint_client_certificate(pki_dir, "iqe-gateway-ra")
    (directory / "ra.pem").write_bytes(pem(ra))
    assert run_cli("ra", "add", str(directory / "ra.pem"), "--label", "default", "--force", config=api.config).exit_code == 0
    api.ra_pem = pem(ra).decode()
    cert = enroll(api.client, "NPPBBB4")
    gone = enroll(api.client, "NPPCCC7")
    assert api.call("POST", f"/api/v1/certificates/{serial_of(gone)}/revoke", json={}).status_code == 200
    device = next(d for d in api.store().find_devices() if d.device_key == "NPPBBB4")
    return api, {"device": device.id, "serial": serial_of(cert), "revoked": serial_of(gone)}


@pytest.mark.parametrize("who, method, path, kwargs, status, phrase, header", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_are_one_line_json_and_the_api_keeps_answering(populated, who, method, path, kwargs, status, phrase, header):
    api, names = populated
    response = api.call(method, path.format(**names), who, **kwargs)
    assert_error(response, status, phrase)
    if header == "Allow":
        allowed = set(response.headers["Allow"].split(", "))
        assert "OPTIONS" in allowed and method not in allowed and allowed & {"GET", "POST"}
    elif header is not None:
        assert response.headers[header]
    # nothing changed, and a good request still works
    assert api.store().get_certificate(names["serial"]).status == "valid"
    assert api.get(f"/api/v1/devices/{names['device']}")["current_serial"] == names["serial"]


def test_errors_outside_the_api_stay_text(api):
    response = api.call("GET", "/.well-known/est/nosuch")
    assert response.status_code == 404 and response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_a_fault_is_a_json_500_with_a_request_id_and_no_trace(api, monkeypatch, caplog):
    from est_app.store.reports import Reports

    def broken(self, *args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(Reports, "statistics", broken)
    body = assert_error(api.call("GET", "/api/v1/statistics"), 500, "request id")
    assert "secret internals" not in body["error"] and "Traceback" not in body["error"]
    request_id = body["error"].split("request id ")[1].split(")")[0]
    assert any(request_id in r.getMessage() for r in caplog.records)


def test_rate_limit_is_a_json_429_with_retry_after(make_api):
    api = make_api(rate_limit={"enabled": True, "limit": "3 per minute"})
    statuses = [api.call("GET", "/api/v1/statistics").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    response = api.call("GET", "/api/v1/statistics")
    assert_error(response, 429, "too many requests")
    assert 1 <= int(response.headers["Retry-After"]) <= 61


# --- 6. device-supplied text goes out as JSON strings ---------------------------------------

HOSTILE = ["<script>alert(1)</script>", '"quoted", \\back\\slash & <b>', "pompe-ünï-€", "</script><img src=x onerror=alert(1)>"]


@pytest.mark.parametrize("cn", HOSTILE)
def test_device_text_round_trips_as_a_json_string(api, cn):
    cert = enroll(api.client, cn)
    listing = api.call("GET", "/api/v1/devices")
    raw = listing.get_data(as_text=True)
    assert listing.headers["Content-Type"] == JSON
    assert "<" not in raw and ">" not in raw  # escaped as \u003c / \u003e, so no byte of it reads as markup
    (item,) = decoded(listing)["items"]
    assert item["name"] == cn
    shown = api.get(f"/api/v1/devices/{item['number']}")
    assert shown["certificates"][0]["common_name"] == cn
    assert shown["certificates"][0]["subject"] == cert.subject.rfc4514_string()
    assert shown["events"][0]["device_name"] == cn
    found = api.get("/api/v1/certificates", query_string={"search": cn})["items"]
    assert [c["serial"] for c in found] == [serial_of(cert)]


def test_digits_are_a_device_number_and_never_fall_back_to_a_name(make_api):
    """A retried delete of a number that is gone must not reach another pump named like that number."""
    api = make_api()
    enroll(api.client, "NPPONE1")
    (first,) = api.store().find_devices()
    enroll(api.client, str(first.id))  # a pump whose name is the first one's number
    numbered = next(d for d in api.store().find_devices() if d.device_key == str(first.id))
    assert api.get(f"/api/v1/devices/{first.id}")["name"] == "NPPONE1"
    assert api.call("DELETE", f"/api/v1/devices/{first.id}").status_code == 204
    assert_error(api.call("DELETE", f"/api/v1/devices/{first.id}"), 404, f"no device number {first.id}")
    assert api.store().get_device(numbered.id) is not None
    assert api.get(f"/api/v1/devices/{first.id}", query_string={"label": "default"})["number"] == numbered.id
