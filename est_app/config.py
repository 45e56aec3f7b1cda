"""Configuration: one YAML file turned into validated, typed settings.

Every section is a frozen dataclass; :func:`load_config` walks the YAML
against their type hints, so an unknown key, a wrong type, a bad choice or a
missing file stops start-up with a message naming the key (``ca.key_file``)
and, for files, the path. Relative paths are taken from the YAML file's
folder. Secrets never live here: only the name of an environment variable or
file that holds them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import limits
import sqlalchemy
import yaml

EST_OPERATIONS = frozenset(
    {"cacerts", "simpleenroll", "simplereenroll", "serverkeygen", "csrattrs", "fullcmc", "bootstrap"}
)
EXTENDED_KEY_USAGES = ("clientAuth", "serverAuth")
# Names accepted in csr_attributes besides dotted OIDs.
CSR_ATTRIBUTE_NAMES = {
    "challengePassword": "1.2.840.113549.1.9.7",
    "serialNumber": "2.5.4.5",
    "macAddress": "1.3.6.1.1.1.1.22",
    "extensionRequest": "1.2.840.113549.1.9.14",
}
DEFAULT_LABEL = "default"  # how the unlabelled path is named in records and RA registrations
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key or path."""


ResponseFormat = Literal["base64", "der"]
AuthMethod = Literal["basic", "cert"]
DeviceId = Literal["cn", "serialNumber", "san"]
DuplicatePolicy = Literal["reject", "renew"]
ApprovalMode = Literal["auto", "manual", "inventory"]
KeygenKeyType = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"]
OID_PATTERN = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
SanType = Literal["dns", "email", "ip", "uri"]
# A DNS name in preferred name syntax (RFC 1034 3.5, RFC 5280 4.2.1.6): LDH labels of 1 to 63, at most 253 in all.
DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@dataclass(frozen=True)
class ServerSettings:
    bind: str = "127.0.0.1:8445"
    workers: int = 2
    threads: int = 4
    keepalive: int = 30
    timeout: int = 30
    graceful_timeout: int = 30
    access_log: bool = False
    # Slow and idle clients (est_app/worker.py): read deadlines in seconds, connections per worker.
    header_timeout: int = 10
    body_timeout: int = 20
    max_connections: int = 1000
    max_connections_per_address: int = 50

    def __post_init__(self) -> None:
        _positive(self, "workers", "threads", "keepalive", "timeout", "graceful_timeout", "header_timeout", "body_timeout", "max_connections")
        if self.max_connections_per_address < 0:
            raise ValueError("max_connections_per_address must be at least 0 (0: no limit)")


@dataclass(frozen=True)
class TLSSettings:
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    client_ca_file: Optional[Path] = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")


@dataclass(frozen=True)
class CASettings:
    cert_file: Path
    key_file: Optional[Path] = None
    chain_file: Optional[Path] = None
    key_passphrase_env: Optional[str] = None
    key_passphrase_file: Optional[Path] = None
    cert_validity_days: int = 365
    digest: Literal["sha256", "sha384", "sha512"] = "sha256"
    extended_key_usage: tuple[str, ...] = ("clientAuth",)
    # Put into issued certificates: CRL distribution point and OCSP (AIA) addresses.
    crl_url: Optional[str] = None
    ocsp_url: Optional[str] = None
    crl_lifetime_hours: int = 24
    # A delegated OCSP signer (EKU OCSPSigning, issued by this CA); by default the CA signs.
    ocsp_responder_cert_file: Optional[Path] = None
    ocsp_responder_key_file: Optional[Path] = None
    # The key in a PKCS#11 token instead of key_file: an RFC 7512 URI, the vendor's module, the user PIN's file.
    key: Optional[str] = None
    pkcs11_module: Optional[Path] = None
    pin_file: Optional[Path] = None
    # CA rollover (RFC 7030 4.1.3, est-admin ca rollover): the retired CAs, still signing CRLs and OCSP
    # answers for what they issued, and the NewWithOld/OldWithNew link certificates cacerts adds.
    previous: tuple["CASettings", ...] = ()
    link_certificates_file: Optional[Path] = None

    def __post_init__(self) -> None:
        _positive(self, "cert_validity_days", "crl_lifetime_hours")
        if any(p.previous or p.link_certificates_file for p in self.previous):
            raise ValueError("previous: a retired CA has no previous or link_certificates_file of its own; list every retired CA here")
        if (self.key_file is None) == (self.key is None):
            raise ValueError("set key_file (a PEM key) or key (a pkcs11: URI), one of them")
        if self.key is not None:
            if not self.key.startswith("pkcs11:"):
                raise ValueError("key must be a PKCS#11 URI (RFC 7512) such as pkcs11:token=est-ca;object=issuing-ca")
            if self.pkcs11_module is None or self.pin_file is None:
                raise ValueError("key (a pkcs11: URI) needs pkcs11_module and pin_file")
            if self.key_passphrase_env or self.key_passphrase_file:
                raise ValueError("key_passphrase_env and key_passphrase_file are for key_file; a token's PIN comes from pin_file")
        elif self.pkcs11_module is not None or self.pin_file is not None:
            raise ValueError("pkcs11_module and pin_file go with key (a pkcs11: URI), not with key_file")
        if (self.ocsp_responder_cert_file is None) != (self.ocsp_responder_key_file is None):
            raise ValueError("ocsp_responder_cert_file and ocsp_responder_key_file go together")
        for name in ("crl_url", "ocsp_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http:// or https:// URL")
        _check_eku(self.extended_key_usage)
        if self.key_passphrase_env and self.key_passphrase_file:
            raise ValueError("key_passphrase_env and key_passphrase_file: set one, not both")


