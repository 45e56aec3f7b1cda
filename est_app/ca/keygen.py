"""Server-side key generation (serverkeygen): the key types a profile may allow."""

from __future__ import annotations

from typing import Callable, Optional

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

GENERATORS: dict[str, Callable[[], CertificateIssuerPrivateKeyTypes]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    "rsa-3072": lambda: rsa.generate_private_key(65537, 3072),
}


def key_type_of(public_key: object) -> Optional[str]:
    """The catalogue name of a public key's type (``rsa-4096`` for keys outside it), or None."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}.get(public_key.curve.name)
    return None


def generate_key(key_type: str) -> CertificateIssuerPrivateKeyTypes:
    return GENERATORS[key_type]()
