"""The enrollment service on its own: no Flask app, no request, no app context; a real SQLite
store and the real development CA of ``pki_dir``.

The only doubles here stand in for events the service must survive, never for the CA or
the store: a serial source that repeats a serial already stored (the collision), and an
operator deleting the device while the CA signs (the race the store's own check closes).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID
from flask import has_app_context

from est_app.ca import load_authorities
from est_app.enrollment import EnrollmentService, Requester
from est_app.errors import BadRequest, Conflict, Forbidden
from est_app.profiles import build_profiles
from est_app.store import Store

from .pki import make_csr, rsa_key

GATEWAY = Requester("user:gateway", "192.0.2.7", "request-1")


@pytest.fixture
def make_service(make_settings):
    """``make_service(**overrides)``: the service over a fresh database, with what it reported as issued."""

    def build(**overrides) -> SimpleNamespace:
        settings = make_settings(**overrides)
        store = Store(settings.database.url)
        store.create_schema()
        issued = []
        service = EnrollmentService(
            store, load_authorities(settings), build_profiles(settings), issued=lambda operation, label: issued.append((operation, label))
        )
        ca = x509.load_pem_x509_certificate(settings.ca.cert_file.read_bytes())
        return SimpleNamespace(service=service, store=store, issued=issued, ca=ca, profiles=service.profiles)

    return build


@pytest.fixture
def env(make_service):
    return make_service()


def serial(certificate: x509.Certificate) -> str:
    return format(certificate.serial_number, "x")


def device_requester(certificate: x509.Certificate) -> Requester:
    return Requester(f"device:{serial(certificate)}", "192.0.2.8")


def test_enroll_commits_certificate_device_and_audit_row(env):
    assert not has_app_context()
    certificate = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)

    certificate.verify_directly_issued_by(env.ca)  # the real CA signed it
    record = env.store.get_certificate(serial(certificate))
    assert (record.status, record.label, record.requester, record.operation) == ("valid", "default", "user:gateway", "simpleenroll")
    assert x509.load_der_x509_certificate(record.der) == certificate
    (device,) = env.store.find_devices()
    assert (device.device_key, device.current_serial, device.client_address) == ("NPPBBB4", serial(certificate), "192.0.2.7")
    (event,) = env.store.audit_events()
    assert (event.event, event.outcome, event.actor, event.client_address, event.label, event.device, event.serial) == (
        "enroll", "ok", "user:gateway", "192.0.2.7", "default", "NPPBBB4", serial(certificate)
    )
    assert env.issued == [("simpleenroll", "default")]


def test_reenroll_supersedes_the_presented_certificate(env):
    key = ec.generate_private_key(ec.SECP256R1())
    old = env.service.enroll(make_csr("NPPBBB4", key=key), env.profiles[None], GATEWAY)
    assert env.service.reenrollment_profile(old) is env.profiles[None]

    new = env.service.reenroll(make_csr("NPPBBB4", key=ec.generate_private_key(ec.SECP256R1())), old, device_requester(old))

    new.verify_directly_issued_by(env.ca)
    assert new.subject == old.subject and new.serial_number != old.serial_number
    assert env.store.get_certificate(serial(old)).status == "superseded"
    assert env.store.get_certificate(serial(new)).operation == "simplereenroll"
    (device,) = env.store.find_devices()
    assert (device.current_serial, device.requester, device.client_address) == (serial(new), f"device:{serial(old)}", "192.0.2.8")
    event = env.store.audit_events()[-1]
    assert (event.event, event.actor, event.serial, event.detail) == ("reenroll", f"device:{serial(old)}", serial(new), f"supersedes {serial(old)}")
    assert env.issued == [("simpleenroll", "default"), ("simplereenroll", "default")]


def test_reenrollment_follows_the_label_the_certificate_was_issued_on(make_service):
    env = make_service(labels={"pumps": {"cert_validity_days": 7}})
    old = env.service.enroll(make_csr("NPPBBB4"), env.profiles["pumps"], GATEWAY)
    new = env.service.reenroll(make_csr("NPPBBB4"), old, device_requester(old))
    assert env.store.get_certificate(serial(new)).label == "pumps"
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days == 7  # 7 days and the 5 minutes' backdating
    assert env.issued[-1] == ("simplereenroll", "pumps")


def test_duplicate_policy_renew_supersedes_the_previous_certificate(env):
    first = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    second = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    assert env.store.get_certificate(serial(first)).status == "superseded"
    (device,) = env.store.find_devices()
    assert device.current_serial == serial(second)
    assert [e.event for e in env.store.audit_events()] == ["enroll", "enroll"]


def test_duplicate_policy_reject_refuses_and_records_nothing(make_service):
    env = make_service(duplicate_policy="reject")
    first = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    with pytest.raises(Conflict) as refused:
        env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    (device,) = env.store.find_devices()
    assert refused.value.status == 409
    assert f"device 'NPPBBB4' (number {device.id}) is already enrolled on label 'default'" in refused.value.message
    assert f"est-admin device delete {device.id}" in refused.value.message
    assert env.store.count_certificates() == 1 and device.current_serial == serial(first)
    assert len(env.store.audit_events()) == 1 and env.issued == [("simpleenroll", "default")]


def test_a_device_enrolled_on_another_label_is_refused(make_service):
    env = make_service(labels={"wards": {}})
    env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    with pytest.raises(Conflict) as refused:
        env.service.enroll(make_csr("NPPBBB4"), env.profiles["wards"], GATEWAY)
    assert "is enrolled on label 'default'" in refused.value.message and "a device has one label" in refused.value.message
    assert env.store.count_certificates() == 1 and [d.label for d in env.store.find_devices()] == ["default"]


def test_a_serial_collision_draws_another_serial(env, monkeypatch):
    taken = env.service.enroll(make_csr("NPPAAA1"), env.profiles[None], GATEWAY)
    draws = []
    real = x509.random_serial_number

    def repeat_once() -> int:  # the CA's serial source, repeating a stored serial the first time
        draws.append(taken.serial_number if not draws else real())
        return draws[-1]

    monkeypatch.setattr(x509, "random_serial_number", repeat_once)
    certificate = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)

    assert len(draws) == 2 and draws[0] == taken.serial_number  # the CA signed twice
    assert certificate.serial_number == draws[1] != taken.serial_number
    assert env.store.get_certificate(serial(taken)).common_name == "NPPAAA1"  # the first holder keeps its serial
    assert env.store.get_certificate(serial(certificate)).common_name == "NPPBBB4"
    assert [(e.device, e.serial) for e in env.store.audit_events()] == [("NPPAAA1", serial(taken)), ("NPPBBB4", serial(certificate))]
    assert env.issued == [("simpleenroll", "default")] * 2


def test_a_serial_source_that_always_collides_is_a_fault_not_an_endless_loop(env, monkeypatch):
    taken = env.service.enroll(make_csr("NPPAAA1"), env.profiles[None], GATEWAY)
    monkeypatch.setattr(x509, "random_serial_number", lambda: taken.serial_number)
    with pytest.raises(RuntimeError, match="serials in a row that are taken"):
        env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    assert env.store.count_certificates() == 1 and [d.device_key for d in env.store.find_devices()] == ["NPPAAA1"]


@pytest.mark.parametrize("how", ["superseded", "revoked"])
def test_a_certificate_no_longer_current_cannot_reenroll(env, how):
    old = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    if how == "superseded":
        env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    else:
        env.store.revoke(serial(old), "keyCompromise")
    with pytest.raises(Forbidden) as refused:
        env.service.reenroll(make_csr("NPPBBB4"), old, device_requester(old))
    assert refused.value.message == f"certificate {serial(old)} is {how}; re-enroll with the device's current certificate"
    assert env.store.count_certificates() == (2 if how == "superseded" else 1)


def test_an_orphaned_certificate_cannot_reenroll(env):
    old = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    (device,) = env.store.find_devices()
    env.store.delete_device(device.id)  # --keep-certificate: it stays valid, with no device
    with pytest.raises(Forbidden, match="belongs to no device"):
        env.service.reenroll(make_csr("NPPBBB4"), old, device_requester(old))
    assert env.store.count_certificates() == 1 and env.store.find_devices() == []


def test_a_device_deleted_while_the_ca_signs_is_refused_under_the_write_lock(env, monkeypatch):
    old = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    (device,) = env.store.find_devices()
    authority = env.service.authorities.default
    sign = authority.issue

    def operator_deletes_meanwhile(*args, **kwargs):
        env.store.delete_device(device.id)
        return sign(*args, **kwargs)

    monkeypatch.setattr(authority, "issue", operator_deletes_meanwhile)
    with pytest.raises(Forbidden) as refused:
        env.service.reenroll(make_csr("NPPBBB4"), old, device_requester(old))
    assert "belongs to no device" in refused.value.message
    assert env.store.count_certificates() == 1 and env.store.get_certificate(serial(old)).status == "valid"
    assert len(env.issued) == 1


def test_a_certificate_outside_the_records_cannot_reenroll(make_service, tmp_path):
    other = make_service()  # the same CA, but this store never recorded it
    stranger = other.service.enroll(make_csr("NPPBBB4"), other.profiles[None], GATEWAY)
    env = make_service(database={"url": f"sqlite:///{tmp_path / 'other.db'}"})
    with pytest.raises(Forbidden, match="outside this server's records"):
        env.service.reenroll(make_csr("NPPBBB4"), stranger, device_requester(stranger))


def test_reenrollment_keeps_subject_and_names(env):
    old = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    with pytest.raises(Forbidden, match="CSR subject 'CN=NPPCCC7' differs"):
        env.service.reenroll(make_csr("NPPCCC7"), old, device_requester(old))
    assert env.store.count_certificates() == 1 and env.store.get_certificate(serial(old)).status == "valid"


def test_a_csr_the_labels_policy_refuses_costs_nothing(make_service):
    env = make_service(labels={"pumps": {"subject_cn_pattern": "NPP[A-Z0-9]{4}"}})
    with pytest.raises(BadRequest, match="does not match this label's pattern"):
        env.service.enroll(make_csr("WARD-7"), env.profiles["pumps"], GATEWAY)
    with pytest.raises(BadRequest, match="'NPPBBB4' is reserved to label 'pumps'"):
        env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    with pytest.raises(BadRequest, match="commonName"):
        env.service.enroll(make_csr(None), env.profiles[None], GATEWAY)
    assert env.store.count_certificates() == 0 and env.store.audit_events() == [] and env.issued == []


def test_bootstrap_is_short_lived_client_auth_and_refuses_a_known_device(make_service):
    env = make_service(labels={"pumps": {"extended_key_usage": ["clientAuth", "serverAuth"]}})
    certificate = env.service.bootstrap(make_csr("NPPBBB4"), env.profiles["pumps"], GATEWAY, validity_days=30)
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime.days == 30
    assert list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert env.store.get_certificate(serial(certificate)).operation == "bootstrap"
    assert env.store.audit_events()[-1].event == "bootstrap"
    with pytest.raises(Conflict, match="already enrolled"):
        env.service.bootstrap(make_csr("NPPBBB4"), env.profiles["pumps"], GATEWAY, validity_days=30)
    assert env.issued == [("bootstrap", "pumps")]


def test_serverkeygen_returns_the_key_its_certificate_certifies(env):
    key, certificate = env.service.serverkeygen(make_csr("NPPBBB4", key=rsa_key(2048)), env.profiles[None], GATEWAY)
    assert certificate.public_key() == key.public_key() and key.key_size == 2048
    assert env.store.get_certificate(serial(certificate)).operation == "serverkeygen"
    assert env.store.audit_events()[-1].event == "keygen"
    with pytest.raises(BadRequest, match="serverkeygen key type ec-p384 is not allowed here"):
        env.service.serverkeygen(make_csr("NPPCCC7", key=ec.generate_private_key(ec.SECP384R1())), env.profiles[None], GATEWAY)
    assert env.store.count_certificates() == 1


def test_certs_only_is_the_labels_answer(make_service):
    env = make_service(labels={"chained": {"include_chain": True}})
    plain = env.service.enroll(make_csr("NPPBBB4"), env.profiles[None], GATEWAY)
    chained = env.service.enroll(make_csr("NPPCCC7"), env.profiles["chained"], GATEWAY)
    assert pkcs7.load_der_pkcs7_certificates(env.service.certs_only(plain, env.profiles[None])) == [plain]
    # certificates is a SET OF: DER orders it by encoding, not leaf first
    assert set(pkcs7.load_der_pkcs7_certificates(env.service.certs_only(chained, env.profiles["chained"]))) == {chained, env.ca}