@dataclass(frozen=True)
class DatabaseSettings:
    url: Optional[str] = None
    # PostgreSQL's password: a file (a systemd credential), else libpq's ~/.pgpass or service file; never the URL.
    password_file: Optional[Path] = None
    connect_timeout: int = 5
    statement_timeout: int = 10

    def __post_init__(self) -> None:
        _positive(self, "connect_timeout", "statement_timeout")
        try:
            url = sqlalchemy.engine.make_url(self.url) if self.url is not None else None
        except sqlalchemy.exc.ArgumentError:
            raise ValueError(f"url {self.url!r} is not a SQLAlchemy URL such as sqlite:////var/lib/est/est.db or postgresql+psycopg://est@db.example/est") from None
        if url is not None and (url.password is not None or "password" in url.query):
            raise ValueError(
                "url holds a password, and passwords never go in the YAML: put it in database.password_file "
                "(a systemd credential), ~/.pgpass or a PostgreSQL service file"
            )
        if self.password_file is not None and (url is None or url.get_backend_name() != "postgresql"):
            raise ValueError("password_file is for a postgresql+psycopg:// url; SQLite has no password")

    def read_password(self) -> Optional[str]:
        """The password in ``password_file`` (trailing CR/LF stripped), or None; ConfigError naming the file when unreadable."""
        return read_secret_file(self.password_file, "database.password_file") if self.password_file else None


def database_url(database: DatabaseSettings, instance_path: Path) -> str:
    """The database est_app opens: ``database.url``, by default the SQLite file est.db in the instance folder ``instance_path``."""
    return database.url or f"sqlite:///{instance_path / 'est.db'}"


@dataclass(frozen=True)
class RateLimitSettings:
    enabled: bool = False
    limit: str = "20 per second"
    storage_uri: str = "memory://"
    # Redis's password (AUTH): a file (a systemd credential), never the URI.
    storage_password_file: Optional[Path] = None

    def __post_init__(self) -> None:
        try:
            if not limits.parse_many(self.limit):
                raise ValueError
        except ValueError:
            raise ValueError(f"limit {self.limit!r} is not a rate such as '20 per second' or '50/second; 1800/minute'") from None
        redis = self.storage_uri.startswith(("redis://", "rediss://"))
        if redis and urllib.parse.urlsplit(self.storage_uri).password is not None:
            raise ValueError("storage_uri holds a password, and passwords never go in the YAML: put it in rate_limit.storage_password_file")
        if self.storage_password_file is not None and not redis:
            raise ValueError("storage_password_file is for a redis:// or rediss:// storage_uri")


@dataclass(frozen=True)
class AdminSettings:
    """The operator surfaces: JSON API under /api/v1, the dashboard under /admin, and /metrics."""

    enabled: bool = True
    # Client networks allowed to reach them (after trusted_proxies); loopback only unless opened.
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1")
    session_minutes: int = 30  # idle timeout
    session_max_hours: int = 12  # absolute lifetime of a sign-in
    # Back-off after failed password checks, per account and per client address.
    lockout_after: int = 5
    lockout_seconds: int = 30
    lockout_max_seconds: int = 900

    def __post_init__(self) -> None:
        _positive(self, "session_minutes", "session_max_hours", "lockout_after", "lockout_seconds", "lockout_max_seconds")
        if not self.allowed_networks:
            raise ValueError(
                "allowed_networks may not be empty: list the operator networks (0.0.0.0/0 and ::/0 for any), "
                "or set enabled: false to remove the API and dashboard"
            )
        _check_networks("allowed_networks", self.allowed_networks)
        if self.lockout_max_seconds < self.lockout_seconds:
            raise ValueError("lockout_max_seconds must be at least lockout_seconds")


