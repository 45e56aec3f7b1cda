"""Enrollment profiles: a label's settings merged over the deployment's.

Each label (and the unlabelled default, keyed ``None``) resolves once, at
start-up, to the objects the request path uses: its response encoding, its
certificate profile, its CSR policy, who may use it and how devices are
identified and de-duplicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

from cryptography import x509

from .ca import CertificateProfile, CSRPolicy
from .ca.names import NamePolicy
from .config import CSR_ATTRIBUTE_NAMES, DEFAULT_LABEL, ConfigError, LabelSettings, Settings
from .encoding import ResponseEncoding, response_encoding


@dataclass(frozen=True)
class EnrollmentProfile:
    label: Optional[str]
    encoding: ResponseEncoding
    certificate: CertificateProfile
    csr_policy: CSRPolicy
    auth: frozenset[str]
    device_id: str
    duplicate_policy: Optional[str]  # None: the operation's default
    require_pop: bool
    serverkeygen_key_types: tuple[str, ...]
    retry_window: timedelta  # a repeated CSR within it gets the certificate already issued
    approval: str = "auto"  # auto | manual | inventory
    approve_reenrollment: bool = False  # simplereenroll waits for approval too

    @property
    def name(self) -> str:
        """The label as stored and as RAs are registered for it ('default' for the unlabelled path)."""
        return self.label or DEFAULT_LABEL


def build_profiles(settings: Settings) -> dict[Optional[str], EnrollmentProfile]:
    """Every label's profile; a label's ``subject_cn_pattern`` reserves the names it matches against every other label."""
    patterns = {name: re.compile(label.subject_cn_pattern) for name, label in settings.labels.items() if label.subject_cn_pattern}
    profiles = {None: _resolve(None, LabelSettings(), settings, patterns)}
    profiles.update({name: _resolve(name, label, settings, patterns) for name, label in settings.labels.items()})
    return profiles


def _resolve(name: Optional[str], label: LabelSettings, settings: Settings, patterns: dict[str, re.Pattern[str]]) -> EnrollmentProfile:
    def pick(key: str, default=None):
        value = getattr(label, key)
        if value is not None:
            return value
        return getattr(settings, key) if default is None else default

    attributes = tuple(x509.ObjectIdentifier(CSR_ATTRIBUTE_NAMES.get(a, a)) for a in pick("csr_attributes"))
    names = NamePolicy(
        label=name or DEFAULT_LABEL,
        san_types=frozenset(pick("san_types")),
        san_dns_suffixes=tuple(suffix.lower() for suffix in pick("san_dns_suffixes")),
        max_san_count=pick("max_san_count"),
        reserved_cn_patterns=tuple((owner, pattern) for owner, pattern in patterns.items() if owner != name),
    )
    if names.san_types & {"dns", "email"} and not names.san_dns_suffixes:
        where = f"labels.{name}" if name else "top level"
        raise ConfigError(f"{where}: san_types allows DNS or e-mail names but san_dns_suffixes is empty; list the domains they may fall under")
    ca = label.ca or settings.ca  # the issuing CA's section gives the certificate defaults
    return EnrollmentProfile(
        label=name,
        encoding=response_encoding(pick("response_format"), pick("base64_line_length")),
        certificate=CertificateProfile(
            validity_days=pick("cert_validity_days", ca.cert_validity_days),
            extended_key_usage=pick("extended_key_usage", ca.extended_key_usage),
            include_chain=pick("include_chain"),
        ),
        csr_policy=CSRPolicy(
            subject_cn_pattern=patterns.get(name) if name else None,
            attributes=attributes,
            require_attributes=pick("require_csr_attributes"),
            names=names,
        ),
        auth=frozenset(pick("auth")),
        device_id=pick("device_id"),
        duplicate_policy=pick("duplicate_policy"),
        require_pop=pick("require_pop"),
        serverkeygen_key_types=pick("serverkeygen_key_types"),
        retry_window=timedelta(minutes=pick("retry_window_minutes")),
        approval=label.approval.mode if label.approval and label.approval.mode else settings.approval.mode,
        approve_reenrollment=_pick_bool(label.approval.simplereenroll if label.approval else None, settings.approval.simplereenroll),
    )


def _pick_bool(value: Optional[bool], default: bool) -> bool:
    return default if value is None else value
