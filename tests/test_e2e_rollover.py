"""End to end, CA rollover: the real server (gunicorn, TLS on loopback), `est-admin ca rollover`, curl, openssl, strongSwan pki, FreeRADIUS.

A copy of `est init`'s PKI serves; pumps enroll from its CA with curl; the server stops,
`est-admin ca rollover` rewrites its configuration, and the server starts again on it. Then,
in both response formats (der, and base64 on one line, which strongSwan reads):

- curl reads the four-certificate cacerts (new CA, old CA, both links), and so does `pki --estca`
  in base64 (strongSwan 5.9.8 reads no der cacerts at all, rolled over or not);
- `openssl verify` accepts an old-CA and a new-CA pump with cacerts' two roots as anchors and its
  links as untrusted path-builders, and reaches across the links from either root alone;
- an old-CA pump re-enrolls with curl --cert and gets a new-CA certificate.

Where FreeRADIUS 3 and eapol_test are installed: FreeRADIUS holds both CAs and both CRLs (the
refresh script of docs/REVOCATION.md, run once per CA as docs/CA_ROLLOVER.md says), and accepts
a pump of each CA while refusing a revoked pump of each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from .conftest import PASSWORD, USER, run_cli
from .e2e_clients import call, openssl, pki, pkcs7_certs, run
from .pki import pem
from .server import RunningServer, start_server
from .test_e2e_revocation import AUTH, PKCS10, FreeRADIUS, enroll_pump, needs_freeradius, openssl_serial

pytestmark = [pytest.mark.e2e]

FORMATS = {"der": {"response_format": "der"}, "base64": {"response_format": "base64", "base64_line_length": 0}}


class Rollover:
    """A server after a rollover, and the pumps its old CA issued before it."""

    def __init__(self, pki_dir: Path, workdir: Path, database: dict, fmt: str) -> None:
        self.pki_dir = workdir / "pki"
        shutil.copytree(pki_dir, self.pki_dir)
        self.workdir, self.database, self.fmt = workdir, database, fmt
        section = yaml.safe_load((pki_dir / "config.yaml").read_text())["ca"]
        ca = {"cert_file": str(self.pki_dir / "ca.pem")}
        if "key" in section:  # in a token (tests/test_hsm_e2e_rollover.py): its URI, module and PIN file as they are
            ca.update({name: section[name] for name in ("key", "pkcs11_module", "pin_file")})
        else:
            ca["key_file"] = str(self.pki_dir / "ca.key")
        server = self.start(ca)
        try:
            assert run_cli("user", "add", USER, input=PASSWORD + "\n", config=server.config).exit_code == 0
            self.old_pumps = [enroll_pump(server, workdir, name)[:2] for name in ("NPPROLD1", "NPPROLD2")]
        finally:
            server.stop()
        result = run_cli("ca", "rollover", config=server.config)
        assert result.exit_code == 0, result.output
        rolled = yaml.safe_load(server.config.read_text())["ca"]
        self.server = self.start(rolled)  # relative paths: the new config is written in the same folder
        self.old_ca = x509.load_pem_x509_certificate((self.pki_dir / "ca.pem").read_bytes())
        self.new_ca_file = server.config.parent / rolled["cert_file"]  # ca-2.pem, or ca-3.pem where the token holds issuing-ca-2 already
        self.links_file = server.config.parent / rolled["link_certificates_file"]
        self.new_ca = x509.load_pem_x509_certificate(self.new_ca_file.read_bytes())

    def start(self, ca: dict) -> RunningServer:
        return start_server(
            self.pki_dir, self.workdir, database=self.database, rate_limit={"enabled": False}, ca=ca, **FORMATS[self.fmt]
        )

    def cacerts(self) -> list[x509.Certificate]:
        reply = call(self.server, "cacerts")
        assert reply.status == 200, reply.body
        body = reply.body if self.fmt == "der" else openssl("base64", "-d", "-A", input=reply.body)
        return pkcs7_certs(body)


@pytest.fixture(scope="module")
def rollovers(pki_dir, tmp_path_factory, new_database):
    made: dict[str, Rollover] = {}

    def get(fmt: str) -> Rollover:
        if fmt not in made:
            workdir = tmp_path_factory.mktemp(f"rollover-{fmt}")
            made[fmt] = Rollover(pki_dir, workdir, new_database(workdir), fmt)
        return made[fmt]

    yield get
    for rollover in made.values():
        rollover.server.stop()


@pytest.fixture(params=list(FORMATS))
def rollover(request, rollovers) -> Rollover:
    return rollovers(request.param)


def test_cacerts_holds_both_cas_and_links_and_verifies_old_and_new_pumps(rollover, tmp_path):
    certificates = rollover.cacerts()
    links = x509.load_pem_x509_certificates(rollover.links_file.read_bytes())
    assert len(certificates) == 4 and set(certificates) == {rollover.old_ca, rollover.new_ca, *links}
    # As a relying party should use them: the self-signed roots are the anchors, the links only build paths.
    # (All four as anchors can send OpenSSL 3.0 round the two links until "certificate chain too long".)
    roots, links = tmp_path / "roots.pem", tmp_path / "links.pem"
    roots.write_bytes(b"".join(pem(c) for c in certificates if _self_signed(c)))
    links.write_bytes(b"".join(pem(c) for c in certificates if not _self_signed(c)))
    assert roots.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    new_pump = enroll_pump(rollover.server, tmp_path, "NPPRNEW1")[0]
    old_pump = rollover.old_pumps[0][0]
    for cert in (old_pump, new_pump):
        assert openssl("verify", "-CAfile", roots, "-untrusted", links, cert).strip().endswith(b": OK")
    # A relying party still trusting only the old root reaches a new pump through NewWithOld, and
    # one trusting only the new root reaches an old pump through OldWithNew.
    old_root, new_root = tmp_path / "old-root.pem", tmp_path / "new-root.pem"
    old_root.write_bytes(pem(rollover.old_ca))
    new_root.write_bytes(pem(rollover.new_ca))
    assert run("openssl", "verify", "-CAfile", old_root, new_pump, check=False).returncode != 0
    assert openssl("verify", "-CAfile", old_root, "-untrusted", links, new_pump).strip().endswith(b": OK")
    assert run("openssl", "verify", "-CAfile", new_root, old_pump, check=False).returncode != 0
    assert openssl("verify", "-CAfile", new_root, "-untrusted", links, old_pump).strip().endswith(b": OK")


def _self_signed(certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(certificate)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def test_strongswan_reads_the_four_certificate_cacerts(rollovers, tmp_path):
    """pki 5.9.8 decodes only one-line base64 (DESIGN.md), a single CA's der cacerts included: base64 only."""
    rollover = rollovers("base64")
    caout = tmp_path / "cacert.pem"
    pki("--estca", "--url", rollover.server.url, "--cacert", rollover.server.ca_file, "--caout", caout, "--outform", "pem")
    written = [x509.load_pem_x509_certificates(p.read_bytes()) for p in sorted(tmp_path.glob("cacert*.pem"))]
    found = {c for group in written for c in group}
    assert {rollover.new_ca, rollover.old_ca} <= found, [p.name for p in tmp_path.iterdir()]


