"""Enrollment requests waiting for an operator, and the asset inventory (tables of revision 0003).

Functions taking the :class:`~est_app.store.Store`, so the store class stays readable. The
request a device's next try finds is its newest on the label; :func:`settle_request` reads
and writes it in one write transaction (BEGIN IMMEDIATE on SQLite, the device's advisory
lock on PostgreSQL), so two workers answering one device's retries take turns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Callable, Optional, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import AuditEvent, Store, _insert_audit, utcnow
from .schema import enrollment_requests, inventory

REQUEST_STATUSES = ("pending", "approved", "rejected", "collected", "expired")
T = TypeVar("T")


@dataclass(frozen=True)
class EnrollmentRequest:
    id: int
    label: str
    device_key: str
    csr: bytes  # DER
    public_key_hash: str
    subject: str
    operation: str
    requester: str
    client_address: str
    status: str
    reason: str
    decided_by: str
    created_at: datetime
    decided_at: Optional[datetime]

    def expires_at(self, hours: int) -> Optional[datetime]:
        """When a pending request expires undecided, or an approved one uncollected (``hours`` after it was filed or approved)."""
        start = {"pending": self.created_at, "approved": self.decided_at}.get(self.status)
        return start + timedelta(hours=hours) if start is not None else None

    def as_of(self, hours: int, now: Optional[datetime] = None) -> "EnrollmentRequest":
        """The request as it stands ``now``: expired once past :meth:`expires_at`, even before a device's try records it."""
        deadline = self.expires_at(hours)
        return replace(self, status="expired") if deadline is not None and (now or utcnow()) >= deadline else self


@dataclass(frozen=True)
class InventoryEntry:
    id: int
    label: str
    device_key: str
    added_by: str
    added_at: datetime


class AlreadyDecided(Exception):
    """The request is no longer pending (approved, rejected, collected or expired)."""

    def __init__(self, request: EnrollmentRequest) -> None:
        super().__init__(request.status)
        self.request = request


class RequestWriter:
    """Writes within :func:`settle_request`'s transaction, on the device's newest request."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def add(self, values: dict, audit: Callable[[EnrollmentRequest], AuditEvent]) -> EnrollmentRequest:
        """A new pending request; ``audit`` makes its audit row from it (the row names the new id)."""
        values = {**values, "status": "pending", "reason": "", "decided_by": "", "created_at": utcnow(), "decided_at": None}
        request_id = self.conn.execute(enrollment_requests.insert(), values).inserted_primary_key[0]
        request = EnrollmentRequest(id=request_id, **values)
        _insert_audit(self.conn, audit(request))
        return request

    def replace(self, request_id: int, values: dict, audit: Optional[AuditEvent]) -> EnrollmentRequest:
        """Another CSR for the device: the request waits again, with the new CSR, from now."""
        values = {**values, "status": "pending", "reason": "", "decided_by": "", "created_at": utcnow(), "decided_at": None}
        self.conn.execute(enrollment_requests.update().where(enrollment_requests.c.id == request_id).values(**values))
        _insert_audit(self.conn, audit)
        return EnrollmentRequest(id=request_id, **values)

    def set_status(self, request_id: int, status: str, audit: Optional[AuditEvent], reason: Optional[str] = None) -> None:
        values = {"status": status, **({"reason": reason} if reason is not None else {})}
        self.conn.execute(enrollment_requests.update().where(enrollment_requests.c.id == request_id).values(**values))
        _insert_audit(self.conn, audit)


def settle_request(store: Store, label: str, device_key: str, decide: Callable[[Optional[EnrollmentRequest], RequestWriter], T]) -> T:
    """Run ``decide(newest request of the device on the label or None, writer)`` in one write transaction."""
    with store._write() as conn:
        store._enrollment.lock_device_key(conn, device_key)
        row = conn.execute(_NEWEST, {"label": label, "device_key": device_key}).first()
        return decide(EnrollmentRequest(**row._mapping) if row else None, RequestWriter(conn))


def get_request(store: Store, request_id: int) -> Optional[EnrollmentRequest]:
    return store._one(enrollment_requests.select().where(enrollment_requests.c.id == request_id), EnrollmentRequest)


def list_requests(store: Store, status: Optional[str], expiry_hours: int, limit: int = 1000) -> list[EnrollmentRequest]:
    """Requests as they stand now (:meth:`EnrollmentRequest.as_of`), oldest first (``status`` None: every status)."""
    cutoff = utcnow() - timedelta(hours=expiry_hours)
    c = enrollment_requests.c
    overdue = sa.or_(sa.and_(c.status == "pending", c.created_at <= cutoff), sa.and_(c.status == "approved", c.decided_at <= cutoff))
    query = enrollment_requests.select().order_by(c.id).limit(limit)
    if status == "expired":
        query = query.where(sa.or_(c.status == "expired", overdue))
    elif status is not None:
        query = query.where(c.status == status, sa.not_(overdue))
    with store.engine.connect() as conn:
        return [EnrollmentRequest(**row._mapping).as_of(expiry_hours) for row in conn.execute(query)]


def decide_request(
    store: Store, request_id: int, approve: bool, decided_by: str, reason: str, audit: AuditEvent, expiry_hours: int
) -> EnrollmentRequest:
    """An operator's decision on a pending request; raises LookupError (no such request) or AlreadyDecided (expired included)."""
    with store._write() as conn:
        row = conn.execute(enrollment_requests.select().where(enrollment_requests.c.id == request_id).with_for_update()).first()
        if row is None:
            raise LookupError(request_id)
        request = EnrollmentRequest(**row._mapping).as_of(expiry_hours)
        if request.status != "pending":
            raise AlreadyDecided(request)
        values = {"status": "approved" if approve else "rejected", "reason": reason, "decided_by": decided_by, "decided_at": utcnow()}
        conn.execute(enrollment_requests.update().where(enrollment_requests.c.id == request_id).values(**values))
        _insert_audit(conn, audit)
        return EnrollmentRequest(**{**row._mapping, **values})


