"""The CA service: CSR checks, certificate profiles and issuing. No HTTP here."""

from .authority import CertificateAuthority, load_authority
from .csr import CSRPolicy, check_policy, load_csr
from .profile import CertificateProfile

__all__ = ["CertificateAuthority", "CertificateProfile", "CSRPolicy", "check_policy", "load_authority", "load_csr"]
