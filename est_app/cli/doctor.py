"""``est doctor``: why a gateway or a pump cannot enroll, one finding per line.

From the inside: the configuration, file modes and owners, the CA and TLS
certificates (validity, remaining lifetime, the names clients dial), the
database (reachable, schema of this version, who may enroll) and the CRL. From
the outside: a real TLS connection to the bind address and each label's
``cacerts`` read the way each known client reads it. Enrollment answers are
not requested (nothing is enrolled): they are rendered by the server's own
code from the label's settings, for a stand-in pump certificate signed by a
throwaway key of the CA's type, and read the same way. ``--request FILE``
explains a request body captured from a gateway with the server's own
decoder and CSR checks, and gives the label's verdict.

Each finding prints as ``OK|WARN|FAIL subject: what — what to do``. The exit
status is 1 when any finding is FAIL; WARN alone exits 0. The CA key is
decrypted only to check that it matches the CA certificate, and only when it
needs no passphrase or the passphrase is at hand.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import pwd
import re
import ssl
import stat
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import click
import yaml
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..ca import CertificateAuthority, check_policy, load_csr
from ..ca.authority import _chain_to_root, _load_certificates, _load_private_key
from ..ca.csr import ATTRIBUTE_NAMES
from ..config import DEFAULT_LABEL, ConfigError, Settings, parse_config
from ..encoding import CERTS_ONLY, CTE, ESTResponse, decode_body
from ..errors import BadRequest, ESTError
from ..profiles import EnrollmentProfile, build_profiles
from ..store import Store
from ..store.schema import metadata
from . import est

WARN_DAYS = 30
# libest and `openssl base64 -d` read base64 through OpenSSL's BIO filter, which drops
# longer lines (measured with OpenSSL 3.0: 1,023 characters pass, 1,024 do not).
MAX_LINE = 1000
CLIENTS = {
    "strongswan": "strongSwan pki",
    "libest": "libest estclient",
    "globalsign": "GlobalSign estclient",
    "openssl": "openssl base64 -d",
    "der": "a gateway set to DER",
}
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
TIMEOUT = 10


@dataclass(frozen=True)
class Finding:
    level: str  # OK | WARN | FAIL
    subject: str
    what: str
    todo: str = ""

    def line(self) -> str:
        return f"{self.level:<4} {self.subject}: {self.what}" + (f" — {self.todo}" if self.todo else "")


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def ok(self, subject: str, what: str, todo: str = "") -> None:
        self.findings.append(Finding("OK", subject, what, todo))

    def warn(self, subject: str, what: str, todo: str = "") -> None:
        self.findings.append(Finding("WARN", subject, what, todo))

    def fail(self, subject: str, what: str, todo: str = "") -> None:
        self.findings.append(Finding("FAIL", subject, what, todo))

    @property
    def failed(self) -> bool:
        return any(f.level == "FAIL" for f in self.findings)


@est.command("doctor", with_appcontext=False)
@click.option("--label", "label_name", help="Check only this label ('default': the unlabelled path).")
@click.option("--host", "hosts", multiple=True, help="A name or address gateways dial; the TLS certificate must hold it. Repeat for several.")
@click.option("--client", "clients", multiple=True, type=click.Choice(sorted(CLIENTS)), help="A client that must read the answers: FAIL where it cannot. Repeat for several.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="The root clients trust for the server's TLS certificate (default: the CA chain).")
@click.option("--request", "request_file", type=click.Path(dir_okay=False, path_type=Path), help="Explain this captured request body instead, and give the label's verdict.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.pass_context
def doctor_command(
    ctx: click.Context,
    label_name: str | None,
    hosts: tuple[str, ...],
    clients: tuple[str, ...],
    tls_ca: Path | None,
    request_file: Path | None,
    as_json: bool,
) -> None:
    """Check this deployment and say, one line per finding, what to do.

    Run it as the service user (runuser -u est --), like every est-admin command.
    Exit status 1 when anything is FAIL; WARN alone exits 0.
    """
    report = Report()
    settings, credential = _check_config(report, _config_path(ctx))
    if settings is not None:
        profiles = build_profiles(settings)
        wanted = None if label_name in (None, DEFAULT_LABEL) else label_name
        if wanted not in profiles:
            report.fail(f"label {label_name}", "not in the configuration", f"labels: {', '.join(p.name for p in profiles.values())}")
        elif request_file is not None:
            _check_request(report, settings, profiles[wanted], request_file)
        else:
            selected = [profiles[wanted]] if label_name else list(profiles.values())
            _check_deployment(report, settings, credential, selected, hosts, clients, tls_ca)
    if as_json:
        click.echo(json.dumps({"failed": report.failed, "findings": [asdict(f) for f in report.findings]}, indent=2))
    else:
        for finding in report.findings:
            click.echo(finding.line())
    ctx.exit(1 if report.failed else 0)


def _config_path(ctx: click.Context) -> Path:
    from .. import CONFIG_ENV, instance_path  # the package imports this module first

    explicit = ctx.parent.params.get("config") if ctx.parent else None
    if explicit:
        return Path(explicit)
    return Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else instance_path() / "config.yaml"


# --- inside: configuration and files -----------------------------------------------------------


def _check_config(report: Report, path: Path) -> tuple[Optional[Settings], Optional[str]]:
    """The settings (None when unusable), and the systemd credential left out because it is absent."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        report.fail("config", f"cannot read {path}: {exc.strerror}", "pass --config FILE or set EST_CONFIG")
        return None, None
    except yaml.YAMLError as exc:
        report.fail("config", f"{path} is not valid YAML: {_one_line(str(exc))}", "fix the line it names")
        return None, None
    _check_file(report, "config", path, secret=False)
    ca = data.get("ca") if isinstance(data, dict) else None
    credential = ca.get("key_passphrase_file") if isinstance(ca, dict) else None
    if isinstance(credential, str) and credential.startswith("/run/credentials/") and not Path(credential).exists():
        # systemd's LoadCredential= file exists only while the service runs: check the rest.
        data = {**data, "ca": {k: v for k, v in ca.items() if k != "key_passphrase_file"}}
    else:
        credential = None
    try:
        settings = parse_config(data, base_dir=path.resolve().parent, source=str(path))
    except ConfigError as exc:
        todo = "fix the key it names; est-server refuses to start with this same line"
        if re.search(r"[\w.]*(passphrase|password|secret)[\w.]*: unknown key", str(exc), re.I):
            todo = "secrets never go in the YAML: name them with ca.key_passphrase_env or ca.key_passphrase_file"
        report.fail("config", str(exc), todo)
        return None, None
    report.ok("config", f"{path} is valid")
    return settings, credential


