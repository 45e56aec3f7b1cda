"""Manual approval end to end: gunicorn with two workers over TLS, curl and a gateway's retry loop, base64 and DER labels."""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from .conftest import PASSWORD, USER, run_cli
from .e2e_clients import call, enroll_with_retries, pkcs7_certs
from .pki import der, make_csr
from .server import start_server
from .test_e2e import AUTH, PKCS10, issued, payload

pytestmark = pytest.mark.e2e

LABELS = {"b64": "base64", "pumps": "der"}  # label -> its response format
DEADLINE = 120  # seconds for a retry loop: far beyond a loaded machine's slowest answer


@pytest.fixture(scope="module")
def server(pki_dir, tmp_path_factory, new_database):
    workdir = tmp_path_factory.mktemp("approval")
    running = start_server(
        pki_dir, workdir, database=new_database(workdir), rate_limit={"enabled": False}, server={"workers": 2},
        approval={"mode": "manual", "retry_after_seconds": 1},
        labels={label: {"response_format": fmt} for label, fmt in LABELS.items()},
    )
    assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=running.config).exit_code == 0
    yield running
    running.stop()


def request_id(server, device: str) -> int:
    """The pending request's id, as an operator reads it from `est-admin request list`."""
    listed = run_cli("request", "list", "--json", config=server.config)
    assert listed.exit_code == 0, listed.output
    ids = [r["id"] for r in map(json.loads, listed.output.splitlines()) if r["device"] == device]
    assert len(ids) == 1, listed.output
    return ids[0]


def fresh_csr(cn: str) -> bytes:
    return der(make_csr(cn, key=ec.generate_private_key(ec.SECP256R1())))


@pytest.mark.parametrize("label", LABELS)
def test_curl_waits_202_then_collects_after_approval(server, label):
    fmt, device, csr = LABELS[label], f"NPPCURL-{label}", fresh_csr(f"NPPCURL-{label}")
    for _ in range(3):  # several tries, whichever worker answers: the same request, still waiting
        waiting = call(server, f"{label}/simpleenroll", *AUTH, *PKCS10, body=csr)
        assert waiting.status == 202, waiting.body
        assert waiting.headers["Retry-After"] == "1"
        assert waiting.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert not waiting.has("Content-Transfer-Encoding")
        assert b"waiting for an operator" in waiting.body
    assert run_cli("request", "approve", str(request_id(server, device)), config=server.config).exit_code == 0
    certificate = issued(call(server, f"{label}/simpleenroll", *AUTH, *PKCS10, body=csr), fmt, server.ca_file)
    assert certificate.public_key() == x509.load_der_x509_csr(csr).public_key()


@pytest.mark.parametrize("label", LABELS)
def test_a_gateways_retry_loop_gets_its_certificate_once_an_operator_approves(server, label):
    fmt, device, csr = LABELS[label], f"NPPLOOP-{label}", fresh_csr(f"NPPLOOP-{label}")
    seen, approvals = [], []

    def operator(reply) -> None:  # an operator approves while the gateway waits, after its second 202
        seen.append(reply)
        if len(seen) == 2:
            approvals.append(run_cli("request", "approve", str(request_id(server, device)), config=server.config))

    reply, waits = enroll_with_retries(server, f"{label}/simpleenroll", csr, (USER, PASSWORD), DEADLINE, operator)
    assert [a.exit_code for a in approvals] == [0] and len(waits) == 2
    assert all(w.headers["Retry-After"] == "1" for w in waits)
    (certificate,) = pkcs7_certs(payload(reply, fmt))
    assert certificate.public_key() == x509.load_der_x509_csr(csr).public_key()


def test_a_rejected_gateway_is_told_the_reason(server):
    csr = fresh_csr("NPPNOPE")
    assert call(server, "b64/simpleenroll", *AUTH, *PKCS10, body=csr).status == 202
    rejected = run_cli("request", "reject", str(request_id(server, "NPPNOPE")), "--reason", "not a pump of ours", config=server.config)
    assert rejected.exit_code == 0, rejected.output
    refused = call(server, "b64/simpleenroll", *AUTH, *PKCS10, body=csr)
    assert refused.status == 403 and b"not a pump of ours" in refused.body


def test_serverkeygen_key_is_made_when_collected(server):
    csr = fresh_csr("NPPKEYGEN")
    assert call(server, "pumps/serverkeygen", *AUTH, *PKCS10, body=csr).status == 202
    assert run_cli("request", "approve", str(request_id(server, "NPPKEYGEN")), config=server.config).exit_code == 0
    reply = call(server, "pumps/serverkeygen", *AUTH, *PKCS10, body=csr)
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("multipart/mixed")
    assert reply.headers["Cache-Control"] == "no-store"
    assert b"application/pkcs8" in reply.body

