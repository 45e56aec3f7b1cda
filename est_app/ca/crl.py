"""Certificate revocation lists signed by the CA (RFC 5280 section 5)."""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .authority import CertificateAuthority

# RFC 5280 reason names (as operators type them) -> cryptography's flags.
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}


def build_crl(
    authority: CertificateAuthority,
    revoked: list[tuple[str, datetime, str]],
    number: int,
    this_update: datetime,
    lifetime: timedelta,
) -> tuple[datetime, datetime, bytes]:
    """Sign a CRL of ``revoked`` (serial hex, time, reason name); returns (thisUpdate, nextUpdate, DER)."""
    next_update = this_update + lifetime
    entries = []
    for serial, revoked_at, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(revoked_at)
        if reason and reason != "unspecified":  # RFC 5280: omit the reason code rather than say unspecified
            entry = entry.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
        entries.append(entry.build())
    # One list for the builder: add_revoked_certificate() copies the whole list on every call (quadratic).
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=authority.certificate.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=[
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            x509.Extension(x509.AuthorityKeyIdentifier.oid, False, authority.authority_key_identifier),
        ],
        revoked_certificates=entries,
    )
    crl = authority.signer.sign_crl(builder, authority.digest)
    return this_update, next_update, crl.public_bytes(Encoding.DER)
