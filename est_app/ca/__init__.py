"""The CA service: CSR checks, certificate profiles and issuing. No HTTP here."""

from .authority import CertificateAuthority, issued_subject, load_authority
from .csr import CSRPolicy, check_policy, load_csr
from .profile import CertificateProfile

__all__ = ["issued_subject", "CertificateAuthority", "CertificateProfile", "CSRPolicy", "check_policy", "load_authority", "load_csr"]
