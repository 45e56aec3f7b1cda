"""A CA key inside a PKCS#11 token: :class:`PKCS11Signer`, and generating such a key (``est-admin init``).

The key never leaves the token. cryptography's builders sign only with its own
keys, so each certificate, CRL and OCSP response is built and signed with a
throwaway key of the CA key's family (which puts the right signatureAlgorithm
into the to-be-signed part), then its TBS bytes are signed in the token and
the outer structure is reassembled with asn1crypto around the token's
signature. ECDSA is CKM_ECDSA over a digest computed here (SoftHSM 2.6 and
many HSMs lack CKM_ECDSA_SHA256), its r || s put into DER by cryptography
(a tenth of the cost of pkcs11.util.ec's asn1crypto encoder); RSA is
CKM_SHA*_RSA_PKCS (PKCS#1 v1.5).

Sessions: a process logs in to a token once, so every CA in the same token
shares one :class:`TokenSession` per process, opened at first use and again
after a fork (keyed on the process id; a session never crosses a fork). Its
lock serialises the token's operations across the app's threads (signing
takes well under a millisecond on SoftHSM). When an operation fails the
session is dropped and the operation retried once on a new one, after
re-initialising the module (SoftHSM, like a re-plugged USB token, is only
found again after C_Finalize/C_Initialize); when that fails too the token is
unavailable: :class:`~.signers.KeyUnavailable` (a 503), and the next
use tries again. Nothing logs in per request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional, TypeVar

from asn1crypto import core as asn1_core
from asn1crypto import crl as asn1_crl
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from ..config import ConfigError, read_secret_file
from .signers import PROBE_DIGEST, KeyUnavailable, Signer

log = logging.getLogger(__name__)
T = TypeVar("T")
CURVE_OIDS = {"ec-p256": "1.2.840.10045.3.1.7", "ec-p384": "1.3.132.0.34"}
# RFC 7512 path attributes this server understands; anything else in the URI is refused, not ignored.
URI_ATTRIBUTES = frozenset({"token", "object", "id", "serial", "manufacturer", "model", "type"})
RETRY_AFTER = 30  # seconds a client is told to wait while the token is away
START_WAITS = (0.2, 0.5, 1.0)  # seconds between start-up checks of a token that does not answer


@dataclass(frozen=True)
class PKCS11URI:
    """The parts of an RFC 7512 URI that name one private key: its token and its label and/or id."""

    token: str
    object: Optional[str] = None
    id: Optional[bytes] = None
    serial: Optional[str] = None

    @classmethod
    def parse(cls, uri: str, where: str = "ca.key") -> "PKCS11URI":
        scheme, _, rest = uri.partition(":")
        path, _, query = rest.partition("?")
        if scheme != "pkcs11":
            raise ConfigError(f"{where}: {uri!r} is not a pkcs11: URI")
        if "pin-value" in query or "pin-source" in query:
            raise ConfigError(f"{where}: the PIN never goes in the configuration; give it with pin_file (a file or a systemd credential)")
        if query:
            raise ConfigError(f"{where}: query attributes ({query!r}) are not supported; the module comes from pkcs11_module")
        raw: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, equals, value = part.partition("=")
            if not equals or name not in URI_ATTRIBUTES:
                raise ConfigError(f"{where}: {part!r} is not one of the attributes {', '.join(sorted(URI_ATTRIBUTES))}")
            raw[name] = value
        values = {name: urllib.parse.unquote(value) for name, value in raw.items()}
        if values.get("type", "private") != "private":
            raise ConfigError(f"{where}: type={values['type']} names no private key; leave type out or write type=private")
        if "token" not in values or not ("object" in values or "id" in values):
            raise ConfigError(f"{where}: name the token and the key, e.g. pkcs11:token=est-ca;object=issuing-ca")
        key_id = urllib.parse.unquote_to_bytes(raw["id"]) if "id" in raw else None  # CKA_ID is bytes: %-encoded octets
        return cls(values["token"], values.get("object"), key_id, values.get("serial"))


class _Module:
    """One PKCS#11 module (shared library) in this process: C_Initialize once per process, again on request.

    ``generation`` counts initialisations, so that of several sessions failing at once only the
    first re-initialises the module (which closes every session of this process on it).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.generation = 0
        self._pid: Optional[int] = None
        self._lib = None
        self._lock = threading.Lock()

    def library(self, failed_generation: Optional[int] = None):
        """The initialised library and its generation; re-initialised after a fork or when ``failed_generation`` is current."""
        import pkcs11  # only deployments with a token install python-pkcs11 (extra [pkcs11])

        with self._lock:
            pid = os.getpid()
            if self._lib is not None and (self._pid != pid or failed_generation == self.generation):
                try:
                    self._lib.finalize()
                except pkcs11.PKCS11Error:
                    pass
                self._pid = None
            if self._pid != pid:
                self._lib = pkcs11.lib(self.path)  # python-pkcs11 calls C_Initialize when the library is not initialised
                self._pid = pid
                self.generation += 1
            return self._lib, self.generation


