"""What signs for a CA: :class:`Signer`, and :class:`FileSigner` for a key held in memory (a PEM file).

A signer signs certificates, CRLs and OCSP responses from cryptography's
builders, and raw data for the readiness probe; signers differ only in where
the private key lives. The PKCS#11 signer (the key in a token) is in
:mod:`.pkcs11`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509 import ocsp

from ..errors import ServiceUnavailable

PROBE_DIGEST = hashes.SHA256()


class KeyUnavailable(ServiceUnavailable):
    """503: the device holding the CA key (a token) cannot be reached now; ``problem`` says so for /readyz."""

    def __init__(self, device: str, detail: str, retry_after: int = 30) -> None:
        super().__init__(f"the CA key's {device} is unavailable; try again later", retry_after)
        self.problem = f"is in {device}, which is unavailable"
        self.detail = detail  # what the device said: for the log and the operator, not for clients


class Signer(ABC):
    """Signs for one CA (or delegated OCSP responder); ``public_key`` is the key its signatures verify with."""

    public_key: CertificatePublicKeyTypes

    @abstractmethod
    def sign_certificate(self, builder: x509.CertificateBuilder, algorithm: Optional[hashes.HashAlgorithm]) -> x509.Certificate:
        """The builder's certificate, signed (``algorithm`` None for Ed25519/Ed448 keys)."""

    @abstractmethod
    def sign_crl(self, builder: x509.CertificateRevocationListBuilder, algorithm: Optional[hashes.HashAlgorithm]) -> x509.CertificateRevocationList:
        """The builder's CRL, signed."""

    @abstractmethod
    def sign_ocsp(
        self, builder: ocsp.OCSPResponseBuilder, certificate: x509.Certificate, algorithm: Optional[hashes.HashAlgorithm]
    ) -> ocsp.OCSPResponse:
        """The builder's OCSP response, signed, naming ``certificate`` (the signer's) by key hash and carrying it.

        The certificate rides along even when it is the CA's: FreeRADIUS (OpenSSL's
        OCSP_basic_verify without extra certificates) looks for the signer only in the response.
        """

    @abstractmethod
    def sign(self, data: bytes, algorithm: Optional[hashes.HashAlgorithm]) -> bytes:
        """A signature over ``data`` as X.509 carries it: PKCS#1 v1.5 for RSA, DER ECDSA-Sig-Value for EC."""

    def probe(self, key: CertificatePublicKeyTypes) -> Optional[str]:
        """None when the private key signs a fresh payload that ``key`` (the CA certificate's) verifies; otherwise what is wrong."""
        payload = b"est_app readiness " + os.urandom(16)
        if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            args: tuple = ()
            algorithm = None
        elif isinstance(key, rsa.RSAPublicKey):
            args, algorithm = (padding.PKCS1v15(), PROBE_DIGEST), PROBE_DIGEST
        elif isinstance(key, ec.EllipticCurvePublicKey):
            args, algorithm = (ec.ECDSA(PROBE_DIGEST),), PROBE_DIGEST
        elif isinstance(key, dsa.DSAPublicKey):
            args, algorithm = (PROBE_DIGEST,), PROBE_DIGEST
        else:
            return f"of unsupported type {type(key).__name__}"
        signature = self.sign(payload, algorithm)
        try:
            key.verify(signature, payload, *args)
        except InvalidSignature:
            return "does not match the CA certificate"
        return None


class FileSigner(Signer):
    """A private key in memory, as read from a PEM file: cryptography signs with it directly."""

    def __init__(self, private_key: CertificateIssuerPrivateKeyTypes) -> None:
        self.private_key = private_key
        self.public_key = private_key.public_key()

    def sign_certificate(self, builder: x509.CertificateBuilder, algorithm: Optional[hashes.HashAlgorithm]) -> x509.Certificate:
        return builder.sign(self.private_key, algorithm)

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder, algorithm: Optional[hashes.HashAlgorithm]) -> x509.CertificateRevocationList:
        return builder.sign(self.private_key, algorithm)

    def sign_ocsp(
        self, builder: ocsp.OCSPResponseBuilder, certificate: x509.Certificate, algorithm: Optional[hashes.HashAlgorithm]
    ) -> ocsp.OCSPResponse:
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, certificate).certificates([certificate])
        return builder.sign(self.private_key, algorithm)

    def sign(self, data: bytes, algorithm: Optional[hashes.HashAlgorithm]) -> bytes:
        key = self.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), algorithm)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(algorithm))
        if isinstance(key, dsa.DSAPrivateKey):
            return key.sign(data, algorithm)
        return key.sign(data)
