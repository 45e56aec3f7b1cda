"""Test material made on the spot: keys and CSRs of every shape the tests need."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def ec_key(curve: ec.EllipticCurve | None = None):
    return _EC_KEY if curve is None else ec.generate_private_key(curve)


def rsa_key(bits: int = 2048):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_csr(cn: str | None = "NPPBBB4", key=None, extensions: list[tuple[x509.ExtensionType, bool]] = (), name: x509.Name | None = None) -> x509.CertificateSigningRequest:
    key = key or ec_key()
    if name is None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256())


def der(obj) -> bytes:
    return obj.public_bytes(serialization.Encoding.DER)


def pem(obj) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def encrypt_key_file(source, target, passphrase: bytes) -> None:
    """Write the unencrypted PEM key at ``source`` to ``target``, encrypted with ``passphrase``."""
    key = serialization.load_pem_private_key(source.read_bytes(), None)
    target.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(passphrase)))


def ca_signer(pki_dir):
    """What signs for the CA `est init` made in ``pki_dir`` (its key in a file or a token), loaded as the server loads it."""
    from est_app.ca.authority import load_authority
    from est_app.config import load_config

    return load_authority(load_config(pki_dir / "config.yaml").ca).signer
