"""Issue 9: a lost response never strands a device.

The same requester sending the same CSR again within ``retry_window_minutes`` gets the
certificate already issued (audited ``retry``, not counted as issued); a re-enrollment retried
with the certificate it superseded gets the replacement. Anything else keeps today's answers.
The service on its own (no Flask) and on both databases with identical requests at once, the EST
views through the test client, and the real server with a client that drops the connection.
"""

from __future__ import annotations

import socket
import ssl
import time
from datetime import timedelta

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from est_app.ca import load_authorities
from est_app.config import LabelSettings, load_config
from est_app.enrollment import EnrollmentService, Requester
from est_app.errors import Conflict, Forbidden
from est_app.profiles import build_profiles
from est_app.store import Store, utcnow
from est_app.store.schema import certificates

from .conftest import PASSWORD, USER, basic_auth, open_store, run_cli
from .e2e_clients import call, openssl_verify, pkcs7_certs
from .pki import der, make_csr
from .server import start_server
from .test_enrollment_service import GATEWAY, device_requester, env, make_service, serial  # noqa: F401 (fixtures)
from .test_metrics import ISSUED, delta, scrape
from .test_protocol import SAN_POLICY, device_csr, issued, post, refused
from .test_races import at_once


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


KEY = new_key()
WINDOW = {"retry_window_minutes": 60}  # the deployment default; the suite's base configuration turns it off


@pytest.fixture
def config_data(config_data):
    """conftest's, with the retry window at its deployment default."""
    return lambda **overrides: config_data(**{**WINDOW, **overrides})


def events(store: Store) -> list[tuple[str, str]]:
    return [(e.event, e.serial) for e in store.audit_events()]


def age(store: Store, certificate: x509.Certificate, minutes: int) -> None:
    """Make the record of ``certificate`` say it was issued ``minutes`` ago."""
    with store.engine.begin() as conn:
        conn.execute(certificates.update().where(certificates.c.serial == serial(certificate)).values(issued_at=utcnow() - timedelta(minutes=minutes)))


# --- the service, no Flask ------------------------------------------------------------


def test_the_window_is_an_hour_unless_configured(config_data, tmp_path):
    data = config_data(labels={"pumps": {"retry_window_minutes": 5}})
    del data["retry_window_minutes"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    profiles = build_profiles(load_config(tmp_path / "config.yaml"))
    assert (profiles[None].retry_window, profiles["pumps"].retry_window) == (timedelta(minutes=60), timedelta(minutes=5))
    with pytest.raises(ValueError, match="retry_window_minutes may not be negative"):
        LabelSettings(retry_window_minutes=-1)


@pytest.mark.parametrize("policy", ["renew", "reject"])
def test_the_same_csr_again_gets_the_certificate_already_issued(make_service, policy):
    env = make_service(duplicate_policy=policy)
    csr = make_csr("NPPBBB4", key=new_key())
    first = env.service.enroll(csr, env.profiles[None], GATEWAY)
    again = env.service.enroll(csr, env.profiles[None], Requester("user:gateway", "192.0.2.9", "request-2"))
    assert again == first
    (device,) = env.store.find_devices()
    assert env.store.count_certificates() == 1 and device.current_serial == serial(first)
    assert env.store.get_certificate(serial(first)).status == "valid"
    assert events(env.store) == [("enroll", serial(first)), ("retry", serial(first))]
    retry = env.store.audit_events()[-1]
    assert (retry.actor, retry.client_address, retry.device, retry.label) == ("user:gateway", "192.0.2.9", "NPPBBB4", "default")
    assert env.issued == [("simpleenroll", "default")]  # a retry is no new certificate


def test_a_retry_on_a_label_follows_the_labels_window(make_service):
    env = make_service(retry_window_minutes=0, labels={"pumps": {"retry_window_minutes": 5}})
    csr = make_csr("NPPBBB4", key=new_key())
    first = env.service.enroll(csr, env.profiles["pumps"], GATEWAY)
    assert env.service.enroll(csr, env.profiles["pumps"], GATEWAY) == first
    age(env.store, first, 6)
    assert env.service.enroll(csr, env.profiles["pumps"], GATEWAY) != first
    assert env.store.count_certificates() == 2


@pytest.mark.parametrize("policy", ["renew", "reject"])
def test_outside_the_window_the_answers_are_todays(make_service, policy):
    env = make_service(duplicate_policy=policy)
    csr = make_csr("NPPBBB4", key=new_key())
    first = env.service.enroll(csr, env.profiles[None], GATEWAY)
    age(env.store, first, 61)
    if policy == "reject":
        with pytest.raises(Conflict):
            env.service.enroll(csr, env.profiles[None], GATEWAY)
    else:
        second = env.service.enroll(csr, env.profiles[None], GATEWAY)
        assert second != first and env.store.get_certificate(serial(first)).status == "superseded"
    assert "retry" not in [event for event, _ in events(env.store)]


def test_a_window_of_zero_answers_every_request_as_new(make_service):
    env = make_service(retry_window_minutes=0)
    csr = make_csr("NPPBBB4", key=new_key())
    first = env.service.enroll(csr, env.profiles[None], GATEWAY)
    assert env.service.enroll(csr, env.profiles[None], GATEWAY) != first
    assert env.store.count_certificates() == 2


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda: (make_csr("NPPBBB4", key=new_key()), GATEWAY), id="another key"),
        pytest.param(lambda: (make_csr("NPPBBB4", key=KEY), Requester("ra:0123abcd")), id="another requester"),
        pytest.param(
            lambda: (make_csr(None, key=KEY, name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "NPPBBB4"),
                                                              x509.NameAttribute(NameOID.SERIAL_NUMBER, "42")])), GATEWAY),
            id="another subject",
        ),
    ],
)
def test_anything_but_the_same_request_gets_todays_answers(make_service, change):
    env = make_service(duplicate_policy="reject")
    first = env.service.enroll(make_csr("NPPBBB4", key=KEY), env.profiles[None], GATEWAY)
    csr, requester = change()
    with pytest.raises(Conflict):
        env.service.enroll(csr, env.profiles[None], requester)
    assert env.store.count_certificates() == 1 and events(env.store) == [("enroll", serial(first))]


