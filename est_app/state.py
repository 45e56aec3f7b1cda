"""What one app instance holds for its requests: settings, CA, store, profiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from flask import current_app

from .ca import CertificateAuthority
from .ca.ocsp import OCSPResponder
from .config import Settings
from .profiles import EnrollmentProfile
from .proxy import TrustedProxies
from .store import Store

if TYPE_CHECKING:
    from .auth import ClientCertificateVerifier, VerifiedCredentials
    from .revocation import CRLCache


@dataclass
class AppState:
    settings: Settings
    authority: CertificateAuthority
    store: Store
    profiles: dict[Optional[str], EnrollmentProfile]
    credentials: "VerifiedCredentials"
    verifier: "ClientCertificateVerifier"
    crl: "CRLCache"
    ocsp: OCSPResponder
    proxies: TrustedProxies

    def profile_named(self, name: str) -> Optional[EnrollmentProfile]:
        """The profile recorded as ``name`` on certificates ('default' for the unlabelled path)."""
        return next((p for p in self.profiles.values() if p.name == name), None)


def state() -> AppState:
    """The running app's state (inside a request or app context)."""
    return current_app.extensions["est_app"]