def _check_file(report: Report, subject: str, path: Path, secret: bool = True) -> bool:
    """Mode, owner and readability; True when this user can read it."""
    try:
        st = path.stat()
    except OSError as exc:
        report.fail(subject, f"{path}: {exc.strerror}", "create it, or fix the path in the configuration")
        return False
    mode, me = stat.S_IMODE(st.st_mode), pwd.getpwuid(os.geteuid()).pw_name
    if secret and mode & 0o004:
        report.fail(subject, f"{path} is readable by every user (mode {mode:04o})", f"chmod 600 {path}")
    elif secret and mode & 0o040:
        report.warn(subject, f"{path} is readable by its group (mode {mode:04o})", f"chmod 600 {path}")
    elif mode & 0o022 and not secret:
        report.fail(subject, f"{path} is writable by others (mode {mode:04o})", f"chmod go-w {path}")
    if secret and st.st_uid != os.geteuid():
        report.warn(subject, f"{path} is owned by uid {st.st_uid}, not by {me} who runs doctor", f"chown {me} {path}, or run doctor as the service user")
    if not os.access(path, os.R_OK):
        report.fail(subject, f"{path} cannot be read by {me}", "run doctor as the service user; the service needs to read it")
        return False
    return True


def _check_lifetime(report: Report, subject: str, certificate: x509.Certificate, renew: str) -> bool:
    """Validity now and remaining lifetime; True while valid."""
    now = datetime.now(timezone.utc)
    name = _shown(certificate.subject.rfc4514_string())
    end = certificate.not_valid_after_utc
    if now < certificate.not_valid_before_utc:
        report.fail(subject, f"{name} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC", "check the server clock, or reissue it")
        return False
    if now > end:
        report.fail(subject, f"{name} expired on {end:%Y-%m-%d}", renew)
        return False
    days = (end - now).days
    if days < WARN_DAYS:
        report.warn(subject, f"{name} expires in {days} days ({end:%Y-%m-%d})", renew)
    else:
        report.ok(subject, f"{name} valid until {end:%Y-%m-%d} ({days} days)")
    return True


