"""End to end with the CA key in SoftHSM: enrollment, re-enrollment and serverkeygen over the real server.

The tests of tests/test_e2e_ra.py that enroll (Basic and RA certificate), re-enroll over mutual TLS
(curl and strongSwan ``pki``) and generate keys on the server run here once more, unchanged, on a
``pki_dir`` whose CA key was generated inside a SoftHSM token by `est-admin init --pkcs11-module
... --token ...` (tests/softhsm.py). Then the token disappears while the server runs: enrollment
answers 503 with Retry-After and every worker's /readyz fails naming the token, until it returns.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import pytest

from .conftest import PASSWORD, USER, run_cli, turn_off_retries
from .e2e_clients import openssl_csr
from .server import RunningServer, start_server
from .softhsm import softhsm, token_pki_dir
from .test_e2e_ra import (  # noqa: F401  (fixtures and tests, collected again here with the key in the token)
    AUTH,
    client_certs,
    enroll,
    server,
    servers,
    test_curl_reenrolls_over_mutual_tls,
    test_ra_enrolls_a_pump_with_its_client_certificate,
    test_serverkeygen_returns_a_pkcs8_key_and_its_certificate,
    test_strongswan_reenrolls_over_mutual_tls,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def token_pki(tmp_path_factory) -> tuple:
    return token_pki_dir(tmp_path_factory.mktemp("hsm-pki"))


@pytest.fixture(scope="module")
def pki_dir(token_pki):
    """`est init`'s folder with the CA key in a SoftHSM token, for every test of this module."""
    turn_off_retries(token_pki[0] / "config.yaml")
    return token_pki[0]


def readyz(server: RunningServer) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    try:
        with urllib.request.urlopen(f"{server.url}/readyz", context=context, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_token_loss_is_503_and_not_ready_until_it_returns(token_pki, tmp_path):
    pki_dir, label = token_pki
    server = start_server(
        pki_dir, tmp_path, server={"workers": 2}, database={"url": f"sqlite:///{tmp_path / 'est.db'}"}, rate_limit={"enabled": False},
    )
    try:
        assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config).exit_code == 0
        assert enroll(server, openssl_csr("ec", "NPPHSM1"), *AUTH).status == 200
        # Fresh connections spread over both workers: every one of them must notice.
        assert {readyz(server) for _ in range(6)} == {(200, "ready\n")}

        with softhsm().token_away(label):
            for n in range(4):
                reply = enroll(server, openssl_csr("ec", f"NPPHSM2{n}"), *AUTH)
                assert reply.status == 503, reply.body
                assert reply.headers["Retry-After"] == "30"
                assert reply.body == f"the CA key's token '{label}' is unavailable; try again later\n".encode()
            for _ in range(6):
                status, body = readyz(server)
                assert status == 503 and f"ca key is in token '{label}', which is unavailable" in body, body
            assert server.alive()

        # Back: the workers re-open their sessions by themselves, no restart.
        for n in range(4):
            assert enroll(server, openssl_csr("ec", f"NPPHSM3{n}"), *AUTH).status == 200
        assert {readyz(server) for _ in range(6)} == {(200, "ready\n")}
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()