def change_status(store: Store, request_id: int, status_from: str, status_to: str, audit: Optional[AuditEvent] = None) -> bool:
    """Move a request from one status to another if it is still in the first (a checked row count)."""
    with store._write() as conn:
        changed = conn.execute(
            enrollment_requests.update()
            .where(enrollment_requests.c.id == request_id, enrollment_requests.c.status == status_from)
            .values(status=status_to)
        ).rowcount
        if changed:
            _insert_audit(conn, audit)
        return changed == 1


# the inventory

def in_inventory(store: Store, label: str, device_key: str) -> bool:
    with store.engine.connect() as conn:
        return conn.execute(_INVENTORY_HAS, {"label": label, "device_key": device_key}).first() is not None


def list_inventory(store: Store, label: Optional[str] = None) -> list[InventoryEntry]:
    query = inventory.select().order_by(inventory.c.label, inventory.c.device_key)
    if label is not None:
        query = query.where(inventory.c.label == label)
    with store.engine.connect() as conn:
        return [InventoryEntry(**row._mapping) for row in conn.execute(query)]


def add_to_inventory(store: Store, label: str, device_keys: list[str], added_by: str, audit: AuditEvent) -> int:
    """Add devices (those listed already are left as they are); returns how many were new. One audit row for the lot."""
    with store._write() as conn:
        present = set(conn.execute(sa.select(inventory.c.device_key).where(inventory.c.label == label)).scalars())
        new = sorted(set(device_keys) - present)
        if new:
            now = utcnow()
            conn.execute(inventory.insert(), [{"label": label, "device_key": k, "added_by": added_by, "added_at": now} for k in new])
            _insert_audit(conn, audit)
        return len(new)


def remove_from_inventory(store: Store, label: str, device_key: str, audit: AuditEvent) -> bool:
    with store._write() as conn:
        removed = conn.execute(inventory.delete().where(inventory.c.label == label, inventory.c.device_key == device_key)).rowcount > 0
        if removed:
            _insert_audit(conn, audit)
        return removed


_NEWEST = (
    enrollment_requests.select()
    .where(enrollment_requests.c.label == sa.bindparam("label"), enrollment_requests.c.device_key == sa.bindparam("device_key"))
    .order_by(enrollment_requests.c.id.desc())
    .limit(1)
    .with_for_update()
)
_INVENTORY_HAS = sa.select(inventory.c.id).where(inventory.c.label == sa.bindparam("label"), inventory.c.device_key == sa.bindparam("device_key"))