_modules: dict[str, _Module] = {}
_sessions: dict[tuple[str, str, Optional[str]], "TokenSession"] = {}
_registry_lock = threading.Lock()


def _module(path: Path) -> _Module:
    """The module at ``path``, by its real path: two names of one library must not initialise it twice."""
    real = os.path.realpath(path)
    with _registry_lock:
        return _modules.setdefault(real, _Module(real))


class TokenSession:
    """This process's one logged-in session on a token, shared by every key in it."""

    def __init__(self, module: _Module, uri: PKCS11URI, pin_file: Path, where: str) -> None:
        self.module, self.token_label, self.serial = module, uri.token, uri.serial
        self.pin_file, self.where = pin_file, where
        self._lock = threading.RLock()
        self._session = None
        self._pid: Optional[int] = None
        self._generation: Optional[int] = None
        self._keys: dict[tuple[Optional[str], Optional[bytes]], object] = {}
        self._refused_pin: Optional[str] = None

    @classmethod
    def shared(cls, module_path: Path, uri: PKCS11URI, pin_file: Path, where: str) -> "TokenSession":
        module = _module(module_path)
        with _registry_lock:
            session = _sessions.setdefault((module.path, uri.token, uri.serial), cls(module, uri, pin_file, where))
        if session.pin_file != pin_file:  # one login per token and process: one PIN
            raise ConfigError(f"{where}.pin_file {pin_file}: {session.where} names the same token with pin_file {session.pin_file}; name one file in both")
        return session

    def run(self, operation: Callable[[object], T], key: PKCS11URI) -> T:
        """``operation(private_key)`` on ``key``, on this process's session; ServiceUnavailable when the token is away."""
        import pkcs11

        pin_errors = (pkcs11.exceptions.PinIncorrect, pkcs11.exceptions.PinInvalid, pkcs11.exceptions.PinLenRange,
                      pkcs11.exceptions.PinLocked, pkcs11.exceptions.PinExpired)
        with self._lock:
            for attempt in (1, 2):
                try:
                    return operation(self._private_key(key, reinitialise=attempt == 2))
                except (pkcs11.PKCS11Error, ConfigError) as exc:
                    problem = f"{type(exc).__name__} {exc}".strip()
                    log.warning("PKCS#11 token %s (%s), attempt %d: %s", self.token_label, self.where, attempt, problem)
                    self._forget()
                    if isinstance(exc, (ConfigError, *pin_errors)):  # retrying cannot help; a wrong PIN again could lock the token
                        break
            raise KeyUnavailable(f"token {self.token_label!r}", problem, RETRY_AFTER)

    def _private_key(self, key: PKCS11URI, reinitialise: bool):
        import pkcs11
        from pkcs11 import ObjectClass

        if self._session is None or not self._current() or reinitialise:
            self._forget()
            lib, self._generation = self.module.library(self._generation if reinitialise else None)
            token = lib.get_token(token_label=self.token_label, **({"token_serial": self.serial} if self.serial else {}))
            pin = read_secret_file(self.pin_file, f"{self.where}.pin_file")
            if pin == self._refused_pin:
                raise ConfigError(f"{self.where}.pin_file {self.pin_file}: the token refused this PIN; it is not tried again until the file changes")
            try:
                self._session = token.open(user_pin=pin)
            except pkcs11.exceptions.UserAlreadyLoggedIn:  # a dropped session's login outlived it
                self._session = token.open()
            except (pkcs11.exceptions.PinIncorrect, pkcs11.exceptions.PinInvalid, pkcs11.exceptions.PinLenRange):
                self._refused_pin = pin  # tokens lock themselves after a few wrong PINs: never twice the same
                raise
            self._pid = os.getpid()
        found = self._keys.get((key.object, key.id))
        if found is None:
            attributes = {"object_class": ObjectClass.PRIVATE_KEY}
            if key.object is not None:
                attributes["label"] = key.object
            if key.id is not None:
                attributes["id"] = key.id
            found = self._keys[(key.object, key.id)] = self._session.get_key(**attributes)
        return found

    def _current(self) -> bool:
        """Whether the session's handles are still this process's and the module's: after a fork or a
        re-initialisation, the same handle numbers may name another session and another key."""
        return self._pid == os.getpid() and self._generation == self.module.generation

    def _forget(self) -> None:
        """Drop the session; closed (and logged out) only while its handle is still its own."""
        import pkcs11

        session, self._session, self._keys = self._session, None, {}
        if session is not None and self._current():
            try:
                session.close()
            except pkcs11.PKCS11Error:
                pass


