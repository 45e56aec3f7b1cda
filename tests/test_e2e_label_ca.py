"""End to end, a label with its own CA: the real server (gunicorn, TLS on loopback), curl, openssl and the CLI.

Label ``pumps`` issues from the pump CA (``pump_ca_dir``), the top-level CA from `est init`'s.
Its certificates name the server's own ``/crl/pumps`` and ``/ocsp``. As FreeRADIUS on the
pump SSID would see it: the chain from ``cacerts`` on the label verifies a pump certificate
and the top-level CA does not; after `est-admin cert revoke`, `openssl verify -crl_check` with
the pump CA's CRL (from the certificate's distribution point) refuses it while the top-level
CRL does not list it; `openssl ocsp` against /ocsp answers for the pump CA, signed by it, and
says ``unknown`` under the top-level CA and ``unauthorized`` under a CA it does not run; re-enrollment over mutual TLS
with a pump certificate works (gunicorn's TLS layer trusts the pump CA too).
"""

from __future__ import annotations

import dataclasses

import pytest

from est_app.ca.development import create_root_ca, write_certificate

from . import server as server_module
from .conftest import PASSWORD, USER, run_cli
from .e2e_clients import call, curl, openssl, pkcs7_certs, run
from .pki import pem
from .server import RunningServer, free_port, start_server
from .test_e2e_revocation import (
    PKCS10, crl_url_of, enroll_pump, get, ocsp_status, ocsp_url_of, openssl_serial, serial_hex, verify_with_crl,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(pki_dir, pump_ca_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("label-ca")
    port = free_port()  # known before start, so the URLs in the certificates can name it
    url = f"https://127.0.0.1:{port}"
    pump_ca = {
        "cert_file": str(pump_ca_dir / "pump-ca.pem"),
        "key_file": str(pump_ca_dir / "pump-ca.key"),
        "crl_url": f"{url}/crl/pumps",
        "ocsp_url": f"{url}/ocsp",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_module, "free_port", lambda: port)
        running = start_server(
            pki_dir,
            workdir,
            database={"url": f"sqlite:///{workdir / 'est.db'}"},
            rate_limit={"enabled": False},
            ca={"crl_url": f"{url}/crl", "ocsp_url": f"{url}/ocsp"},
            labels={"pumps": {"ca": pump_ca}},
        )
    result = run_cli("user", "add", USER, input=PASSWORD + "\n", config=running.config)
    assert result.exit_code == 0, result.output
    yield running
    running.stop()


def test_pump_certificates_chain_revoke_and_answer_ocsp_only_under_the_pump_ca(server: RunningServer, pump_ca_dir, tmp_path):
    # cacerts on the label: the pump CA (a root of its own), as openssl reads it.
    reply = call(server, "pumps/cacerts")
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/pkcs7-mime"
    chain = pkcs7_certs(openssl("base64", "-d", input=reply.body))
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=est_app test pump CA"]
    pump_chain = tmp_path / "pump-chain.pem"
    pump_chain.write_bytes(openssl("pkcs7", "-inform", "DER", "-print_certs", input=openssl("base64", "-d", input=reply.body)))
    # The relying party's view: the pump chain from cacerts stands where the top-level CA stood.
    pumps_view = dataclasses.replace(server, ca_file=pump_chain)

    good, good_key, good_csr = enroll_pump(server, tmp_path, "NPPLCA1", "pumps/simpleenroll")
    stolen, _, _ = enroll_pump(server, tmp_path, "NPPLCA2", "pumps/simpleenroll")
    assert crl_url_of(stolen) == f"{server.url}/crl/pumps" and ocsp_url_of(stolen) == f"{server.url}/ocsp"

    # openssl verifies a pump certificate against the pump chain, and not against the top-level CA.
    assert openssl("verify", "-CAfile", pump_chain, good).strip() == f"{good}: OK".encode()
    result = run("openssl", "verify", "-CAfile", server.ca_file, good, check=False)
    assert result.returncode != 0 and b"unable to get local issuer certificate" in result.stdout + result.stderr

    # The operator revokes the stolen pump by the serial openssl printed.
    result = run_cli("cert", "revoke", openssl_serial(stolen), "--reason", "keyCompromise", config=server.config)
    assert result.exit_code == 0, result.output

    # The pump CA's CRL, from the distribution point in the certificate: signed by the pump CA, listing the stolen pump.
    der_reply = curl(crl_url_of(stolen), server.ca_file)
    assert der_reply.status == 200 and der_reply.headers["Content-Type"] == "application/pkix-crl"
    crl = tmp_path / "pumps.crl.pem"
    crl.write_bytes(get(server, "/crl/pumps.pem").body)
    assert openssl("crl", "-in", crl, "-outform", "DER") == der_reply.body
    check = run("openssl", "crl", "-in", crl, "-noout", "-CAfile", pump_chain)
    assert b"verify OK" in check.stderr, check.stderr
    result = verify_with_crl(pumps_view, crl, stolen)
    assert result.returncode != 0
    assert b"error 23 at 0 depth lookup: certificate revoked" in result.stdout + result.stderr, result.stdout + result.stderr
    result = verify_with_crl(pumps_view, crl, good)
    assert result.returncode == 0 and result.stdout.strip() == f"{good}: OK".encode(), result.stdout + result.stderr
    # The top-level CA's CRL does not list it.
    top = openssl("crl", "-inform", "DER", "-noout", "-text", input=get(server, "/crl").body).decode()
    assert "Issuer: CN = est_app development CA" in top and serial_hex(stolen).upper() not in top.replace(":", "").upper()

    # OCSP at the address in the certificate answers for the pump CA, signed by it.
    report = ocsp_status(pumps_view, stolen, "-url", ocsp_url_of(stolen))
    assert report.startswith(f"{stolen}: revoked\n") and "Reason: keyCompromise" in report
    assert ocsp_status(pumps_view, good, "-url", ocsp_url_of(good)).startswith(f"{good}: good\n")
    # Asked under the top-level CA's name and key: that CA did not issue it, so "unknown" ...
    ask = ("-serial", f"0x{serial_hex(good)}", "-url", f"{server.url}/ocsp", "-CAfile", server.ca_file)
    result = run("openssl", "ocsp", "-issuer", server.ca_file, *ask)
    assert result.stdout.startswith(f"0x{serial_hex(good)}: unknown\n".encode()) and b"Response verify OK" in result.stderr
    # ... and under a CA this server does not run, the responder is not authorised to answer.
    _, foreign = create_root_ca("Some other hospital CA")
    write_certificate(tmp_path / "foreign.pem", foreign)
    result = run("openssl", "ocsp", "-issuer", tmp_path / "foreign.pem", *ask, check=False)
    assert b"Responder Error: unauthorized (6)" in result.stdout + result.stderr, result.stdout + result.stderr

    # The good pump re-enrolls over mutual TLS with its pump certificate and gets another from the pump CA.
    reply = call(server, "simplereenroll", "--cert", str(good), "--key", str(good_key), *PKCS10, body=good_csr.read_bytes())
    assert reply.status == 200, reply.body
    (renewed,) = pkcs7_certs(openssl("base64", "-d", input=reply.body))
    renewed_pem = tmp_path / "renewed.pem"
    renewed_pem.write_bytes(pem(renewed))
    assert openssl("verify", "-CAfile", pump_chain, renewed_pem).strip() == f"{renewed_pem}: OK".encode()