def _check_ca(report: Report, settings: Settings, credential: Optional[str]) -> tuple[x509.Certificate, ...]:
    ca = settings.ca
    try:
        chain = _chain_to_root(_load_certificates(ca.cert_file, "ca.cert_file")[0], _load_certificates(ca.chain_file, "ca.chain_file") if ca.chain_file else [])
    except ConfigError as exc:
        report.fail("ca", str(exc), "fix ca.cert_file / ca.chain_file")
        return ()
    try:
        is_ca = chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        report.fail("ca", f"{ca.cert_file} is not a CA certificate (basicConstraints CA:TRUE missing)", "point ca.cert_file at the issuing CA")
    renew = "renew the CA and re-enroll every device before then (pumps and FreeRADIUS trust the old one until then)"
    if _check_lifetime(report, "ca", chain[0], renew):
        left = (chain[0].not_valid_after_utc - datetime.now(timezone.utc)).days
        if left < ca.cert_validity_days:
            report.warn("ca", f"issued certificates end with the CA in {left} days, before cert_validity_days ({ca.cert_validity_days})", renew)
    for issuer in chain[1:]:
        _check_lifetime(report, "ca chain", issuer, "renew it, and ca.chain_file with it")
    if _check_file(report, "ca key", ca.key_file):
        _check_ca_key(report, settings, chain[0], credential)
    if ca.key_passphrase_file:
        _check_file(report, "ca key passphrase", ca.key_passphrase_file)
    return chain


def _check_ca_key(report: Report, settings: Settings, certificate: x509.Certificate, credential: Optional[str]) -> None:
    ca = settings.ca
    encrypted = b"ENCRYPTED" in ca.key_file.read_bytes()
    if not encrypted:
        report.warn("ca key", f"{ca.key_file} is not encrypted", "encrypt it and give the passphrase as a systemd credential (DEPLOYMENT.md 3b)")
    elif credential:
        report.warn("ca key", f"not checked against the CA certificate: {credential} exists only while est.service runs", "run doctor while est.service runs")
        return
    elif ca.key_passphrase_env and ca.key_passphrase_env not in os.environ:
        report.warn("ca key", f"not checked against the CA certificate: {ca.key_passphrase_env} is not set here", f"export {ca.key_passphrase_env} to check it")
        return
    elif not (ca.key_passphrase_env or ca.key_passphrase_file):
        report.fail("ca key", f"{ca.key_file} is encrypted and no passphrase is configured", "set ca.key_passphrase_file (a systemd credential) or ca.key_passphrase_env")
        return
    try:
        key = _load_private_key(ca)
    except ConfigError as exc:
        report.fail("ca key", str(exc), "give the right passphrase, or the key that belongs to ca.cert_file")
        return
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        report.fail("ca key", f"{ca.key_file} does not belong to {ca.cert_file}", "configure the matching pair; est-server refuses to start")
    else:
        report.ok("ca key", f"{ca.key_file} matches the CA certificate")


