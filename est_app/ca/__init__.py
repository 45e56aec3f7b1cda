"""The CA service: CSR checks, certificate profiles, issuing, and the signers (a key in a file or a PKCS#11 token). No HTTP here."""

from .authority import Authorities, CertificateAuthority, issued_subject, load_authorities, load_authority
from .csr import CSRPolicy, check_policy, load_csr
from .profile import CertificateProfile

__all__ = ["Authorities", "issued_subject", "CertificateAuthority", "load_authorities", "CertificateProfile", "CSRPolicy", "check_policy", "load_authority", "load_csr"]
