"""An RFC 6960 OCSP responder over the store's view of certificate status.

One responder for every configured CA: the request's issuerNameHash and
issuerKeyHash choose the CA, and the answer is about certificates that CA
issued, signed by it or by its own delegated responder certificate (issued
by it, EKU OCSPSigning). A request about any other issuer gets
``unauthorized``; anything unparsable gets ``malformedRequest``, never an
exception; a CA key whose token is away gets ``tryLater``.

Answers are signed ahead and reused, as large CAs do: for each (CertID,
status as read from the store) the signed bytes are kept in a bounded LRU
cache and served again until half their validity has passed (so every
answer has at least half of it left), then signed anew. Every request
still reads the status from the store (one primary-key lookup), and an
answer is reused only if that status equals the one it was signed for, so a
revocation by any process or host on the same database shows in the very
next answer without invalidation messages. Requests with a nonce, and
serials the store does not know, are signed fresh each time.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..config import ConfigError
from ..errors import BadRequest, ServiceUnavailable, parsing_client_input
from .authority import Authorities, CertificateAuthority, key_belongs_to
from .crl import REASONS
from .signers import FileSigner, Signer

# status lookup: serial (hex) -> (status, revoked_at, reason, issuer id) or None when unknown
Lookup = Callable[[str], Optional[tuple[str, Optional[datetime], Optional[str], Optional[str]]]]
HASHES = (hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512)
Responder = tuple[x509.Certificate, Optional[Signer]]  # the certificate in answers, and what signs (None: the CA)
CACHE_ENTRIES = 20_000  # signed answers kept per worker (about 1 KB each): a fleet of 10,000 pumps and room to spare


class SignedAnswer(NamedTuple):
    """A signed OCSP response, the store status it says, its thisUpdate, and when to sign it again."""

    status: tuple
    der: bytes
    this_update: datetime
    renew_at: datetime


class OCSPResponder:
    def __init__(
        self,
        authorities: Authorities,
        lookup: Lookup,
        signers: Optional[dict[str, Responder]] = None,
        validity: timedelta = timedelta(hours=1),
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        """``signers``: delegated responders by the issuer id of the CA that certified each; the other CAs sign themselves."""
        self.authorities = authorities
        self.lookup = lookup
        self.validity = validity
        self.cache_entries = cache_entries
        # (hash name, issuer name hash, issuer key hash, serial) -> the answer last signed for it, least recently used first
        self._answers: OrderedDict[tuple[str, bytes, bytes, int], SignedAnswer] = OrderedDict()
        self._answers_lock = threading.Lock()
        # (hash name, issuer name hash, issuer key hash) that identify a CA in a request -> (CA, signer)
        self._issuers: dict[tuple[str, bytes, bytes], tuple[CertificateAuthority, Responder]] = {}
        for authority in authorities:
            signer = (signers or {}).get(authority.issuer_id) or (authority.certificate, None)  # None: the CA's own key
            for algorithm in HASHES:
                probe = ocsp.OCSPRequestBuilder().add_certificate(authority.certificate, authority.certificate, algorithm()).build()
                # The probe's name hash is of the certificate's issuer: the CA's own name only for a root.
                name_hash = hashlib.new(algorithm.name, authority.certificate.subject.public_bytes()).digest()
                self._issuers[(algorithm.name, name_hash, probe.issuer_key_hash)] = (authority, signer)

    def respond(self, request_der: bytes, now: datetime) -> bytes:
        try:  # unparsable, several requests, unsupported hash, values no answer can carry: all malformed
            with parsing_client_input("OCSP request is malformed"):
                request = ocsp.load_der_ocsp_request(request_der)
                algorithm = request.hash_algorithm
                key = (algorithm.name, request.issuer_name_hash, request.issuer_key_hash)
                serial = request.serial_number
                extensions = list(request.extensions)
                if serial < 0 or {len(request.issuer_name_hash), len(request.issuer_key_hash)} != {algorithm.digest_size}:
                    raise ValueError("negative serial, or issuer hashes not of the hash algorithm's size")
        except BadRequest:
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        issuer = self._issuers.get(key)
        if issuer is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        authority, (signer_certificate, signer) = issuer
        if signer is None:
            signer = authority.signer  # loaded at first use when the CA defers it (the CLI)
        found = self.lookup(format(serial, "x"))
        nonce = next((e.value for e in extensions if isinstance(e.value, x509.OCSPNonce)), None)
        cache_key = (*key, serial) if nonce is None and found is not None else None
        if cache_key is not None:
            cached = self._cached(cache_key, tuple(found), now)
            if cached is not None:
                return cached
        revoked_at = reason = None
        if found is None or self.authorities.issuer_of(found[3]) is not authority:
            status = ocsp.OCSPCertStatus.UNKNOWN
        elif found[0] == "revoked":
            status, revoked_at = ocsp.OCSPCertStatus.REVOKED, found[1]
            reason = REASONS[found[2]] if found[2] and found[2] != "unspecified" else None
        else:
            status = ocsp.OCSPCertStatus.GOOD
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            request.issuer_name_hash, request.issuer_key_hash, serial, algorithm, status, now, now + self.validity, revoked_at, reason
        )
        if nonce is not None:
            builder = builder.add_extension(nonce, critical=False)
        digest = None if isinstance(signer.public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) else hashes.SHA256()
        try:
            der = signer.sign_ocsp(builder, signer_certificate, digest).public_bytes(serialization.Encoding.DER)
        except ServiceUnavailable:  # the token is away: relying parties ask again later
            return _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
        if cache_key is not None:
            self._keep(cache_key, SignedAnswer(tuple(found), der, now, now + self.validity / 2))
        return der

    def _cached(self, cache_key: tuple, status: tuple, now: datetime) -> Optional[bytes]:
        """The answer signed for ``cache_key`` if it says ``status`` and is not due for renewal."""
        with self._answers_lock:
            answer = self._answers.get(cache_key)
            if answer is None or answer.status != status or not answer.this_update <= now < answer.renew_at:
                return None
            self._answers.move_to_end(cache_key)
            return answer.der

    def _keep(self, cache_key: tuple, answer: SignedAnswer) -> None:
        with self._answers_lock:
            self._answers[cache_key] = answer
            self._answers.move_to_end(cache_key)
            while len(self._answers) > self.cache_entries:
                self._answers.popitem(last=False)

    def cached_answers(self) -> int:
        """How many signed answers the cache holds."""
        return len(self._answers)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


def load_signer(cert_path: Path, key_path: Path, authority: CertificateAuthority) -> Responder:
    """A delegated responder: issued by the CA, with EKU OCSPSigning; its key unencrypted PEM."""
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    try:
        certificate.verify_directly_issued_by(authority.certificate)
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        usages = []
    if ExtendedKeyUsageOID.OCSP_SIGNING not in usages:
        raise ConfigError(f"{authority.name}.ocsp_responder_cert_file {cert_path}: must be issued by the CA with EKU OCSPSigning")
    if not key_belongs_to(key, certificate):
        where = authority.name
        raise ConfigError(f"{where}.ocsp_responder_key_file {key_path} does not belong to {where}.ocsp_responder_cert_file {cert_path}")
    return certificate, FileSigner(key)