def _check_tls(report: Report, settings: Settings, hosts: tuple[str, ...]) -> Optional[x509.Certificate]:
    tls = settings.tls
    if tls.cert_file is None:
        report.warn("tls", "no tls.cert_file: the server speaks plain HTTP", "configure tls.cert_file and tls.key_file unless a TLS proxy stands in front")
        return None
    try:
        certificate = _load_certificates(tls.cert_file, "tls.cert_file")[0]
    except ConfigError as exc:
        report.fail("tls", str(exc), "configure a PEM certificate")
        return None
    _check_lifetime(report, "tls", certificate, "renew the TLS certificate and restart est")
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            report.fail("tls", "the certificate lacks EKU serverAuth: clients refuse it", "reissue it as a TLS server certificate")
    except x509.ExtensionNotFound:
        pass
    dns, ips = _san(certificate)
    names = ", ".join([*dns, *map(str, ips)]) or "none"
    bind_host = _bind(settings.server.bind)[0] if _bind(settings.server.bind) else None
    dialled = list(hosts)
    if bind_host and not _wildcard(bind_host):
        dialled.insert(0, bind_host)
    elif not hosts:
        report.warn("tls", f"bind {settings.server.bind} listens on every address: which names gateways dial is unknown", "pass --host NAME (repeat) to check the certificate's names")
    for host in dict.fromkeys(dialled):
        if _names_host(host, dns, ips):
            report.ok("tls", f"the certificate names {host}")
        else:
            report.fail(
                "tls", f"the certificate does not name {host} (its names: {names}); libest and curl refuse it when dialling {host}",
                "reissue it with that name in subjectAltName (trial: move tls.pem/tls.key away, est-admin init --host NAME)",
            )
    if _check_file(report, "tls key", tls.key_file):
        try:
            key = load_pem_private_key(tls.key_file.read_bytes(), None)
            if _spki(key.public_key()) != _spki(certificate.public_key()):
                report.fail("tls key", f"{tls.key_file} does not belong to {tls.cert_file}", "configure the matching pair")
        except TypeError:
            report.fail("tls key", f"{tls.key_file} is encrypted", "gunicorn needs it unencrypted (mode 0600)")
        except ValueError:
            report.fail("tls key", f"{tls.key_file} is not a PEM private key", "configure the key of tls.cert_file")
    if tls.min_version == "1.3":
        report.warn("tls", "min_version 1.3: libest's estclient speaks TLS 1.2 at most", "set tls.min_version: \"1.2\" if a libest-based gateway enrolls here")
    return certificate


# --- inside: database and CRL ------------------------------------------------------------------