def test_an_old_ca_pump_reenrolls_into_a_new_ca_certificate(rollover, tmp_path):
    cert, key = rollover.old_pumps[0]
    csr = tmp_path / "renew.csr"
    openssl("req", "-new", "-key", key, "-subj", "/CN=NPPROLD1", "-outform", "DER", "-out", csr)
    reply = call(rollover.server, "simplereenroll", "--cert", str(cert), "--key", str(key), *PKCS10, body=csr.read_bytes())
    assert reply.status == 200, reply.body
    body = reply.body if rollover.fmt == "der" else openssl("base64", "-d", "-A", input=reply.body)
    (renewed,) = pkcs7_certs(body)
    renewed.verify_directly_issued_by(rollover.new_ca)


class RolledOverFreeRADIUS(FreeRADIUS):
    """FreeRADIUS as docs/CA_ROLLOVER.md sets it up: both CAs in its CA directory, each CA's CRL by the refresh script."""

    def __init__(self, workdir: Path, rollover: Rollover) -> None:
        self.rollover = rollover
        super().__init__(workdir, rollover.server, rollover.pki_dir)

    def refresh_crl(self) -> None:
        shutil.copy(self.rollover.new_ca_file, self.ca_dir / "est-ca-2.pem")
        status = run_cli("ca", "status", "--json", config=self.server.config)
        issuers = {s["role"]: s["issuer_id"] for s in map(yaml.safe_load, status.output.splitlines())}
        fetches = [
            {"EST_CRL_URL": f"{self.server.url}/crl/issuer/{issuers['retired']}.pem"},
            {
                "EST_CRL_URL": f"{self.server.url}/crl/issuer/{issuers['issuing']}.pem",
                "EST_CA_FILE": str(self.ca_dir / "est-ca-2.pem"),
                "EST_CRL_FILE": str(self.ca_dir / "est-2.crl.pem"),
            },
        ]
        for extra in fetches:
            env = {**os.environ, "EST_CA_DIR": str(self.ca_dir), **extra}
            result = subprocess.run([str(self.refresh_script)], env=env, capture_output=True, timeout=60)
            assert result.returncode == 0, result.stderr.decode()


@needs_freeradius
def test_freeradius_accepts_a_pump_of_each_ca_and_refuses_a_revoked_one_of_each(rollovers, tmp_path):
    rollover = rollovers("der")
    server = rollover.server
    (old_good, old_good_key), (old_stolen, old_stolen_key) = rollover.old_pumps
    new_good, new_good_key, _ = enroll_pump(server, tmp_path, "NPPRNEWOK")
    new_stolen, new_stolen_key, _ = enroll_pump(server, tmp_path, "NPPRNEWST")
    for stolen in (old_stolen, new_stolen):
        result = run_cli("cert", "revoke", openssl_serial(stolen), "--reason", "keyCompromise", config=server.config)
        assert result.exit_code == 0, result.output

    radius = RolledOverFreeRADIUS(tmp_path, rollover)
    try:
        assert radius.login(old_good, old_good_key, server.ca_file), radius.log.read_text()[-3000:]
        assert radius.login(new_good, new_good_key, server.ca_file), radius.log.read_text()[-3000:]
        assert not radius.login(old_stolen, old_stolen_key, server.ca_file)
        assert not radius.login(new_stolen, new_stolen_key, server.ca_file)
        assert radius.log.read_text().count("OpenSSL says error 23 : certificate revoked") >= 2
    finally:
        radius.stop()