@dataclass(frozen=True)
class ApprovalSettings:
    """Manual approval (RFC 7030 4.2.3): who issues at once, and how long a request waits for an operator."""

    mode: ApprovalMode = "auto"  # auto: issue at once; manual: every new enrollment waits; inventory: listed devices issue at once
    retry_after_seconds: int = 60
    pending_hours: int = 72
    simplereenroll: bool = False  # re-enrollments wait too

    def __post_init__(self) -> None:
        _positive(self, "retry_after_seconds", "pending_hours")


@dataclass(frozen=True)
class LabelApprovalSettings:
    """A label's approval overrides; ``None`` inherits the top-level ``approval``."""

    mode: Optional[ApprovalMode] = None
    simplereenroll: Optional[bool] = None


@dataclass(frozen=True)
class LabelSettings:
    """Overrides for one enrollment label; ``None`` inherits the deployment's value."""

    response_format: Optional[ResponseFormat] = None
    base64_line_length: Optional[int] = None
    cert_validity_days: Optional[int] = None
    extended_key_usage: Optional[tuple[str, ...]] = None
    include_chain: Optional[bool] = None
    subject_cn_pattern: Optional[str] = None
    auth: Optional[tuple[AuthMethod, ...]] = None
    device_id: Optional[DeviceId] = None
    duplicate_policy: Optional[DuplicatePolicy] = None
    csr_attributes: Optional[tuple[str, ...]] = None
    require_csr_attributes: Optional[bool] = None
    require_pop: Optional[bool] = None
    serverkeygen_key_types: Optional[tuple[KeygenKeyType, ...]] = None
    # The label's own issuing CA (same keys as the top-level ``ca``); None: the top-level CA.
    ca: Optional[CASettings] = None
    san_types: Optional[tuple[SanType, ...]] = None
    san_dns_suffixes: Optional[tuple[str, ...]] = None
    max_san_count: Optional[int] = None
    approval: Optional[LabelApprovalSettings] = None
    retry_window_minutes: Optional[int] = None

    def __post_init__(self) -> None:
        _check_profile(self)
        if self.cert_validity_days is not None:
            _positive(self, "cert_validity_days")
        if self.extended_key_usage is not None:
            _check_eku(self.extended_key_usage)
        if self.subject_cn_pattern is not None:
            try:
                re.compile(self.subject_cn_pattern)
            except re.error as exc:
                raise ValueError(f"subject_cn_pattern is not a regular expression: {exc}") from None