def _check_database(report: Report, settings: Settings, chain: tuple[x509.Certificate, ...]) -> Optional[Store]:
    from .. import instance_path

    url = settings.database.url or f"sqlite:///{instance_path() / 'est.db'}"
    try:
        parsed = sa.engine.make_url(url)
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            path = Path(parsed.database)
            if not path.exists():
                report.fail("database", f"{shown}: no such file", "point database.url at the server's database; est-admin init or est-server creates it")
                return None
            _check_file(report, "database", path)
        store = Store(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        report.fail("database", f"database.url cannot be used: {_one_line(str(exc))}", "fix database.url, or install its driver (PostgreSQL: psycopg)")
        return None
    try:
        with store.engine.connect() as conn:
            inspector = sa.inspect(conn)
            tables = set(inspector.get_table_names())
            problems = []
            for table in metadata.sorted_tables:
                if table.name not in tables:
                    problems.append(f"table {table.name} is missing")
                    continue
                present = {c["name"] for c in inspector.get_columns(table.name)}
                missing = [c.name for c in table.columns if c.name not in present]
                if missing:
                    problems.append(f"table {table.name} lacks column(s) {', '.join(missing)}")
    except sa.exc.SQLAlchemyError as exc:
        report.fail("database", f"{shown} cannot be reached: {_one_line(str(exc.orig or exc))}", "start the database, or fix database.url; enrollment answers 503 meanwhile")
        return None
    if problems:
        report.fail("database", f"{shown}: {'; '.join(problems)}", "back it up, then migrate (docs/DEPLOYMENT.md); est-server refuses to start")
        return None
    report.ok("database", f"{shown} answers; its schema is this version's ({len(metadata.tables)} tables)")
    _check_crl(report, settings, store, chain)
    return store


def _check_crl(report: Report, settings: Settings, store: Store, chain: tuple[x509.Certificate, ...]) -> None:
    latest = store.current_crl()
    if latest is None:
        report.warn("crl", "none signed yet", "fetch /crl once (or est-admin crl) before FreeRADIUS checks CRLs")
        return
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    if latest.next_update <= now:
        report.fail(
            "crl", f"CRL {latest.number} expired at {latest.next_update:%Y-%m-%d %H:%M} UTC: FreeRADIUS with CRL checks refuses every pump",
            "run est-admin crl now, and from a timer more often than ca.crl_lifetime_hours",
        )
        return
    if chain and not x509.load_der_x509_crl(latest.der).is_signature_valid(chain[0].public_key()):
        report.fail("crl", f"CRL {latest.number} is not signed by the configured CA (was the CA replaced?)", "run est-admin crl")
        return
    report.ok("crl", f"CRL {latest.number} valid until {latest.next_update:%Y-%m-%d %H:%M} UTC")


def _check_access(report: Report, store: Store, profile: EnrollmentProfile) -> None:
    subject = f"label {profile.name}"
    users = len(store.list_users()) if "basic" in profile.auth else 0
    ras = sum(profile.name in ra.label_set for ra in store.list_ras()) if "cert" in profile.auth else 0
    if users or ras:
        report.ok(subject, f"auth {', '.join(sorted(profile.auth))}: {_count(users, 'user')} and {_count(ras, 'RA certificate')} may enroll")
    else:
        todo = " or ".join(
            {"basic": "est-admin user add NAME", "cert": f"est-admin ra add CERT --label {profile.name}"}[m] for m in sorted(profile.auth)
        )
        report.warn(subject, f"auth {', '.join(sorted(profile.auth))}, and nobody is registered: every enrollment gets 401", todo)


# --- outside: the running server, and what each client makes of the answers --------------------


@dataclass(frozen=True)
class BodyForm:
    """How an EST body is written, as a client sees it."""

    kind: str  # DER | PEM | base64 | other
    lines: int = 0
    longest_line: int = 0
    crlf: bool = False
    trailing_newline: bool = False
    excess: int = 0  # DER: bytes after the structure (negative: missing from it)
    extra: str = ""  # the PEM label, or the bytes after a DER structure

    def __str__(self) -> str:
        if self.kind == "DER" and self.excess < 0:
            return f"raw DER, truncated: {-self.excess} byte(s) missing at the end"
        if self.kind == "DER":
            return "raw DER" + (f" followed by {self.excess} more byte(s) {self.extra}" if self.excess else "")
        if self.kind == "other":
            return "neither DER, PEM nor base64"
        if self.lines == 1:
            shape = f"on one line of {self.longest_line} characters"
        else:
            shape = f"wrapped at {self.longest_line} columns ({self.lines} lines, {'CRLF' if self.crlf else 'LF'})"
        label = f" ({self.extra})" if self.extra else ""
        return f"{self.kind}{label} {shape}, {'with a' if self.trailing_newline else 'no'} trailing newline"


def body_form(data: bytes) -> BodyForm:
    if data[:1] == b"\x30":
        excess = len(data) - _der_length(data)
        return BodyForm("DER", excess=excess, extra=_shown(repr(data[-excess:]))[:40] if excess > 0 else "")
    pem = re.match(rb"\s*-----BEGIN ([A-Z0-9 ]+)-----", data)
    text = re.sub(rb"-----(BEGIN|END) [A-Z0-9 ]+-----", b"", data).strip(b"\r\n")
    if not re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", re.sub(rb"\s", b"", text)):
        return BodyForm("other")
    lines = [line.rstrip(b"\r") for line in text.split(b"\n")]
    return BodyForm(
        "PEM" if pem else "base64",
        lines=len(lines),
        longest_line=max(len(line) for line in lines),
        crlf=b"\r\n" in data,
        trailing_newline=data.endswith(b"\n"),
        extra=pem.group(1).decode() if pem else "",
    )


def unreadable(client: str, form: BodyForm, cte: bool, certificates: int, root_included: bool, enrollment: bool) -> Optional[str]:
    """Why ``client`` cannot read an answer written so; None when it can."""
    if client == "der":
        return None if form.kind == "DER" else "expects raw DER: response_format: der"
    if form.kind != "base64":
        return "expect base64: response_format: base64"
    if client == "strongswan" and form.lines > 1:
        return "needs one line: base64_line_length: 0"
    if client in ("libest", "openssl") and form.longest_line >= MAX_LINE:
        return f"lose lines of {form.longest_line:,} characters, need under {MAX_LINE:,}: base64_line_length: 64"
    if client == "libest" and not root_included:
        return "needs the self-signed root in cacerts: ca.chain_file"
    if client == "globalsign" and not cte:
        return f"needs {CTE}: base64"
    if client == "globalsign" and enrollment and certificates != 1:
        return f"refuses {certificates} certificates in an enrollment answer: include_chain: false"
    return None


def _report_readers(report: Report, subject: str, what: str, verdicts: dict[str, Optional[str]], required: tuple[str, ...]) -> None:
    readers = [CLIENTS[c] for c, why in verdicts.items() if why is None]
    reasons: dict[str, list[str]] = {}
    for client, why in verdicts.items():
        if why is not None:
            reasons.setdefault(why, []).append(CLIENTS[client])
    text = f"{what}; read by {', '.join(readers) or 'no known client'}"
    text += "".join(f"; not by {', '.join(names)} ({why})" for why, names in reasons.items())
    missing = [CLIENTS[c] for c in required if verdicts[c] is not None]
    if missing:
        report.fail(subject, text, f"{', '.join(missing)} cannot read it: change the label's response_format / base64_line_length / include_chain")
    elif not readers:
        report.fail(subject, text, "set response_format and base64_line_length for the gateway's client")
    else:
        report.ok(subject, text)


def _check_server(report: Report, settings: Settings, tls_certificate, tls_ca: Optional[Path]) -> Optional[http.client.HTTPConnection]:
    address = _bind(settings.server.bind)
    if address is None:
        report.warn("server", f"bind {settings.server.bind} is not a TCP address; not checked from the outside", "check it through the proxy in front")
        return None
    host, port = address
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if settings.tls.cert_file is None:
        return _connect(report, http.client.HTTPConnection(target, port, timeout=TIMEOUT), "")
    anchors = [tls_ca] if tls_ca else [p for p in (settings.ca.cert_file, settings.ca.chain_file) if p]
    context = ssl.create_default_context()
    context.check_hostname = False  # the names are checked from the file, one line each
    for anchor in anchors:
        context.load_verify_locations(cafile=str(anchor))
    try:
        connection = _connect(report, http.client.HTTPSConnection(target, port, timeout=TIMEOUT, context=context), " over TLS, its certificate verified")
    except ssl.SSLCertVerificationError as exc:
        report.fail(
            "server", f"its TLS certificate does not verify against {', '.join(map(str, anchors))}: {exc.verify_message}",
            "clients trusting that root refuse it: renew or reissue tls.cert_file (or pass --tls-ca with the root gateways trust)",
        )
        context.verify_mode = ssl.CERT_NONE  # go on, to read what the labels answer
        connection = _connect(report, http.client.HTTPSConnection(target, port, timeout=TIMEOUT, context=context), " over TLS, without verifying its certificate")
    if connection is not None:
        served = x509.load_der_x509_certificate(connection.sock.getpeercert(binary_form=True))
        if tls_certificate is not None and served != tls_certificate:
            report.warn("server", f"serves another TLS certificate ({_shown(served.subject.rfc4514_string())}) than {settings.tls.cert_file}", "restart est to load the new files")
    return connection


def _connect(report: Report, connection: http.client.HTTPConnection, how: str) -> Optional[http.client.HTTPConnection]:
    """Connect (and shake hands); a refusal or a failed handshake is a FAIL line. Certificate failures propagate."""
    where = f"{connection.host}:{connection.port}"
    try:
        connection.connect()
    except ssl.SSLCertVerificationError:
        raise
    except ssl.SSLError as exc:
        report.fail("server", f"TLS handshake with {where} failed: {exc.reason or exc}", "check tls.* and the server's log (journalctl -u est)")
        return None
    except OSError as exc:
        report.fail("server", f"nothing answers on {where} ({exc.strerror or exc})", "start est-server (systemctl start est; journalctl -u est)")
        return None
    report.ok("server", f"answers on {where}{how}")
    return connection


def _check_cacerts(report: Report, connection, profile: EnrollmentProfile, chain, required: tuple[str, ...]) -> None:
    subject = f"label {profile.name}"
    path = "/.well-known/est/" + (f"{profile.label}/" if profile.label else "") + "cacerts"
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        body, headers = reply.read(), dict(reply.getheaders())
    except (OSError, http.client.HTTPException) as exc:
        report.fail(subject, f"GET {path} failed: {exc}", "see the server's log (journalctl -u est)")
        connection.close()
        return
    if reply.status != 200:
        todo = "restart est: it runs with an older configuration" if reply.status == 404 else "see the server's log (journalctl -u est)"
        report.fail(subject, f"GET {path} answered {reply.status}: {_shown(_one_line(body.decode('utf-8', 'replace')))}", todo)
        return
    if "Content-Length" not in headers:
        report.fail(subject, f"GET {path}: no Content-Length header (libest needs it)", "serve with est-server, not behind a proxy that chunks")
    try:
        certificates = pkcs7.load_der_pkcs7_certificates(decode_body(body, "PKCS#7"))
    except (BadRequest, ValueError):
        report.fail(subject, f"cacerts is not a certs-only PKCS#7 in DER or base64 ({len(body)} bytes)", "see the server's log (journalctl -u est)")
        return
    if chain and list(chain) != certificates:
        report.warn(subject, "cacerts differs from the configured CA chain", "restart est to load the new CA files")
    root = any(c.issuer == c.subject for c in certificates)
    if not root:
        report.fail(subject, "cacerts lacks the self-signed root: libest refuses it", "put the root in ca.chain_file")
    form, cte = body_form(body), headers.get(CTE, "").lower() == "base64"
    verdicts = {c: unreadable(c, form, cte, len(certificates), root, enrollment=False) for c in CLIENTS}
    what = f"cacerts is {form}, {'with' if cte else 'without'} {CTE}, {_count(len(certificates), 'certificate')}"
    _report_readers(report, subject, what, verdicts, required)


def _check_enrollment_answer(report: Report, stand_in: CertificateAuthority, pump_keys: dict, profile: EnrollmentProfile, required: tuple[str, ...]) -> None:
    """Render the label's enrollment answer with the server's own code, for each pump key type, and read it."""
    count = 1 + len(stand_in.chain) if profile.certificate.include_chain else 1
    verdicts: dict[str, Optional[str]] = dict.fromkeys(CLIENTS)
    sizes = []
    for name, key in pump_keys.items():
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "NPPBBB4")])).sign(key, hashes.SHA256())
        response = ESTResponse([(CERTS_ONLY, stand_in.certs_only(stand_in.issue(csr, profile.certificate), profile.certificate))])
        profile.encoding.apply(response)
        body = response.get_data()
        form, cte = body_form(body), response.headers.get(CTE, "").lower() == "base64"
        sizes.append(f"{len(body):,} bytes ({name} pump key)")
        for client in CLIENTS:
            why = unreadable(client, form, cte, count, True, enrollment=True)
            if why and verdicts[client] is None:
                verdicts[client] = why if not sizes[:-1] else f"{why} with {name} pump keys"
    what = f"enrollment answer (rendered from the label's settings; nothing enrolled) is {form.kind}, {_count(count, 'certificate')}, {' or '.join(sizes)}"
    _report_readers(report, f"label {profile.name}", what, verdicts, required)