def test_another_operation_is_no_retry(make_service):
    """A bootstrap certificate (clientAuth, short-lived) never answers a simpleenroll of the same CSR."""
    env = make_service(bootstrap_enabled=True, duplicate_policy="renew")
    csr = make_csr("NPPBBB4", key=new_key())
    bootstrap = env.service.bootstrap(csr, env.profiles[None], GATEWAY, 1)
    enrolled = env.service.enroll(csr, env.profiles[None], GATEWAY)
    assert enrolled != bootstrap and env.store.get_certificate(serial(bootstrap)).status == "superseded"
    assert env.service.bootstrap(csr, env.profiles[None], GATEWAY, 1) != bootstrap  # renew: the device's current is the enrolled one


def test_serverkeygen_always_issues_a_new_key(make_service):
    env = make_service()
    csr = make_csr("NPPBBB4", key=new_key())
    first_key, first = env.service.serverkeygen(csr, env.profiles[None], GATEWAY)
    second_key, second = env.service.serverkeygen(csr, env.profiles[None], GATEWAY)
    assert second != first and env.store.count_certificates() == 2


def test_a_reenrollment_retried_with_the_superseded_certificate_gets_its_replacement(make_service):
    env = make_service()
    old = env.service.enroll(make_csr("NPPBBB4", key=new_key()), env.profiles[None], GATEWAY)
    csr = make_csr("NPPBBB4", key=new_key())
    new = env.service.reenroll(csr, old, device_requester(old))
    assert env.service.reenroll(csr, old, device_requester(old)) == new
    assert env.store.count_certificates() == 2
    assert [c.status for c in env.store.device_certificates(env.store.find_devices()[0].id)] == ["superseded", "valid"]
    assert events(env.store)[-2:] == [("reenroll", serial(new)), ("retry", serial(new))]
    assert env.issued == [("simpleenroll", "default"), ("simplereenroll", "default")]

    with pytest.raises(Forbidden, match=f"certificate {serial(old)} is superseded"):
        env.service.reenroll(make_csr("NPPBBB4", key=new_key()), old, device_requester(old))  # another key: today's answer
    age(env.store, new, 61)
    with pytest.raises(Forbidden, match=f"certificate {serial(old)} is superseded"):
        env.service.reenrollment_profile(old)
    with pytest.raises(Forbidden, match="is superseded"):
        env.service.reenroll(csr, old, device_requester(old))


def test_a_certificate_superseded_twice_gets_nothing(make_service):
    """Only the certificate a re-enrollment superseded directly may ask again, and only for its direct successor."""
    env = make_service()
    oldest = env.service.enroll(make_csr("NPPBBB4", key=new_key()), env.profiles[None], GATEWAY)
    csr = make_csr("NPPBBB4", key=new_key())
    middle = env.service.reenroll(csr, oldest, device_requester(oldest))
    env.service.reenroll(make_csr("NPPBBB4", key=new_key()), middle, device_requester(middle))
    with pytest.raises(Forbidden, match="is superseded"):
        env.service.reenroll(csr, oldest, device_requester(oldest))