@dataclass(frozen=True)
class Settings:
    ca: CASettings
    response_format: ResponseFormat = "base64"
    base64_line_length: int = 64
    include_chain: bool = False
    # Deployment defaults for what a label may override (see LabelSettings).
    auth: tuple[AuthMethod, ...] = ("basic",)
    device_id: DeviceId = "cn"
    duplicate_policy: Optional[DuplicatePolicy] = None  # None: renew, but reject for bootstrap
    csr_attributes: tuple[str, ...] = ()
    require_csr_attributes: bool = False
    require_pop: bool = False
    serverkeygen_key_types: tuple[KeygenKeyType, ...] = ("ec-p256", "rsa-2048", "rsa-3072")
    # Name policy: the subjectAltName types a CSR may carry, the DNS domains its names must fall under, how many.
    san_types: tuple[SanType, ...] = ()
    san_dns_suffixes: tuple[str, ...] = ()
    max_san_count: int = 10
    # A CSR sent again this long after its certificate was issued gets that certificate (a lost response), not another.
    retry_window_minutes: int = 60
    bootstrap_enabled: bool = False
    bootstrap_validity_days: int = 30
    # Client certificates forwarded in this header are believed only from these addresses/networks.
    trusted_proxies: tuple[str, ...] = ()
    client_cert_header: str = "X-SSL-Client-Cert"
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    rate_limit: RateLimitSettings = field(default_factory=RateLimitSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    approval: ApprovalSettings = field(default_factory=ApprovalSettings)
    max_body_bytes: int = 65536
    # How long a successful password check is remembered (0: re-check every request).
    auth_cache_seconds: int = 300
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    labels: dict[str, LabelSettings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_profile(self)
        _positive(self, "max_body_bytes", "bootstrap_validity_days")
        _check_networks("trusted_proxies", self.trusted_proxies)
        if self.auth_cache_seconds < 0:
            raise ValueError("auth_cache_seconds may not be negative")
        for name in self.labels:
            if not LABEL_PATTERN.fullmatch(name):
                raise ValueError(f"label {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
            if name in EST_OPERATIONS or name == DEFAULT_LABEL:
                raise ValueError(f"label {name!r} is reserved (an EST operation, or the unlabelled path); choose another")


def load_config(path: str | Path) -> Settings:
    """Read and validate the YAML file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data if data is not None else {}, base_dir=path.resolve().parent, source=str(path))


def parse_config(data: object, *, base_dir: Path, source: str = "configuration") -> Settings:
    """Validate already-parsed YAML data; relative paths are resolved against ``base_dir``."""
    try:
        settings = _build(Settings, data, "", base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_files_exist(settings, source)
    return settings


def _build(tp: object, value: object, key: str, base_dir: Path) -> object:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = key or "top level"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(map(str, value)) - names)
        if unknown:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{_join(key, unknown[0])}: unknown key (known keys here: {known})")
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _build(hints[f.name], value[f.name], _join(key, f.name), base_dir)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{_join(key, f.name)}: required key is missing")
        try:
            return tp(**kwargs)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, key, base_dir)
    if origin is Literal:
        if value not in args and isinstance(value, (int, float)) and str(value) in args:
            value = str(value)  # min_version: 1.2 written without quotes
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_build(args[0], v, f"{key}[{i}]", base_dir) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return {str(k): _build(args[1], {} if v is None else v, _join(key, str(k)), base_dir) for k, v in value.items()}
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a file path")
        return (base_dir / value).resolve()
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    raise TypeError(f"no rule for {tp!r}")  # a programming error, not a user one


def _check_files_exist(settings: Settings, source: str) -> None:
    sections = {"ca": settings.ca, "tls": settings.tls}
    sections.update({f"labels.{name}.ca": label.ca for name, label in settings.labels.items() if label.ca})
    for section, ca in list(sections.items()):
        if section != "tls":
            sections.update({f"{section}.previous[{i}]": previous for i, previous in enumerate(ca.previous)})
    for section, obj in sections.items():
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            # The passphrase and PIN files may be systemd credentials, present only while the service runs.
            if isinstance(value, Path) and f.name not in ("key_passphrase_file", "pin_file") and not value.is_file():
                raise ConfigError(f"{source}: {section}.{f.name}: no such file: {value}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def read_secret_file(path: Path, key: str) -> str:
    """A secret (password, PIN) from its file, a systemd credential under the service; trailing CR/LF stripped.

    ConfigError naming ``key`` and the file when it cannot be read.
    """
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key} {path}: cannot read it ({reason})") from None


def _positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name} must be at least 1")


def _check_networks(name: str, values: tuple[str, ...]) -> None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not an IP address or network") from None


def _check_profile(obj: "Settings | LabelSettings") -> None:
    """Checks shared by the deployment's profile keys and a label's overrides."""
    value = obj.base64_line_length
    if value is not None and (value < 0 or (0 < value < 4) or value % 4):
        raise ValueError("base64_line_length must be 0 (one line) or a positive multiple of 4")
    for name in ("auth", "serverkeygen_key_types"):
        if getattr(obj, name) == ():
            raise ValueError(f"{name} may not be empty")
    if obj.max_san_count is not None:
        _positive(obj, "max_san_count")
    if obj.retry_window_minutes is not None and obj.retry_window_minutes < 0:
        raise ValueError("retry_window_minutes may not be negative (0: a repeated CSR is answered as a new one)")
    for suffix in obj.san_dns_suffixes or ():
        if not DNS_NAME.fullmatch(suffix):
            raise ValueError(f"san_dns_suffixes: {suffix!r} is not a DNS domain such as pumps.hospital.example (no wildcard, no leading dot)")
    for attribute in obj.csr_attributes or ():
        if attribute not in CSR_ATTRIBUTE_NAMES and not OID_PATTERN.fullmatch(attribute):
            known = ", ".join(CSR_ATTRIBUTE_NAMES)
            raise ValueError(f"csr_attributes: {attribute!r} is neither a dotted OID nor one of {known}")


def _check_eku(values: tuple[str, ...]) -> None:
    if not values:
        raise ValueError("extended_key_usage may not be empty")
    for v in values:
        if v not in EXTENDED_KEY_USAGES:
            raise ValueError(f"extended_key_usage: {v!r} is not one of {', '.join(EXTENDED_KEY_USAGES)}")