def _check_deployment(report: Report, settings: Settings, credential, profiles: list[EnrollmentProfile], hosts, clients, tls_ca) -> None:
    chain = _check_ca(report, settings, credential)
    tls_certificate = _check_tls(report, settings, hosts)
    store = _check_database(report, settings, chain)
    connection = _check_server(report, settings, tls_certificate, tls_ca)
    stand_in = None
    if chain and chain[0].not_valid_after_utc > datetime.now(timezone.utc):
        # Same issuer, extensions and signature length as the CA's certificates; the key is thrown away.
        stand_in = CertificateAuthority(_key_like(chain[0].public_key()), chain, settings.ca.digest, settings.ca.crl_url, settings.ca.ocsp_url)
        pump_keys = {"P-256": ec.generate_private_key(ec.SECP256R1()), "RSA-2048": rsa.generate_private_key(65537, 2048)}
    for profile in profiles:
        if connection is not None:
            _check_cacerts(report, connection, profile, chain, clients)
        if stand_in is not None:
            _check_enrollment_answer(report, stand_in, pump_keys, profile, clients)
        if store is not None:
            _check_access(report, store, profile)
    if connection is not None:
        connection.close()


# --- --request: a captured body, through the server's own decoder and checks -------------------


def _check_request(report: Report, settings: Settings, profile: EnrollmentProfile, path: Path) -> None:
    from ..est.issuance import device_key  # the est package imports the app's modules

    subject = f"label {profile.name}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        report.fail("request", f"cannot read {path}: {exc.strerror}")
        return
    form = body_form(data)
    report.ok("request", f"{path.name}: {len(data):,} bytes, {form}" + (f", starts {_shown(repr(data[:16]))}" if form.kind == "other" else ""))
    if len(data) > settings.max_body_bytes:
        report.fail(subject, f"would answer 413: request body larger than {settings.max_body_bytes} bytes", "the gateway sends the wrong file")
        return
    try:
        der = decode_body(data, "PKCS#10 CSR")
    except ESTError as exc:
        report.fail(subject, f"would answer {exc.status}: {exc.message}", "the gateway must send the CSR itself, as DER, PEM or base64")
        return
    _describe_csr(report, der)
    try:
        csr = load_csr(der)
    except ESTError as exc:
        todo = "make the CSR again with a supported key, signed by that key"
        if form.excess > 0:
            todo = "the gateway adds bytes after the DER: send the file unchanged (curl --data-binary @FILE)"
        elif form.excess < 0:
            todo = "the body was cut short: capture or send the whole file"
        report.fail(subject, f"would answer {exc.status}: {exc.message}", todo)
        return
    try:
        check_policy(csr, profile.csr_policy)
        device = device_key(csr, profile.device_id)
    except ESTError as exc:
        report.fail(subject, f"would answer {exc.status}: {exc.message}", "fix the gateway's CSR, or the label's subject_cn_pattern / csr_attributes / device_id")
        return
    report.ok(
        subject, f"would accept it for device {_shown(repr(device))} (decoding, key, signature and CSR policy as the server checks them)",
        "not checked here: the gateway's credentials, the Content-Type header, and a duplicate device under duplicate_policy: reject",
    )


