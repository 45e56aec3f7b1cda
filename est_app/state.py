"""What one app instance holds for its requests: settings, CAs, store, profiles, the enrollment service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from flask import current_app

from .approval import ApprovalService
from .ca import Authorities, CertificateAuthority
from .ca.ocsp import OCSPResponder
from .config import Settings
from .enrollment import EnrollmentService
from .profiles import EnrollmentProfile
from .proxy import TrustedProxies
from .store import Store

if TYPE_CHECKING:
    from .auth import ClientCertificateVerifier, VerifiedCredentials
    from .revocation import CRLCache


@dataclass
class AppState:
    settings: Settings
    authorities: Authorities
    store: Store
    profiles: dict[Optional[str], EnrollmentProfile]
    credentials: "VerifiedCredentials"
    verifier: "ClientCertificateVerifier"
    crls: dict[str, "CRLCache"]  # by issuer id, one per CA
    ocsp: OCSPResponder
    proxies: TrustedProxies
    enrollment: EnrollmentService
    approval: ApprovalService

    @property
    def authority(self) -> CertificateAuthority:
        """The top-level CA (``ca``): the unlabelled path's, and every label's without its own."""
        return self.authorities.default

    @property
    def crl(self) -> "CRLCache":
        """The top-level CA's CRL (``/crl``)."""
        return self.crls[self.authorities.default.issuer_id]

    def authority_for(self, profile: EnrollmentProfile) -> CertificateAuthority:
        """The CA that issues on ``profile``'s label."""
        return self.authorities.for_label(profile.label)

    def crl_of(self, issuer: Optional[str]) -> Optional["CRLCache"]:
        """The CRL of the CA a certificate record names (None when that CA is no longer configured)."""
        authority = self.authorities.issuer_of(issuer)
        return self.crls[authority.issuer_id] if authority is not None else None


def state() -> AppState:
    """The running app's state (inside a request or app context)."""
    return current_app.extensions["est_app"]
