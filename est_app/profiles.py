"""Enrollment profiles: a label's settings merged over the deployment's.

Each label (and the unlabelled default, keyed ``None``) resolves once, at
start-up, to the objects the request path uses: its response encoding, its
certificate profile and its CSR policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .ca import CertificateProfile, CSRPolicy
from .config import LabelSettings, Settings
from .encoding import ResponseEncoding, response_encoding


@dataclass(frozen=True)
class EnrollmentProfile:
    label: Optional[str]
    encoding: ResponseEncoding
    certificate: CertificateProfile
    csr_policy: CSRPolicy

    @property
    def name(self) -> str:
        """The label as stored with each certificate ('' for the default profile)."""
        return self.label or ""


def build_profiles(settings: Settings) -> dict[Optional[str], EnrollmentProfile]:
    profiles = {None: _resolve(None, LabelSettings(), settings)}
    profiles.update({name: _resolve(name, label, settings) for name, label in settings.labels.items()})
    return profiles


def _pick(override, default):
    return default if override is None else override


def _resolve(name: Optional[str], label: LabelSettings, settings: Settings) -> EnrollmentProfile:
    return EnrollmentProfile(
        label=name,
        encoding=response_encoding(
            _pick(label.response_format, settings.response_format),
            _pick(label.base64_line_length, settings.base64_line_length),
        ),
        certificate=CertificateProfile(
            validity_days=_pick(label.cert_validity_days, settings.ca.cert_validity_days),
            extended_key_usage=_pick(label.extended_key_usage, settings.ca.extended_key_usage),
            include_chain=_pick(label.include_chain, settings.include_chain),
        ),
        csr_policy=CSRPolicy(
            subject_cn_pattern=re.compile(label.subject_cn_pattern) if label.subject_cn_pattern else None,
        ),
    )
