"""The store's records (plain dataclasses, what its methods take and return) and the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Optional


class UserExists(Exception):
    pass


class SchemaOutdated(Exception):
    """The database was made by an older version of est_app and needs migrating."""


class SerialTaken(Exception):
    """A serial number collided with one already stored (vanishingly rare; draw again)."""


class DeviceExists(Exception):
    """The label's duplicate policy is ``reject`` and the device is enrolled already."""

    def __init__(self, device: "Device") -> None:
        super().__init__(device.device_key)
        self.device = device


class DeviceOnOtherLabel(Exception):
    """The device id is enrolled on another label: one identity has one owner."""

    def __init__(self, device: "Device") -> None:
        super().__init__(device.device_key)
        self.device = device


class Orphaned(Exception):
    """The certificate to be replaced belongs to no device (the device was deleted)."""


class NotCurrent(Exception):
    """The certificate to be replaced is unknown, revoked or already superseded."""

    def __init__(self, status: Optional[str]) -> None:
        super().__init__(status)
        self.status = status


class AlreadyIssued(Exception):
    """The device's current certificate answers this very request already (a retry): nothing was written."""

    def __init__(self, record: "CertificateRecord") -> None:
        super().__init__(record.serial)
        self.record = record


class NotFound(Exception):
    pass


class AlreadyRevoked(Exception):
    pass


@dataclass(frozen=True)
class User:
    id: int
    name: str
    password_hash: str
    role: str
    created_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class AuditEvent:
    """One security-relevant event. Never holds a private key or a password."""

    event: str
    outcome: str = "ok"
    actor: str = ""
    client_address: str = ""
    label: str = ""
    device: str = ""
    serial: str = ""
    detail: str = ""
    at: Optional[datetime] = None
    id: Optional[int] = None


@dataclass(frozen=True)
class StoredSession:
    """A signed-in dashboard session, found by the SHA-256 of its cookie's token."""

    token_hash: str
    user_id: int
    data: str
    created_at: datetime
    last_seen: datetime


@dataclass(frozen=True)
class AuthFailures:
    """Failed password checks of one subject (``account:NAME`` or ``address:IP``) and its back-off."""

    subject: str
    failures: int
    last_failure: datetime
    blocked_until: datetime


@dataclass(frozen=True)
class CRLRecord:
    number: int
    this_update: datetime
    next_update: datetime
    der: bytes
    issuer: Optional[str] = None


@dataclass(frozen=True)
class RAClient:
    id: int
    fingerprint: str
    subject: str
    labels: str
    created_at: datetime

    @property
    def label_set(self) -> frozenset[str]:
        return frozenset(self.labels.split(" ")) if self.labels != "" else frozenset()


@dataclass(frozen=True)
class Device:
    id: int
    label: str
    device_key: str
    first_enrolled: datetime
    last_enrolled: datetime
    current_serial: str
    requester: str
    client_address: str
    # The current certificate's status and notAfter as the device row keeps them (for the registry's filters).
    current_status: Optional[str] = None
    current_not_after: Optional[datetime] = None


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    common_name: str
    subject: str
    label: str
    requester: str
    operation: str
    not_before: datetime
    not_after: datetime
    der: bytes
    status: str = "valid"
    device_id: Optional[int] = None
    issued_at: Optional[datetime] = None
    revoked_at: Optional[datetime] = None
    revocation_reason: Optional[str] = None
    issuer: Optional[str] = None  # the issuing CA's id; None on records from before it was kept
