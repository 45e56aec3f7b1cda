"""The JSON shape of the store's records: devices, certificates, audit events, enrollment requests, inventory.

One shape for the admin API's answers and the CLI's ``--json`` lists, so a
script reads the same fields from either. Times are ISO 8601 in UTC with a Z.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .ca.keygen import key_type_of
from .store import AuditEvent, CertificateRecord, Device
from .store.requests import EnrollmentRequest, InventoryEntry


def iso(value: Optional[datetime]) -> Optional[str]:
    """ISO 8601 UTC with a Z (the store keeps naive UTC)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="seconds") + "Z"


def device_json(d: Device, status: Optional[str], not_after: Optional[datetime]) -> dict:
    return {
        "number": d.id,
        "name": d.device_key,
        "label": d.label,
        "first_enrolled": iso(d.first_enrolled),
        "last_enrolled": iso(d.last_enrolled),
        "current_serial": d.current_serial,
        "status": status,
        "not_after": iso(not_after),
        "requester": d.requester,
        "client_address": d.client_address,
    }


def certificate_json(c: CertificateRecord, with_pem: bool = False) -> dict:
    """A certificate's record; with ``with_pem`` its PEM too. The store holds no private key to leak."""
    body = {
        "serial": c.serial,
        "common_name": c.common_name,
        "subject": c.subject,
        "label": c.label,
        "device_number": c.device_id,
        "status": c.status,
        "operation": c.operation,
        "requester": c.requester,
        "not_before": iso(c.not_before),
        "not_after": iso(c.not_after),
        "issued_at": iso(c.issued_at),
        "revoked_at": iso(c.revoked_at),
        "revocation_reason": c.revocation_reason,
    }
    if with_pem:
        body["pem"] = x509.load_der_x509_certificate(c.der).public_bytes(Encoding.PEM).decode("ascii")
    return body


def event_json(e: AuditEvent) -> dict:
    record = {**asdict(e), "at": iso(e.at), "device_name": e.device}
    del record["device"]
    return record


def request_json(r: EnrollmentRequest, pending_hours: int, with_csr: bool = False) -> dict:
    """An enrollment request waiting for (or given) an operator's decision; ``with_csr``: its details and PEM.

    ``expires_at``: when a pending request expires undecided, or an approved one uncollected (``approval.pending_hours``).
    """
    record = {
        "id": r.id, "label": r.label, "device": r.device_key, "operation": r.operation, "status": r.status,
        "subject": r.subject, "public_key_sha256": r.public_key_hash, "requester": r.requester, "client_address": r.client_address,
        "created_at": iso(r.created_at), "decided_by": r.decided_by or None, "decided_at": iso(r.decided_at), "reason": r.reason or None,
        "expires_at": iso(r.expires_at(pending_hours)),
    }
    if with_csr:
        csr = x509.load_der_x509_csr(r.csr)
        try:
            names = [str(name.value) for name in csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
        except (x509.ExtensionNotFound, ValueError):
            names = []
        record.update(
            public_key=key_type_of(csr.public_key()) or type(csr.public_key()).__name__, subject_alt_names=names,
            csr_pem=csr.public_bytes(Encoding.PEM).decode(),
        )
    return record


def inventory_json(e: InventoryEntry) -> dict:
    return {"label": e.label, "device": e.device_key, "added_by": e.added_by, "added_at": iso(e.added_at)}