@pytest.mark.both_databases
@pytest.mark.parametrize("policy", ["renew", "reject"])
@pytest.mark.parametrize("operation", ["enroll", "reenroll"])
def test_identical_requests_at_once_issue_once(make_settings, policy, operation):
    """Eight copies of one request, each through its own service and store (as workers or hosts), released together."""
    settings = make_settings(duplicate_policy=policy)
    setup = Store(settings.database.url, settings.database)
    setup.create_schema()
    authorities, profiles = load_authorities(settings), build_profiles(settings)

    def service(store: Store) -> EnrollmentService:
        return EnrollmentService(store, authorities, profiles)

    csr = make_csr("NPPBBB4", key=new_key())
    if operation == "enroll":
        jobs = [lambda store: service(store).enroll(csr, profiles[None], GATEWAY)] * 8
    else:
        old = service(setup).enroll(make_csr("NPPBBB4", key=new_key()), profiles[None], GATEWAY)
        jobs = [lambda store: service(store).reenroll(csr, old, device_requester(old))] * 8
    results = at_once(lambda: Store(settings.database.url, settings.database), jobs)

    assert all(isinstance(r, x509.Certificate) for r in results), results
    assert len(set(results)) == 1
    (device,) = setup.find_devices()
    valid = [c.serial for c in setup.device_certificates(device.id) if c.status == "valid"]
    assert valid == [device.current_serial] == [serial(results[0])]
    assert setup.count_certificates() == (1 if operation == "enroll" else 2)
    trail = [event for event, _ in events(setup)]
    assert (trail.count("retry"), trail.count("reenroll" if operation == "reenroll" else "enroll")) == (7, 1)


# --- the EST views -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["renew", "reject"])
def test_simpleenroll_sent_again_answers_the_same_certificate(make_app, policy):
    app = make_app(**SAN_POLICY, duplicate_policy=policy)
    client = app.test_client()
    csr = device_csr(new_key())
    first = issued(post(client, "simpleenroll", csr, basic=True))
    before = scrape(client)
    assert issued(post(client, "simpleenroll", csr, basic=True)) == first
    after = scrape(client)
    assert delta(before, after, ISSUED, operation="simpleenroll", label="default") == 0
    assert delta(before, after, "est_enrollment_retries_total", operation="simpleenroll", label="default") == 1
    another_key = post(client, "simpleenroll", device_csr(new_key()), basic=True)
    if policy == "reject":
        refused(another_key, 409, "already enrolled")
    else:
        assert issued(another_key) != first


def test_simplereenroll_retried_with_the_old_certificate(make_app):
    client = make_app(**SAN_POLICY).test_client()
    old = issued(post(client, "simpleenroll", device_csr(new_key()), basic=True))
    csr = device_csr(new_key())
    new = issued(post(client, "simplereenroll", csr, cert=old))
    assert issued(post(client, "simplereenroll", csr, cert=old)) == new
    refused(post(client, "simplereenroll", device_csr(new_key()), cert=old), 403, f"certificate {serial(old)} is superseded")


# --- the real server: the client drops the connection after the server committed -----


def send_and_close(server, path: str, body: bytes) -> None:
    """POST over TLS with a raw socket and close without reading a byte of the answer."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    request = (
        f"POST /.well-known/est/{path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: {basic_auth()['Authorization']}\r\nContent-Type: application/pkcs10\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)


def wait_for_certificate(store: Store, device_key: str, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        devices = [d for d in store.find_devices(search=device_key) if d.device_key == device_key]
        if devices:
            return devices[0].current_serial
        time.sleep(0.2)
    raise AssertionError(f"no certificate recorded for {device_key} within {seconds} s")


@pytest.mark.e2e
@pytest.mark.both_databases
@pytest.mark.parametrize("policy", ["renew", "reject"])
def test_a_dropped_response_then_a_retry_over_gunicorn(pki_dir, tmp_path, new_database, policy):
    server = start_server(pki_dir, tmp_path, database=new_database(tmp_path), rate_limit={"enabled": False},
                          response_format="der", duplicate_policy=policy, **WINDOW)
    try:
        assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config).exit_code == 0
        store = open_store(server.config)
        body = der(make_csr("NPPDROP1", key=new_key()))
        send_and_close(server, "simpleenroll", body)
        committed = wait_for_certificate(store, "NPPDROP1")

        reply = call(server, "simpleenroll", "--user", f"{USER}:{PASSWORD}", "--header", "Content-Type: application/pkcs10", body=body)
        assert reply.status == 200, reply.body
        (certificate,) = pkcs7_certs(reply.body)
        assert serial(certificate) == committed
        assert openssl_verify(certificate, server.ca_file).strip().endswith(b"OK")
        assert store.count_certificates() == 1 and store.get_certificate(committed).status == "valid"
        assert [(e.event, e.serial) for e in store.audit_events() if e.event in ("enroll", "retry")] == [("enroll", committed), ("retry", committed)]
        store.engine.dispose()
    finally:
        server.stop()