def _describe_csr(report: Report, der: bytes) -> None:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        return  # load_csr says why, in the server's words
    report.ok("request", f"CSR subject {_shown(csr.subject.rfc4514_string()) or '(empty)'}, key {_key_name(csr)}")
    attributes = []
    for attribute in csr.attributes:
        name = ATTRIBUTE_NAMES.get(attribute.oid.dotted_string, attribute.oid.dotted_string)
        if name == "challengePassword":
            name += f" ({len(attribute.value)} characters; must be this TLS session's tls-unique unless an RA sends it)"
        attributes.append(name)
    try:
        for extension in csr.extensions:
            if isinstance(extension.value, x509.SubjectAlternativeName):
                attributes.append("subjectAltName " + ", ".join(_shown(f"{type(n).__name__.removesuffix('Name')}:{n.value}") for n in extension.value))
            else:
                attributes.append(f"requested extension {extension.oid._name}")
    except ValueError:
        pass  # load_csr names a malformed extension request
    report.ok("request", "attributes: " + ("; ".join(attributes) if attributes else "none"))


# --- small helpers -----------------------------------------------------------------------------


def _bind(bind: str) -> Optional[tuple[str, int]]:
    """(host, port) of a gunicorn bind address; None for unix: and fd:// sockets."""
    if bind.startswith(("unix:", "fd://")):
        return None
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        return bind.strip("[]"), 8000  # gunicorn's default port
    return host.strip("[]"), int(port)