class PKCS11Signer(Signer):
    """A CA key in a token, named by an RFC 7512 URI; ``public_key`` is the CA certificate's."""

    def __init__(self, uri: str, module_path: Path, pin_file: Path, public_key: CertificatePublicKeyTypes, where: str = "ca") -> None:
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise ConfigError(f"{where}.key: a token key must be EC (P-256, P-384) or RSA (2048, 3072), not {type(public_key).__name__}")
        self.uri = PKCS11URI.parse(uri, f"{where}.key")
        self.public_key = public_key
        self.where = where
        self._token = TokenSession.shared(module_path, self.uri, pin_file, where)

    def check(self) -> None:
        """At start-up: the key exists, stays in the token (sensitive, never extractable) and is the CA certificate's."""
        from pkcs11 import Attribute

        # Workers starting together can meet SoftHSM's file store mid-write (GeneralError, then no such
        # token): a few short waits first. A refused PIN is never tried again (TokenSession).
        first: Optional[KeyUnavailable] = None
        for wait in (*START_WAITS, None):
            try:
                extractable, sensitive = self._token.run(lambda k: (k[Attribute.EXTRACTABLE], k[Attribute.SENSITIVE]), self.uri)
                self.sign(b"est_app start-up check", PROBE_DIGEST)  # verified against the certificate inside
                break
            except KeyUnavailable as exc:
                first = first or exc  # what the token said first: the later tries only repeat it
                if wait is None:
                    raise ConfigError(f"{self.where}.key: the key {first.problem} ({first.detail})") from None
                time.sleep(wait)
        if extractable or not sensitive:
            raise ConfigError(f"{self.where}.key: the key can leave the token (CKA_EXTRACTABLE or not CKA_SENSITIVE); generate one inside it with est-admin init")

    def sign(self, data: bytes, algorithm: Optional[hashes.HashAlgorithm]) -> bytes:
        """Signed in the token, and verified here against the CA certificate before it is used.

        The check costs a verification (tens of microseconds) and catches a token whose key under
        this label is no longer the CA certificate's (re-created, swapped) before anything is issued.
        """
        from pkcs11 import Mechanism

        if algorithm is None:
            raise ValueError("a token key signs with a digest (sha256, sha384 or sha512)")
        try:
            if isinstance(self.public_key, ec.EllipticCurvePublicKey):
                digest = hashlib.new(algorithm.name, data).digest()
                raw = self._token.run(lambda k: k.sign(digest, mechanism=Mechanism.ECDSA), self.uri)  # r || s
                half = len(raw) // 2
                signature = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
                self.public_key.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))
            else:
                mechanism = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS, "sha512": Mechanism.SHA512_RSA_PKCS}[algorithm.name]
                signature = self._token.run(lambda k: k.sign(data, mechanism=mechanism), self.uri)
                self.public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            log.error("%s.key: the token's signature does not verify with %s.cert_file", self.where, self.where)
            raise KeyUnavailable(f"token {self.uri.token!r}", "its key under that label does not belong to the CA certificate") from None
        return signature

    def sign_certificate(self, builder: x509.CertificateBuilder, algorithm: Optional[hashes.HashAlgorithm]) -> x509.Certificate:
        draft = builder.sign(self._throwaway(), algorithm)
        signed = asn1_x509.Certificate.load(draft.public_bytes(serialization.Encoding.DER))
        signed["signature_value"] = self.sign(draft.tbs_certificate_bytes, algorithm)
        return x509.load_der_x509_certificate(signed.dump())

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder, algorithm: Optional[hashes.HashAlgorithm]) -> x509.CertificateRevocationList:
        draft = builder.sign(self._throwaway(), algorithm)
        signed = asn1_crl.CertificateList.load(draft.public_bytes(serialization.Encoding.DER))
        signed["signature"] = self.sign(draft.tbs_certlist_bytes, algorithm)
        return x509.load_der_x509_crl(signed.dump())

    def sign_ocsp(
        self, builder: ocsp.OCSPResponseBuilder, certificate: x509.Certificate, algorithm: Optional[hashes.HashAlgorithm]
    ) -> ocsp.OCSPResponse:
        # cryptography insists that the responder certificate be the signing key's: the draft names the
        # throwaway's, then the real responderID (byKey) and certificate replace it before the TBS is signed.
        key, stand_in = self._throwaway(), throwaway_certificate(isinstance(self.public_key, ec.EllipticCurvePublicKey))
        draft = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, stand_in).certificates([stand_in]).sign(key, algorithm)
        response = asn1_ocsp.OCSPResponse.load(draft.public_bytes(serialization.Encoding.DER))
        basic = asn1_ocsp.BasicOCSPResponse.load(response["response_bytes"]["response"].contents)
        real = asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))
        basic["tbs_response_data"]["responder_id"] = asn1_ocsp.ResponderId({"by_key": real.public_key.sha1})
        basic["certs"] = [real]
        basic["signature"] = self.sign(basic["tbs_response_data"].dump(), algorithm)
        response["response_bytes"]["response"] = asn1_core.ParsableOctetString(basic.dump())
        return ocsp.load_der_ocsp_response(response.dump())

    def sign_request(self, builder: x509.CertificateSigningRequestBuilder, algorithm: hashes.HashAlgorithm) -> x509.CertificateSigningRequest:
        """The builder's CSR for this key (a new CA key's, for its parent CA), signed in the token."""
        draft = asn1_csr.CertificationRequest.load(builder.sign(self._throwaway(), algorithm).public_bytes(serialization.Encoding.DER))
        info = draft["certification_request_info"]
        info["subject_pk_info"] = asn1_keys.PublicKeyInfo.load(
            self.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        draft["signature"] = self.sign(info.dump(), algorithm)
        return x509.load_der_x509_csr(draft.dump())

    def _throwaway(self):
        """A key of the CA key's family, only to have cryptography build and encode; its signature is replaced."""
        return throwaway_key(isinstance(self.public_key, ec.EllipticCurvePublicKey))


_throwaway_keys: dict[bool, object] = {}


def throwaway_key(elliptic: bool):
    """One cached key per family: P-256 for EC CAs (any curve gets ecdsa-with-SHAx), RSA 1024 (the fastest cryptography makes) for RSA."""
    key = _throwaway_keys.get(elliptic)
    if key is None:
        key = _throwaway_keys[elliptic] = ec.generate_private_key(ec.SECP256R1()) if elliptic else rsa.generate_private_key(65537, 1024)
    return key


_throwaway_certificates: dict[bool, x509.Certificate] = {}


def throwaway_certificate(elliptic: bool) -> x509.Certificate:
    """A self-signed certificate of :func:`throwaway_key`, which cryptography's OCSP builder wants to see."""
    certificate = _throwaway_certificates.get(elliptic)
    if certificate is None:
        key = throwaway_key(elliptic)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est_app stand-in, never published")])
        now = datetime.now(timezone.utc)
        builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        builder = builder.serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
        certificate = _throwaway_certificates[elliptic] = builder.sign(key, hashes.SHA256())
    return certificate


class KeyLabelTaken(ConfigError):
    """The token holds a private key of that label already: it is never replaced."""


def key_uri(token_label: str, label: str, serial: Optional[str] = None) -> str:
    """The RFC 7512 URI naming the private key ``label`` in the token (and its serial, when given)."""
    uri = f"pkcs11:token={urllib.parse.quote(token_label, safe='')};object={urllib.parse.quote(label, safe='')}"
    return uri + (f";serial={urllib.parse.quote(serial, safe='')}" if serial else "")


def token_key_type(public_key: CertificatePublicKeyTypes, where: str) -> str:
    """The key type (ec-p256, ec-p384, rsa-2048, rsa-3072) to generate a token key like ``public_key`` as."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in ("secp256r1", "secp384r1"):
        return f"ec-p{public_key.curve.key_size}"
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size in (2048, 3072):
        return f"rsa-{public_key.key_size}"
    raise ConfigError(f"{where}: a token key is EC P-256, P-384 or RSA 2048, 3072; this CA's key is none of them")


def generate_key_in_token(module_path: Path, token_label: str, pin: str, label: str, key_type: str) -> CertificatePublicKeyTypes:
    """Generate a CA key pair inside the token (private half sensitive, never extractable); its public key.

    Refuses (KeyLabelTaken) when the token already holds a private key of that label.
    """
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    module = _module(module_path)
    try:
        lib, generation = module.library()
        try:
            token = lib.get_token(token_label=token_label)
        except pkcs11.exceptions.NoSuchToken:  # initialised since this process loaded the module: look again
            token = module.library(generation)[0].get_token(token_label=token_label)
        try:
            session = token.open(rw=True, user_pin=pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:  # this process signs with the token already (the tests)
            session = token.open(rw=True)
    except pkcs11.PKCS11Error as exc:
        raise ConfigError(f"token {token_label!r} in {module_path}: cannot log in ({type(exc).__name__} {exc})".strip()) from None
    try:
        if list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})):
            raise KeyLabelTaken(f"token {token_label!r} already holds a key labelled {label!r}; choose another --object label")
        key_id = os.urandom(16)
        private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True, Attribute.SIGN: True, Attribute.ID: key_id}
        public = {Attribute.VERIFY: True, Attribute.ID: key_id}
        if key_type.startswith("ec-"):
            parameters = session.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVE_OIDS[key_type])}, local=True)
            public_key, _ = parameters.generate_keypair(store=True, label=label, public_template=public, private_template=private)
            return serialization.load_der_public_key(encode_ec_public_key(public_key))
        public_key, _ = session.generate_keypair(
            KeyType.RSA, int(key_type.split("-")[1]), store=True, label=label, public_template=public, private_template=private
        )
        return rsa.RSAPublicNumbers(int.from_bytes(public_key[Attribute.PUBLIC_EXPONENT], "big"), int.from_bytes(public_key[Attribute.MODULUS], "big")).public_key()
    finally:
        session.close()
