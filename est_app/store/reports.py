"""Read-only queries for the operator surfaces (admin API, dashboard, metrics).

Lists are keyset-paginated (``after`` = the last id or serial of the previous
page), so page N costs the same as page 1 however many devices there are.
Every filter maps to an index. The device list filters on the current
certificate's status and expiry as the device row keeps them (revision 0002),
and finds substrings through the trigram index (PostgreSQL: pg_trgm, which
LIKE uses; SQLite: the FTS5 table ``devices_search`` gives candidates, LIKE
decides); the certificate list's common-name substring search is a scan.

Operators name a device two ways, and every surface (CLI, admin API,
dashboard) resolves them through :meth:`Reports.find_device`: the **device
name** (the identity on its label: CN, serialNumber or SAN, e.g. ``NPPBBB4``)
and the **device number** (the registry's row number).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import AuditEvent, CertificateRecord, Device, utcnow
from .schema import audit_events, certificates, devices


MAX_ID = 2**63 - 1  # the largest integer key SQLite and PostgreSQL hold
# SQLite's FTS5 trigram index of devices.device_key (revision 0002; no such table on PostgreSQL).
_devices_search = sa.table("devices_search", sa.column("rowid"), sa.column("devices_search"))


@dataclass(frozen=True)
class DeviceSummary(Device):
    status: Optional[str] = None  # the current certificate's
    not_after: Optional[datetime] = None
    revoked_at: Optional[datetime] = None


class DeviceNotFound(LookupError):
    """No device has this name or number (on the label, if one was given)."""


class AmbiguousDevice(LookupError):
    """The reference fits several devices; ``candidates`` lists them, ``labels`` their labels."""

    def __init__(self, message: str, candidates: list[Device]) -> None:
        super().__init__(message)
        self.candidates = candidates
        self.labels = sorted({d.label for d in candidates})


@dataclass(frozen=True)
class Page:
    items: list
    next_after: Optional[str]  # pass as ``after`` for the next page; None on the last
    total: int


class Reports:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def find_device(self, reference: str, label: Optional[str] = None) -> Device:
        """The one device ``reference`` names: all digits, its device number; otherwise its name.

        With ``label`` the reference is always a name on that label, which is how a device
        whose name is all digits is reached. A number never falls back to a name: a retried
        delete of a device number that is gone must not find another pump named like it.
        A name enrolled on several labels raises :class:`AmbiguousDevice` with a one-line
        message listing them; nothing found raises :class:`DeviceNotFound`.
        """
        text = reference.strip()
        by_number = label is None and text.isascii() and text.isdigit()
        if by_number:
            match = devices.c.id == int(text) if int(text) <= MAX_ID else sa.false()
        else:
            match = devices.c.device_key == text
            if label is not None:
                match = sa.and_(match, devices.c.label == label)
        query = devices.select().where(match).order_by(devices.c.label, devices.c.id)
        with self.engine.connect() as conn:
            found = [Device(**row._mapping) for row in conn.execute(query.limit(20))]
        if not found:
            if by_number:
                raise DeviceNotFound(f"no device number {text} (a name of digits only is looked up with its label)")
            on_label = f" on label {label!r}" if label is not None else ""
            raise DeviceNotFound(f"no device named {text!r}{on_label}")
        if len(found) > 1:
            listed = "; ".join(f"number {d.id} on label {d.label!r}" for d in found)
            raise AmbiguousDevice(f"{text!r} fits {len(found)} devices ({listed}): give the label, or the number", found)
        return found[0]

    def devices(
        self,
        *,
        search: Optional[str] = None,
        label: Optional[str] = None,
        status: Optional[str] = None,
        expires_within_days: Optional[int] = None,
        after: Optional[int] = None,
        limit: int = 50,
    ) -> Page:
        """Devices by id (newest first), with their current certificate's status and expiry."""
        current = certificates.alias("current")
        joined = devices.outerjoin(current, current.c.serial == devices.c.current_serial)
        where = _filters(devices.c.label, devices.c.current_status, devices.c.current_not_after, label, status, expires_within_days)
        if search:
            term = search.strip()
            match = self._device_key_contains(term)
            where.append(sa.or_(match, devices.c.id == int(term)) if term.isascii() and term.isdigit() and len(term) <= 18 else match)
        count = sa.select(sa.func.count()).select_from(devices).where(*where)
        if after is not None:
            where.append(devices.c.id < min(after, MAX_ID))
        # The page's ids first, from the indexes alone; then only those rows joined to their certificate.
        page = sa.select(devices.c.id).where(*where).order_by(devices.c.id.desc()).limit(limit + 1)
        columns = [*devices.c, current.c.status, current.c.not_after, current.c.revoked_at]
        query = sa.select(*columns).select_from(joined).where(devices.c.id.in_(page.scalar_subquery())).order_by(devices.c.id.desc())
        return self._page(query, count, limit, DeviceSummary, lambda d: str(d.id))

    def _device_key_contains(self, term: str):
        """``device_key LIKE '%term%'``; on SQLite only among the trigram index's candidates (3+ characters:
        FTS5 trigrams match nothing shorter; no NUL, which ends an FTS5 query). The index folds case at
        least as LIKE does, so it never drops a match."""
        contains = devices.c.device_key.contains(term, autoescape=True)
        if self.engine.dialect.name != "sqlite" or len(term) < 3 or "\x00" in term:
            return contains
        phrase = '"' + term.replace('"', '""') + '"'
        candidates = sa.select(_devices_search.c.rowid).where(_devices_search.c.devices_search.op("MATCH")(phrase))
        return sa.and_(devices.c.id.in_(candidates), contains)

    def certificates(
        self,
        *,
        search: Optional[str] = None,
        label: Optional[str] = None,
        status: Optional[str] = None,
        expires_within_days: Optional[int] = None,
        after: Optional[str] = None,
        limit: int = 50,
    ) -> Page:
        """Certificates, newest issue first (``after`` is the last serial of the previous page)."""
        where = _filters(certificates.c.label, certificates.c.status, certificates.c.not_after, label, status, expires_within_days)
        if search:
            term = search.strip()
            where.append(sa.or_(certificates.c.common_name.contains(term, autoescape=True), certificates.c.serial == term.lower()))
        order = (certificates.c.issued_at.desc(), certificates.c.serial.desc())
        query = certificates.select().where(*where).order_by(*order).limit(limit + 1)
        if after is not None:
            anchor = sa.select(certificates.c.issued_at).where(certificates.c.serial == after).scalar_subquery()
            query = query.where(
                sa.or_(certificates.c.issued_at < anchor, sa.and_(certificates.c.issued_at == anchor, certificates.c.serial < after))
            )
        count = sa.select(sa.func.count()).select_from(certificates).where(*where)
        return self._page(query, count, limit, CertificateRecord, lambda c: c.serial)

    def _page(self, query, count, limit: int, row_type, cursor) -> Page:
        """Run a list query fetched with ``limit + 1`` rows and its count; the extra row says there is more."""
        with self.engine.connect() as conn:
            rows = [row_type(**row._mapping) for row in conn.execute(query)]
            total = conn.execute(count).scalar_one()
        return Page(rows[:limit], cursor(rows[limit - 1]) if len(rows) > limit else None, total)

    def statistics(self, days: int = 30) -> dict:
        """Counts for the overview: devices, certificates by status, issued per day, expiring soon."""
        now = utcnow()
        since = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
        valid = certificates.c.status == "valid"
        count = sa.func.count()
        with self.engine.connect() as conn:
            # valid = all - superseded - revoked: counting all rows reads the smallest index, and the
            # other two are short ranges of the status index (one GROUP BY reads the whole big one).
            total = conn.execute(sa.select(count).select_from(certificates)).scalar_one()
            by_status = dict(
                conn.execute(
                    sa.select(certificates.c.status, count).where(certificates.c.status.in_(("superseded", "revoked"))).group_by(certificates.c.status)
                ).all()
            )
            by_status["valid"] = total - sum(by_status.values())
            # One range count per day (30 scalar subqueries, one statement): reads the issued_at
            # index, no date() per row, no temporary B-tree.
            starts = [since + timedelta(days=i) for i in range(days + 1)]
            ranges = [
                sa.select(count).select_from(certificates).where(certificates.c.issued_at >= a, certificates.c.issued_at < b).scalar_subquery()
                for a, b in zip(starts, starts[1:])
            ]
            per_day = dict(zip((a.date().isoformat() for a in starts), conn.execute(sa.select(*ranges)).one()))
            expiring = {
                window: conn.execute(
                    sa.select(sa.func.count()).where(valid, certificates.c.not_after.between(now, now + timedelta(days=window)))
                ).scalar_one()
                for window in (30, 60, 90)
            }
            device_count = conn.execute(sa.select(sa.func.count()).select_from(devices)).scalar_one()
        dates = [(since + timedelta(days=i)).date().isoformat() for i in range(days)]
        return {
            "devices": device_count,
            "certificates": {s: by_status.get(s, 0) for s in ("valid", "superseded", "revoked")},
            "issued_per_day": [{"date": d, "count": per_day.get(d, 0)} for d in dates],
            "expiring": {f"{w}d": n for w, n in expiring.items()},
        }

    def events(self, *, after: Optional[int] = None, limit: int = 50) -> Page:
        """The audit trail, newest first (``after`` is the last event id of the previous page)."""
        query = audit_events.select().order_by(audit_events.c.id.desc()).limit(limit + 1)
        if after is not None:
            query = query.where(audit_events.c.id < after)
        count = sa.select(sa.func.count()).select_from(audit_events)
        return self._page(query, count, limit, AuditEvent, lambda e: str(e.id))

    def recent_events(self, limit: int = 20, device: Optional[str] = None) -> list[AuditEvent]:
        query = audit_events.select().order_by(audit_events.c.id.desc()).limit(limit)
        if device is not None:
            query = query.where(audit_events.c.device == device)
        with self.engine.connect() as conn:
            return [AuditEvent(**row._mapping) for row in conn.execute(query)]


def _filters(label_column, status_column, not_after_column, label: Optional[str], status: Optional[str], expires_within_days: Optional[int]) -> list:
    """The label, status and expiry-window conditions both lists share."""
    where = []
    if label:
        where.append(label_column == label)
    if status:
        where.append(status_column == status)
    if expires_within_days is not None:
        now = utcnow()
        where.append(not_after_column.between(now, now + timedelta(days=expires_within_days)))
    return where