def _der_length(data: bytes) -> int:
    """Length of the DER element at the start of ``data``, header included."""
    if len(data) < 2 or data[1] < 0x80:
        return 2 + (data[1] if len(data) > 1 else 0)
    size = data[1] & 0x7F
    return 2 + size + int.from_bytes(data[2 : 2 + size], "big")


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _san(certificate: x509.Certificate) -> tuple[list[str], list]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return names.get_values_for_type(x509.DNSName), names.get_values_for_type(x509.IPAddress)


def _names_host(host: str, dns: list[str], ips: list) -> bool:
    """Whether a certificate with these SAN entries passes for ``host`` (RFC 6125: one leftmost wildcard label)."""
    try:
        return ipaddress.ip_address(host) in ips
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in dns):
        if name == host or (name.startswith("*.") and host.count(".") > 1 and host.split(".", 1)[1] == name[2:]):
            return True
    return False


def _key_like(public_key):
    """A throwaway private key of the same type and size, so a stand-in signature has the real length."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return rsa.generate_private_key(65537, public_key.key_size)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ec.generate_private_key(public_key.curve)
    return ed448.Ed448PrivateKey.generate() if isinstance(public_key, ed448.Ed448PublicKey) else ed25519.Ed25519PrivateKey.generate()


def _key_name(csr: x509.CertificateSigningRequest) -> str:
    try:
        key = csr.public_key()
    except Exception:  # unsupported key types raise assorted errors
        return "of an unsupported type"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits, exponent {key.public_numbers().e}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {CURVES.get(key.curve.name, key.curve.name)}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "")


def _spki(public_key) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _shown(text: str) -> str:
    """Device- or file-supplied text made safe for a terminal: control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
