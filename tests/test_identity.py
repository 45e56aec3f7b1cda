"""Issue 7, one identity one owner, and deleting a device: through the Flask test client, the
CLI and the store, and the review's attack once more end to end over real TLS.

The attack: label ``pumps`` takes RA certificates only and ``subject_cn_pattern``
``NPP[A-Z0-9]{4}``; a password user posts ``CN=NPPAAA1`` to the unlabelled path (or any
other label) and used to get a certificate from the same CA with the same EKU as the
RA-issued pump certificate. Deleting a device used to leave its certificate valid, and
that certificate could re-enroll forever with no device to show for it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from est_app.store import AuditEvent, Orphaned
from est_app.store.schema import devices

from .conftest import PASSWORD, USER, run_cli
from .e2e_clients import call, openssl_csr, pkcs7_certs
from .pki import der, make_csr
from .server import start_server
from .test_name_policy import subject_csr
from .test_protocol import ca, cli, client_certs, foreign_ca, register_ra  # noqa: F401  (fixtures)
from .test_protocol import issued, post, refused, serial, store

pytestmark = pytest.mark.both_databases  # the store's part (one owner, deleting) on SQLite and PostgreSQL

PUMP_PATTERN = "NPP[A-Z0-9]{4}"
ATTACK_LABELS = {"pumps": {"auth": ["cert"], "subject_cn_pattern": PUMP_PATTERN}, "wards": {}}
RESERVED = "CSR commonName 'NPPAAA1' is reserved to label 'pumps' (it matches that label's subject_cn_pattern)"


def crl(client) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(client.get("/crl").get_data())


# --- one identity, one owner ----------------------------------------------------------


@pytest.mark.parametrize("op", ["simpleenroll", "serverkeygen", "bootstrap"])
@pytest.mark.parametrize("label", [None, "wards"], ids=["unlabelled path", "another label"])
def test_a_password_cannot_buy_a_pump_identity(make_app, register_ra, client_certs, op, label):
    app = make_app(labels=ATTACK_LABELS, bootstrap_enabled=True)
    client = app.test_client()
    register_ra(client_certs["ra"], "pumps")
    pump = issued(post(client, "simpleenroll", make_csr("NPPAAA1"), label="pumps", cert=client_certs["ra"]))

    refused(post(client, op, make_csr("NPPAAA1"), label=label, basic=True), 400, RESERVED, "/.well-known/est/pumps/")
    # reserved by the pattern, whether or not that pump is enrolled yet
    refused(post(client, op, make_csr("NPPZZZ9"), label=label, basic=True), 400, "'NPPZZZ9' is reserved to label 'pumps'")
    s = store(app)
    assert [c.serial for d in s.find_devices() for c in s.device_certificates(d.id)] == [serial(pump)]
    (event,) = [e for e in s.audit_events() if e.outcome == "refused" and "NPPAAA1" in e.detail]
    assert (event.actor, event.label) == (f"user:{USER}", label or "default")

    # names the pattern does not match in full stay free
    issued(post(client, "simpleenroll", make_csr("XNPPAAA1"), label=label, basic=True))


@pytest.mark.parametrize("cn", ["nppaaa1", "NppAaa1", "\uff2e\uff30\uff30AAA1"], ids=["lower case", "mixed case", "fullwidth letters"])
def test_a_reserved_name_is_reserved_in_any_case_or_compatibility_form(make_app, cn):
    client = make_app(labels=ATTACK_LABELS).test_client()
    refused(post(client, "simpleenroll", make_csr(cn), basic=True), 400, "is reserved to label 'pumps'")


@pytest.mark.parametrize("cn", [" NPPAAA1", "NPPAAA1 "], ids=["leading space", "trailing space"])
def test_a_name_with_leading_or_trailing_spaces_is_refused(make_app, cn):
    client = make_app(labels=ATTACK_LABELS).test_client()
    refused(post(client, "simpleenroll", make_csr(cn), basic=True), 400, "commonName", "has leading or trailing spaces")


def test_a_device_has_one_label(make_app, cli):
    app = make_app(labels={"pumps": {}, "wards": {}})
    client = app.test_client()
    first = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="pumps", basic=True))
    (device,) = store(app).find_devices()
    for label in ("wards", None):
        refused(
            post(client, "simpleenroll", make_csr("NPPBBB4"), label=label, basic=True), 409,
            f"device 'NPPBBB4' is enrolled on label 'pumps' (number {device.id})", f"`est-admin device delete {device.id}`",
        )
    assert store(app).count_certificates() == 1
    issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="pumps", basic=True))  # its own label renews

    # moving it: delete (revokes), then enroll on the new label
    cli("device", "delete", str(device.id))
    moved = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="wards", basic=True))
    (now,) = store(app).find_devices()
    assert (now.label, now.current_serial) == ("wards", serial(moved))
    assert store(app).get_certificate(serial(first)).status == "revoked"  # a superseded certificate goes with its device


def test_overlapping_patterns_share_names_but_a_device_still_has_one_label(make_app):
    app = make_app(labels={"pumps": {"subject_cn_pattern": PUMP_PATTERN}, "pumps-b64": {"subject_cn_pattern": "NPP.*", "response_format": "base64"}})
    client = app.test_client()
    issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="pumps-b64", basic=True))
    refused(post(client, "simpleenroll", make_csr("NPPBBB4"), label="pumps", basic=True), 409, "enrolled on label 'pumps-b64'")
    issued(post(client, "simpleenroll", make_csr("NPPCCC7"), label="pumps", basic=True))
    refused(post(client, "simpleenroll", make_csr("NPPLONGER"), label="pumps", basic=True), 400, "does not match this label's pattern")
    refused(post(client, "simpleenroll", make_csr("NPPLONGER"), basic=True), 400, "is reserved to label 'pumps-b64'")


def test_devices_recorded_on_two_labels_before_the_rule_keep_renewing(make_app):
    app = make_app(labels={"pumps": {}, "wards": {}})
    client = app.test_client()
    issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label="pumps", basic=True))
    (pump,) = store(app).find_devices()
    with store(app).engine.begin() as conn:  # as an older version could leave it
        values = {k: getattr(pump, k) for k in ("device_key", "first_enrolled", "last_enrolled", "current_serial", "requester", "client_address")}
        conn.execute(devices.insert().values(label="wards", **values))
    for label in ("pumps", "wards"):
        issued(post(client, "simpleenroll", make_csr("NPPBBB4"), label=label, basic=True))
    refused(post(client, "simpleenroll", make_csr("NPPBBB4"), basic=True), 409, "is enrolled on label 'pumps'")


# --- deleting a device ------------------------------------------------------------------


def test_store_deletes_and_revokes_in_one_transaction(make_app):
    app = make_app()
    client = app.test_client()
    cert = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), basic=True))
    s = store(app)
    (device,) = s.find_devices()
    audit = AuditEvent("device-delete", actor="cli:test", device="NPPBBB4", detail="gone")
    deleted = s.delete_device(device.id, audit, "cessationOfOperation")
    assert deleted == device
    record = s.get_certificate(serial(cert))
    assert (record.status, record.revocation_reason, record.device_id) == ("revoked", "cessationOfOperation", None)
    assert [(e.event, e.serial, e.detail) for e in s.audit_events()][-2:] == [
        ("revoke", serial(cert), "cessationOfOperation"), ("device-delete", serial(cert), "gone")]
    assert s.delete_device(device.id, audit, "cessationOfOperation") is None


@pytest.mark.parametrize("keep", [False, True], ids=["revokes", "--keep-certificate"])
def test_cli_device_delete(make_app, cli, keep):
    app = make_app()
    client = app.test_client()
    older = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), basic=True))
    cert = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), basic=True))  # renews: the older one is superseded
    (device,) = store(app).find_devices()
    output = cli("device", "delete", str(device.id), *(["--keep-certificate"] if keep else []))
    if keep:
        assert f"its certificate {serial(cert)} stays valid (--keep-certificate)" in output
    else:
        assert f"revoked (cessationOfOperation): {serial(older)}, {serial(cert)}; CRL re-signed" in output
    listed = crl(client)  # no wait for the half-life
    entry = listed.get_revoked_certificate_by_serial_number(cert.serial_number)
    # A superseded certificate still opens the network until it expires: deleting the device revokes it too.
    assert (listed.get_revoked_certificate_by_serial_number(older.serial_number) is None) == keep
    if keep:
        assert entry is None and store(app).get_certificate(serial(cert)).status == "valid"
    else:
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.cessation_of_operation
    assert [e.event for e in store(app).audit_events()][-2:] == (["enroll", "device-delete"] if keep else ["revoke", "device-delete"])


@pytest.mark.parametrize("keep", [False, True], ids=["deleted (revoked)", "deleted with --keep-certificate"])
def test_a_certificate_without_a_device_cannot_reenroll(make_app, cli, keep):
    app = make_app()
    client = app.test_client()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issued(post(client, "simpleenroll", make_csr("NPPBBB4", key=key), basic=True))
    issued(post(client, "simplereenroll", make_csr("NPPBBB4", key=key), cert=cert))  # works while the device exists
    s = store(app)
    (device,) = s.find_devices()
    current = s.get_device(device.id).current_serial
    presented = x509.load_der_x509_certificate(s.get_certificate(current).der)
    cli("device", "delete", str(device.id), *(["--keep-certificate"] if keep else []))

    response = post(client, "simplereenroll", make_csr("NPPBBB4", key=key), cert=presented)
    if keep:
        refused(response, 403, f"certificate {current} belongs to no device (the device was deleted)")
        (event,) = [e for e in s.audit_events() if e.event == "reenroll" and e.outcome == "refused"]
        assert event.actor == f"device:{current}" and "belongs to no device" in event.detail
    else:
        assert response.status_code in (401, 403) and "revoked" in response.get_data(as_text=True)
    assert s.find_devices() == [] and s.count_certificates() == 2


def test_the_write_lock_check_refuses_an_orphan_too(make_app):
    """The view's check spares a signature; the store's, under the write lock, is the one that holds."""
    app = make_app()
    client = app.test_client()
    cert = issued(post(client, "simpleenroll", make_csr("NPPBBB4"), basic=True))
    s = store(app)
    with s.engine.begin() as conn:
        conn.execute(sa.text("UPDATE certificates SET device_id = NULL"))
    record = s.get_certificate(serial(cert))
    with pytest.raises(Orphaned):
        s.replace_certificate(serial(cert), replace(record, serial="abc"), "127.0.0.1")
    assert s.get_certificate("abc") is None


# --- the attack end to end --------------------------------------------------------------


@pytest.mark.e2e
def test_the_attack_over_real_tls(pki_dir, tmp_path):
    """est-server with the IQE-style labels; curl as the password user on the unlabelled path."""
    server = start_server(
        pki_dir, tmp_path, database={"url": f"sqlite:///{tmp_path / 'est.db'}"}, rate_limit={"enabled": False}, response_format="der",
        labels={"pumps": {"auth": ["cert"], "subject_cn_pattern": PUMP_PATTERN}},
    )
    try:
        assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config).exit_code == 0
        auth = ("--user", f"{USER}:{PASSWORD}", "--header", "Content-Type: application/pkcs10")
        for body, phrase in [
            (openssl_csr("ec", "NPPAAA1"), RESERVED),
            (der(subject_csr((NameOID.COMMON_NAME, "GWNUL1\x00.evil.example"))), "contains the control or formatting character U+0000"),
        ]:
            reply = call(server, "simpleenroll", *auth, body=body)
            assert reply.status == 400 and reply.headers["Content-Type"] == "text/plain; charset=utf-8", reply
            assert reply.body.decode().count("\n") == 1 and phrase in reply.body.decode(), reply.body
        refused_on_pumps = call(server, "pumps/simpleenroll", *auth, body=openssl_csr("ec", "NPPAAA1"))
        assert refused_on_pumps.status == 403 and b"does not accept passwords" in refused_on_pumps.body
        # the server carries on, and a gateway's own name still enrolls there
        reply = call(server, "simpleenroll", *auth, body=openssl_csr("ec", "GW-17"))
        assert reply.status == 200, reply.body
        (cert,) = pkcs7_certs(reply.body)
        assert cert.subject.rfc4514_string() == "CN=GW-17"
        assert server.alive()
    finally:
        server.stop()
