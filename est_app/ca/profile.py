"""Certificate profiles: what an issued certificate may say, decided by the CA.

Key usage, extended key usage and basic constraints come from here alone;
nothing a CSR asks for can change them. The CSR contributes its subject and,
where the profile allows, its subjectAltName.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

EKU_OIDS = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
}


@dataclass(frozen=True)
class CertificateProfile:
    validity_days: int = 365
    extended_key_usage: tuple[str, ...] = ("clientAuth",)
    include_chain: bool = False
    copy_subject_alt_name: bool = True

    def key_usage(self, public_key: object) -> x509.KeyUsage:
        """digitalSignature always; keyEncipherment too for RSA keys (TLS 1.2 RSA key exchange)."""
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )

    def extended_key_usage_extension(self) -> x509.ExtendedKeyUsage:
        return x509.ExtendedKeyUsage([EKU_OIDS[name] for name in self.extended_key_usage])
