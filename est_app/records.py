"""The JSON shape of the store's records: devices, certificates and audit events.

One shape for the admin API's answers and the CLI's ``--json`` lists, so a
script reads the same fields from either. Times are ISO 8601 in UTC with a Z.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .store import AuditEvent, CertificateRecord, Device


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
