"""Persistence through SQLAlchemy Core: users, RA clients, devices, certificates, dashboard
sessions and failed password checks.

SQLite (the default) runs in WAL mode with full synchronous commits, a busy
timeout, and ``BEGIN IMMEDIATE`` for writes, so several gunicorn workers can
share one file safely. On PostgreSQL (several servers on one database) the
writes that decide a device's current certificate lock what they read: the
device row and the certificate being replaced (``SELECT ... FOR UPDATE``), and
a transaction-scoped advisory lock on the device id for a device not yet
recorded; a supersede that changed no row means another writer got there first.
When the database is down or times out, methods raise SQLAlchemy's
``OperationalError`` (the app answers 503). The store knows bytes and fields, not X.509.
A process's certificate writes commit in groups, one transaction and one fsync for
many (batch.py), their statements compiled once (statements.py).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator, Literal, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import DatabaseSettings
from . import migrations
from .batch import GroupCommit, is_deadlock
from .connections import ReadConnections, WriteConnection
from .engine import create_engine, sqlite_file, writer_turn
from .records import (  # the store's records and errors, re-exported
    AlreadyIssued,
    AlreadyRevoked,
    AuditEvent,
    AuthFailures,
    CertificateRecord,
    CRLRecord,
    Device,
    DeviceExists,
    DeviceOnOtherLabel,
    NotCurrent,
    NotFound,
    Orphaned,
    RAClient,
    SchemaOutdated,
    SerialTaken,
    StoredSession,
    User,
    UserExists,
)
from .schema import admin_sessions, audit_events, auth_failures, certificates, crls, devices, ra_clients, unpublished_revocations, users
from .statements import Compiled

MAX_USER_NAME = users.c.name.type.length  # longer names are refused before any lookup


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _naive_utc(value: Optional[datetime]) -> Optional[datetime]:
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value and value.tzinfo else value


class Store:
    def __init__(self, url: str, settings: Optional[DatabaseSettings] = None) -> None:
        """``settings``: the ``database`` section (password file, timeouts); ``url`` is the one to open."""
        settings = settings or DatabaseSettings()
        self.engine = create_engine(url, settings.read_password(), settings.connect_timeout, settings.statement_timeout)
        self._writer = self.engine.execution_options(est_write=True)
        # SQLite: threads and processes take turns here rather than in SQLite's busy handler, which
        # sleeps 1, 2, 5, 10 ... 100 ms between retries (engine.WriterTurn). PostgreSQL locks rows instead.
        self._write_lock = writer_turn(self.engine, settings.statement_timeout)
        # A SQLite file's writers share one connection (connections.WriteConnection); PostgreSQL's run side by side.
        self._write_connection = WriteConnection(self.engine) if sqlite_file(self.engine) else None
        self._reads = _RequestReads(self.engine.dialect)
        self._read_connections = ReadConnections(self.engine)
        self._certificate_writes = GroupCommit(self._write)  # enrollments commit together (est_app/store/batch.py)
        self._enrollment = _EnrollmentStatements(self.engine.dialect)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), one per process at a time."""
        with self._write_lock:
            with self._write_connection.transaction() if self._write_connection else self._writer.begin() as conn:
                yield conn

    def create_schema(self) -> None:
        """At start-up: create the schema at head in an empty database; refuse (SchemaOutdated) any other not at head.

        An existing database is never upgraded here: ``est-admin db upgrade`` does it
        (:meth:`upgrade_schema`), when the operator has a backup and every host runs this version.
        """
        found = self.schema_status()
        if found.empty:
            with self._write() as conn:  # serialised: workers and hosts starting together create it once
                found = migrations.status(conn)
                if found.empty:
                    migrations.upgrade(conn)
        if found.problem:
            raise SchemaOutdated(found.problem)

    def upgrade_schema(self) -> migrations.SchemaStatus:
        """Run the migrations to head (adopting a database made before them); returns where it stood before."""
        with self._write() as conn:
            return migrations.upgrade(conn)

    def schema_status(self) -> migrations.SchemaStatus:
        """Read-only: the database's schema revision against this version's."""
        with self.engine.connect() as conn:
            return migrations.status(conn)

    def _one(self, query, cls):
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return cls(**row._mapping) if row else None

    # users

    def add_user(self, name: str, password_hash: str, role: str = "est", audit: Optional[AuditEvent] = None) -> None:
        try:
            with self._write() as conn:
                conn.execute(users.insert().values(name=name, password_hash=password_hash, role=role, created_at=utcnow()))
                _insert_audit(conn, audit)
        except sa.exc.IntegrityError:
            raise UserExists(name) from None

    def get_user(self, name: str) -> Optional[User]:
        rows = self._reads.user_by_name.read(self._read_connections, name=name)
        return User(**rows[0]) if rows else None

    def list_users(self) -> list[User]:
        with self.engine.connect() as conn:
            return [User(**row._mapping) for row in conn.execute(users.select().order_by(users.c.name))]

    def remove_user(self, name: str, audit: Optional[AuditEvent] = None) -> bool:
        """Remove a user and, in the same transaction, end their dashboard sessions."""
        with self._write() as conn:
            user_id = conn.execute(sa.select(users.c.id).where(users.c.name == name)).scalar()
            if user_id is None:
                return False
            conn.execute(admin_sessions.delete().where(admin_sessions.c.user_id == user_id))
            conn.execute(users.delete().where(users.c.id == user_id))
            _insert_audit(conn, audit)
            return True

    def set_password(self, name: str, password_hash: str, audit: Optional[AuditEvent] = None) -> bool:
        """Change a user's password and, in the same transaction, end their dashboard sessions."""
        with self._write() as conn:
            user_id = conn.execute(sa.select(users.c.id).where(users.c.name == name)).scalar()
            if user_id is None:
                return False
            conn.execute(users.update().where(users.c.id == user_id).values(password_hash=password_hash))
            conn.execute(admin_sessions.delete().where(admin_sessions.c.user_id == user_id))
            _insert_audit(conn, audit)
            return True

    # dashboard sessions

    def create_session(self, token_hash: str, user_id: int, data: str, idle_since: datetime, created_since: datetime) -> None:
        """Store a new session; sessions expired by the same limits as :meth:`get_session` are swept out."""
        now = utcnow()
        expired = sa.or_(admin_sessions.c.last_seen < idle_since, admin_sessions.c.created_at < created_since)
        with self._write() as conn:
            conn.execute(admin_sessions.delete().where(expired))
            conn.execute(admin_sessions.insert().values(token_hash=token_hash, user_id=user_id, data=data, created_at=now, last_seen=now))

    def get_session(self, token_hash: str, idle_since: datetime, created_since: datetime) -> Optional[StoredSession]:
        """The session, unless it was last seen before ``idle_since`` or created before ``created_since``."""
        query = admin_sessions.select().where(
            admin_sessions.c.token_hash == token_hash,
            admin_sessions.c.last_seen >= idle_since,
            admin_sessions.c.created_at >= created_since,
        )
        return self._one(query, StoredSession)

    def touch_session(self, token_hash: str, data: Optional[str] = None) -> None:
        """Mark the session seen now, and store its data when given."""
        values = {"last_seen": utcnow(), **({"data": data} if data is not None else {})}
        with self._write() as conn:
            conn.execute(admin_sessions.update().where(admin_sessions.c.token_hash == token_hash).values(**values))

    def end_session(self, token_hash: str) -> None:
        with self._write() as conn:
            conn.execute(admin_sessions.delete().where(admin_sessions.c.token_hash == token_hash))

    # failed password checks

    def auth_failures(self, subjects: list[str]) -> list[AuthFailures]:
        """The back-off counts of one or two subjects (an address, and an account)."""
        first, *rest = subjects
        (second,) = rest or (first,)
        return [AuthFailures(**row) for row in self._reads.auth_failures.read(self._read_connections, first=first, second=second)]

    def record_auth_failure(self, subjects: list[str], forget_before: datetime, delay: Callable[[int], timedelta]) -> list[AuthFailures]:
        """Count one failure for each subject and block it for ``delay(failures)``.

        Counts whose last failure is before ``forget_before`` (and whose block is over) start again.
        """
        now = utcnow()
        column = auth_failures.c
        for _attempt in range(3):
            try:
                with self._write() as conn:
                    conn.execute(auth_failures.delete().where(column.last_failure < forget_before, column.blocked_until <= now))
                    counted = []
                    for subject in subjects:
                        where = column.subject == subject
                        if not conn.execute(auth_failures.update().where(where).values(failures=column.failures + 1, last_failure=now)).rowcount:
                            conn.execute(auth_failures.insert().values(subject=subject, failures=1, last_failure=now, blocked_until=now))
                        failures = conn.execute(sa.select(column.failures).where(where)).scalar_one()
                        blocked_until = now + delay(failures)
                        conn.execute(auth_failures.update().where(where).values(blocked_until=blocked_until))
                        counted.append(AuthFailures(subject, failures, now, blocked_until))
                    return counted
            except sa.exc.IntegrityError:
                continue  # another server inserted the same subject first (PostgreSQL); count again
        raise RuntimeError("could not record a failed password check after three attempts")

    def clear_auth_failures(self, subject: str) -> None:
        with self._write() as conn:
            conn.execute(auth_failures.delete().where(auth_failures.c.subject == subject))

    # RA clients

    def add_ra(self, fingerprint: str, subject: str, labels: list[str], audit: Optional[AuditEvent] = None) -> RAClient:
        with self._write() as conn:
            _insert_audit(conn, audit)
            row = conn.execute(ra_clients.select().where(ra_clients.c.fingerprint == fingerprint)).first()
            values = {"subject": subject, "labels": " ".join(sorted(set(labels)))}
            if row:
                conn.execute(ra_clients.update().where(ra_clients.c.id == row.id).values(**values))
            else:
                conn.execute(ra_clients.insert().values(fingerprint=fingerprint, created_at=utcnow(), **values))
        return self.get_ra(fingerprint)

    def get_ra(self, fingerprint: str) -> Optional[RAClient]:
        return self._one(ra_clients.select().where(ra_clients.c.fingerprint == fingerprint), RAClient)

    def list_ras(self) -> list[RAClient]:
        with self.engine.connect() as conn:
            return [RAClient(**row._mapping) for row in conn.execute(ra_clients.select().order_by(ra_clients.c.id))]

    def remove_ra(self, ident: str, audit: Optional[AuditEvent] = None) -> bool:
        """Remove by numeric id or by fingerprint."""
        where = ra_clients.c.id == int(ident) if ident.isdigit() else ra_clients.c.fingerprint == ident.lower()
        with self._write() as conn:
            removed = conn.execute(ra_clients.delete().where(where)).rowcount > 0
            _insert_audit(conn, audit if removed else None)
            return removed

    # certificates and devices

    def enroll_device(
        self,
        record: CertificateRecord,
        device_key: str,
        policy: Literal["reject", "renew"],
        client_address: str,
        audit: Optional[AuditEvent] = None,
        answers_request: Optional[Callable[[CertificateRecord], bool]] = None,
    ) -> Device:
        """Commit ``record`` as the device's current certificate, superseding the previous one.

        Raises :class:`DeviceExists` under ``reject`` when the device is known, and
        :class:`DeviceOnOtherLabel` when the id is enrolled on another label only. (A
        device recorded on several labels before that check existed renews on each.)
        Raises :class:`AlreadyIssued` when ``answers_request`` accepts the device's current
        certificate: checked under the device's lock, so two identical requests issue once.
        """

        hot = self._enrollment

        def write(conn: Connection) -> Device:
            hot.lock_device_key(conn, device_key)
            rows = hot.devices_by_key.rows(conn, device_key=device_key)
            row = next((r for r in rows if r["label"] == record.label), None)
            if row is None and rows:
                raise DeviceOnOtherLabel(Device(**rows[0]))
            if row is not None and answers_request is not None:
                current = hot.certificate_by_serial.rows(conn, serial=row["current_serial"])
                if current and answers_request(existing := CertificateRecord(**current[0])):
                    raise AlreadyIssued(existing)
            if row is not None and policy == "reject":
                raise DeviceExists(Device(**row))
            values = {"last_enrolled": utcnow(), "current_serial": record.serial, "requester": record.requester, "client_address": client_address}
            if row is None:
                first_enrolled = values["last_enrolled"]
                (inserted,) = hot.insert_device.rows(conn, label=record.label, device_key=device_key, first_enrolled=first_enrolled, **values)
                device_id = inserted["id"]
            else:
                device_id, first_enrolled = row["id"], row["first_enrolled"]
                hot.supersede.execute(conn, serial_=row["current_serial"])
                hot.update_device.execute(conn, device_id=device_id, **values)
            hot.insert_certificate.execute(conn, **_certificate_values(record, device_id))
            if audit is not None:
                hot.insert_audit.execute(conn, **_audit_values(audit))
            return Device(id=device_id, label=record.label, device_key=device_key, first_enrolled=first_enrolled, **values)

        return self._write_certificate(write, record.serial)

    def replace_certificate(
        self, old_serial: str, record: CertificateRecord, client_address: str, audit: Optional[AuditEvent] = None
    ) -> None:
        """Re-enrollment: ``record`` supersedes the valid certificate ``old_serial`` (and its device's pointer).

        Raises :class:`NotCurrent` when that certificate is not valid, :class:`Orphaned` when its device was deleted.
        """

        hot = self._enrollment

        def write(conn: Connection) -> None:
            old = next(iter(hot.certificate_by_serial.rows(conn, serial=old_serial)), None)
            if old is not None and old["device_id"] is not None:
                # Lock the device first, as enroll_device does (one order: no deadlock), then the certificate,
                # and read both again: a concurrent writer may have replaced it or deleted the device meanwhile.
                hot.lock_device.rows(conn, device_id=old["device_id"])
                old = next(iter(hot.certificate_by_serial_for_update.rows(conn, serial=old_serial)), None)
            if old is None or old["status"] != "valid":
                raise NotCurrent(old["status"] if old else None)
            if old["device_id"] is None:
                raise Orphaned(old_serial)
            if hot.supersede.execute(conn, serial_=old_serial) != 1:
                raise NotCurrent("superseded")  # not reached while the lock holds; the row count is the last word
            hot.insert_certificate.execute(conn, **_certificate_values(record, old["device_id"]))
            values = {"last_enrolled": utcnow(), "current_serial": record.serial, "requester": record.requester, "client_address": client_address}
            hot.update_device.execute(conn, device_id=old["device_id"], **values)
            if audit is not None:
                hot.insert_audit.execute(conn, **_audit_values(audit))

        self._write_certificate(write, record.serial)

    def _write_certificate(self, write, serial: str):
        for attempt in range(3):
            try:
                return self._certificate_writes.run(write)
            except sa.exc.IntegrityError:
                if self.get_certificate(serial) is not None:
                    raise SerialTaken(serial) from None
                # Another server inserted the same device first (PostgreSQL); read it next time.
            except sa.exc.OperationalError as exc:
                if not is_deadlock(exc) or attempt == 2:  # the last deadlock: a busy database (503), not a fault
                    raise
        raise RuntimeError("could not record the certificate after three attempts")

    def get_certificate(self, serial: str) -> Optional[CertificateRecord]:
        return self._one(certificates.select().where(certificates.c.serial == serial), CertificateRecord)

    def certificate_status(self, serial: str) -> Optional[tuple[str, Optional[datetime], Optional[str], Optional[str]]]:
        """(status, revoked_at, reason, issuer) of a certificate, or None when unknown (every OCSP request asks)."""
        rows = self._reads.status_by_serial.read(self._read_connections, serial=serial)
        return tuple(rows[0].values()) if rows else None

    def expiring_certificates(self, before: datetime) -> list[CertificateRecord]:
        query = (
            certificates.select()
            .where(certificates.c.status == "valid", certificates.c.not_after <= _naive_utc(before), certificates.c.not_after > utcnow())
            .order_by(certificates.c.not_after)
        )
        with self.engine.connect() as conn:
            return [CertificateRecord(**row._mapping) for row in conn.execute(query)]

    def count_certificates(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(certificates)).scalar_one()

    def get_device(self, device_id: int) -> Optional[Device]:
        return self._one(devices.select().where(devices.c.id == device_id), Device)

    def find_devices(self, label: Optional[str] = None, search: Optional[str] = None, limit: int = 1000) -> list[Device]:
        query = devices.select().order_by(devices.c.id).limit(limit)
        if label is not None:
            query = query.where(devices.c.label == label)
        if search:
            query = query.where(devices.c.device_key.contains(search, autoescape=True))
        with self.engine.connect() as conn:
            return [Device(**row._mapping) for row in conn.execute(query)]

    def current_certificate(self, label: str, device_key: str) -> Optional[CertificateRecord]:
        """The current certificate of the device ``device_key`` on ``label``, or None."""
        joined = certificates.join(devices, devices.c.current_serial == certificates.c.serial)
        query = certificates.select().select_from(joined).where(devices.c.label == label, devices.c.device_key == device_key)
        return self._one(query, CertificateRecord)

    def device_certificates(self, device_id: int) -> list[CertificateRecord]:
        query = certificates.select().where(certificates.c.device_id == device_id).order_by(certificates.c.issued_at)
        with self.engine.connect() as conn:
            return [CertificateRecord(**row._mapping) for row in conn.execute(query)]

    def delete_device(self, device_id: int, audit: Optional[AuditEvent] = None, revoke_reason: Optional[str] = None) -> Optional[Device]:
        """Forget a device so its name can enroll again; its certificates stay on record.

        With ``revoke_reason`` every certificate of the device still within its validity and
        not revoked already (the current one, and superseded ones that would still open the
        network) is revoked in the same transaction, each audited as ``revoke``; the caller
        re-signs the CRLs. Returns the device as it was, or None when there is none.
        """
        with self._write() as conn:
            # Locked before its certificates, in the order enroll_device and replace_certificate lock (no deadlock).
            row = conn.execute(devices.select().where(devices.c.id == device_id).with_for_update()).first()
            if row is None:
                return None
            if revoke_reason is not None:
                now = utcnow()
                live = sa.select(certificates.c.serial).where(
                    certificates.c.device_id == device_id, certificates.c.status != "revoked", certificates.c.not_after > now
                )
                for serial in conn.execute(live).scalars().all():
                    conn.execute(_REVOKE, {"serial_": serial, "reason": revoke_reason, "now": now})
                    conn.execute(_MARK_UNPUBLISHED, {"serial": serial})
                    _insert_audit(conn, replace(audit, event="revoke", serial=serial, detail=revoke_reason) if audit else None)
            conn.execute(certificates.update().where(certificates.c.device_id == device_id).values(device_id=None))
            conn.execute(devices.delete().where(devices.c.id == device_id))
            _insert_audit(conn, replace(audit, serial=row.current_serial) if audit else None)
            return Device(**row._mapping)

    # revocation and CRLs

    def revoke(self, serial: str, reason: str, audit: Optional[AuditEvent] = None) -> CertificateRecord:
        """Mark a certificate revoked now; raises NotFound or AlreadyRevoked."""
        with self._write() as conn:
            row = conn.execute(certificates.select().where(certificates.c.serial == serial)).first()
            if row is None:
                raise NotFound(serial)
            if row.device_id is not None:
                # The device first, as enroll_device and replace_certificate lock (one order, no deadlock): revision
                # 0002's trigger updates the device row when its current certificate's status changes.
                conn.execute(_DEVICE_FOR_UPDATE, {"device_id": row.device_id}).first()
            # The row count settles two revocations at once on PostgreSQL (the second finds it revoked).
            if row.status == "revoked" or not conn.execute(_REVOKE, {"serial_": serial, "reason": reason, "now": utcnow()}).rowcount:
                raise AlreadyRevoked(serial)
            conn.execute(_MARK_UNPUBLISHED, {"serial": serial})  # its CA's CRL is stale until one listing it is stored
            _insert_audit(conn, audit)
        return self.get_certificate(serial)

    # Revocation lists are per CA: ``issuer`` is its id (None: any CA); ``or_unrecorded`` (the
    # top-level CA) also counts the rows written before issuers were recorded.

    def revoked_certificates(self, issuer: Optional[str] = None, or_unrecorded: bool = False) -> list[tuple[str, datetime, str]]:
        """(serial, revoked_at, reason) of every certificate the CA revoked that is still within its validity."""
        query = sa.select(certificates.c.serial, certificates.c.revoked_at, certificates.c.revocation_reason).where(
            certificates.c.status == "revoked", certificates.c.not_after > utcnow(), _issued_by(certificates.c.issuer, issuer, or_unrecorded)
        )
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    def unexpired_certificates(self, issuer: Optional[str] = None, or_unrecorded: bool = False) -> tuple[int, Optional[datetime]]:
        """How many of the CA's certificates are unexpired and not revoked, and when the last unexpired one (revoked too) expires."""
        now = utcnow()
        issued = _issued_by(certificates.c.issuer, issuer, or_unrecorded)
        count = sa.select(sa.func.count()).select_from(certificates).where(certificates.c.status != "revoked", certificates.c.not_after > now, issued)
        last = sa.select(sa.func.max(certificates.c.not_after)).where(certificates.c.not_after > now, issued)
        with self.engine.connect() as conn:
            return conn.execute(count).scalar_one(), conn.execute(last).scalar()

    def current_crl(self, issuer: Optional[str] = None, or_unrecorded: bool = False) -> Optional[CRLRecord]:
        query = crls.select().where(_issued_by(crls.c.issuer, issuer, or_unrecorded)).order_by(crls.c.number.desc()).limit(1)
        return self._one(query, CRLRecord)

    def current_crl_number(self, issuer: Optional[str] = None, or_unrecorded: bool = False) -> Optional[int]:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(crls.c.number)).where(_issued_by(crls.c.issuer, issuer, or_unrecorded))).scalar()

    def save_crl(self, build, issuer: str, or_unrecorded: bool = False) -> CRLRecord:
        """Store the CRL ``build(number)`` makes for the CA ``issuer``, numbered one past the newest of any CA.

        Built outside the write lock (a big CRL takes a while to sign; enrollments must not
        wait for it). ``build`` reads the revoked list itself, after the number is chosen; if
        another process stores that number first, the CRL is built again with the next one.
        The CA's unpublished revocations read before ``build`` runs are in its list, so their
        marks go in the CRL's transaction; one committed meanwhile keeps its mark.
        """
        for _ in range(5):
            number = (self.current_crl_number() or 0) + 1
            with self.engine.connect() as conn:
                listed = conn.execute(_unpublished(sa.select(unpublished_revocations.c.serial), issuer, or_unrecorded)).scalars().all()
            this_update, next_update, der = build(number)
            values = {"number": number, "this_update": _naive_utc(this_update), "next_update": _naive_utc(next_update), "der": der, "issuer": issuer}
            try:
                with self._write() as conn:
                    conn.execute(crls.insert().values(**values))
                    if listed:
                        conn.execute(unpublished_revocations.delete().where(unpublished_revocations.c.serial.in_(listed)))
            except sa.exc.IntegrityError:
                continue
            return CRLRecord(**values)
        raise RuntimeError("could not store a new CRL: other processes kept taking its number")

    def unpublished_since(self, issuer: Optional[str] = None, or_unrecorded: bool = False) -> Optional[datetime]:
        """When the oldest revocation of the CA that no stored CRL lists yet was made; None when its CRL lists them all."""
        with self.engine.connect() as conn:
            return conn.execute(_unpublished(sa.select(sa.func.min(certificates.c.revoked_at)), issuer, or_unrecorded)).scalar()

    # audit trail

    def add_audit(self, event: AuditEvent) -> None:
        with self._write() as conn:
            _insert_audit(conn, event)

    def audit_events(self, since: Optional[datetime] = None, device: Optional[str] = None, limit: Optional[int] = None) -> list[AuditEvent]:
        query = audit_events.select().order_by(audit_events.c.id)
        if since is not None:
            query = query.where(audit_events.c.at >= _naive_utc(since))
        if device is not None:
            query = query.where(audit_events.c.device == device)
        if limit is not None:
            query = query.order_by(None).order_by(audit_events.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = [AuditEvent(**row._mapping) for row in conn.execute(query)]
        return rows if limit is None else rows[::-1]


# Statements on every enrollment (and OCSP request), built once: building a Core statement
# and its cache key per call costs more CPU than SQLite spends executing it.
_USER_BY_NAME = users.select().where(users.c.name == sa.bindparam("name"))
# A device id on every label it is recorded on (one, unless recorded before one identity had one owner).
_DEVICES_BY_KEY_FOR_UPDATE = devices.select().where(devices.c.device_key == sa.bindparam("device_key")).order_by(devices.c.id).with_for_update()
_DEVICE_FOR_UPDATE = sa.select(devices.c.id).where(devices.c.id == sa.bindparam("device_id")).with_for_update()
_CERTIFICATE_BY_SERIAL = certificates.select().where(certificates.c.serial == sa.bindparam("serial"))
_ADVISORY_LOCK = sa.select(sa.func.pg_advisory_xact_lock(sa.bindparam("key", type_=sa.BigInteger)))
_DEVICE_UPDATE = devices.update().where(devices.c.id == sa.bindparam("device_id"))
_SUPERSEDE = (
    certificates.update()
    .where(certificates.c.serial == sa.bindparam("serial_"), certificates.c.status == "valid")
    .values(status="superseded")
)
_REVOKE = (
    certificates.update()
    .where(certificates.c.serial == sa.bindparam("serial_"), certificates.c.status != "revoked")
    .values(status="revoked", revoked_at=sa.bindparam("now"), revocation_reason=sa.bindparam("reason"))
)
_MARK_UNPUBLISHED = unpublished_revocations.insert().values(serial=sa.bindparam("serial"))
_STATUS_BY_SERIAL = sa.select(
    certificates.c.status, certificates.c.revoked_at, certificates.c.revocation_reason, certificates.c.issuer
).where(certificates.c.serial == sa.bindparam("serial"))


class _EnrollmentStatements:
    """The statements of :meth:`Store.enroll_device` and :meth:`Store.replace_certificate`, compiled for a dialect,
    and the lock on a device id (approval's requests take it too: est_app/store/requests.py)."""

    def __init__(self, dialect: sa.engine.Dialect) -> None:
        device_values = ["last_enrolled", "current_serial", "requester", "client_address"]
        self.devices_by_key = Compiled(_DEVICES_BY_KEY_FOR_UPDATE, dialect)
        self.lock_device = Compiled(_DEVICE_FOR_UPDATE, dialect)
        self.certificate_by_serial = Compiled(_CERTIFICATE_BY_SERIAL, dialect)
        self.certificate_by_serial_for_update = Compiled(_CERTIFICATE_BY_SERIAL.with_for_update(), dialect)
        self.insert_device = Compiled(devices.insert().returning(devices.c.id), dialect, ["label", "device_key", "first_enrolled", *device_values])
        self.update_device = Compiled(_DEVICE_UPDATE, dialect, device_values)
        self.supersede = Compiled(_SUPERSEDE, dialect)
        self.insert_certificate = Compiled(certificates.insert(), dialect, [c.key for c in certificates.columns])
        self.insert_audit = Compiled(audit_events.insert(), dialect, [c.key for c in audit_events.columns if c.key != "id"])
        self._advisory_lock = Compiled(_ADVISORY_LOCK, dialect) if dialect.name == "postgresql" else None

    def lock_device_key(self, conn: Connection, device_key: str) -> None:
        """PostgreSQL: hold, until commit, a lock on the device id on every label, so that two first
        enrollments of one id (on one label or two) run one after the other. SQLite: BEGIN IMMEDIATE did."""
        if self._advisory_lock is not None:
            key = int.from_bytes(hashlib.sha256(b"est_app device " + device_key.encode()).digest()[:8], "big", signed=True)
            self._advisory_lock.rows(conn, key=key)


class _RequestReads:
    """The reads requests make every time (Basic auth, its back-off check, OCSP), compiled for a dialect."""

    def __init__(self, dialect: sa.engine.Dialect) -> None:
        self.user_by_name = Compiled(_USER_BY_NAME, dialect)
        self.status_by_serial = Compiled(_STATUS_BY_SERIAL, dialect)
        self.auth_failures = Compiled(
            auth_failures.select().where(auth_failures.c.subject.in_([sa.bindparam("first"), sa.bindparam("second")])), dialect
        )


def _issued_by(column: sa.Column, issuer: Optional[str], or_unrecorded: bool):
    if issuer is None:
        return sa.true()
    return sa.or_(column == issuer, column.is_(None)) if or_unrecorded else column == issuer


def _unpublished(query: sa.Select, issuer: Optional[str], or_unrecorded: bool) -> sa.Select:
    """``query`` over the CA's revocations no stored CRL lists yet (as revoked_certificates scopes a CA)."""
    joined = unpublished_revocations.join(certificates, certificates.c.serial == unpublished_revocations.c.serial)
    return query.select_from(joined).where(_issued_by(certificates.c.issuer, issuer, or_unrecorded))


def _certificate_values(record: CertificateRecord, device_id: Optional[int] = None) -> dict:
    values = dict(vars(record))  # shallow: asdict() deep-copies every field
    values.update(
        device_id=device_id if device_id is not None else record.device_id,
        not_before=_naive_utc(record.not_before),
        not_after=_naive_utc(record.not_after),
        issued_at=_naive_utc(record.issued_at) or utcnow(),
    )
    return values


def _audit_values(event: AuditEvent) -> dict:
    values = dict(vars(event))
    values.pop("id")
    values["at"] = _naive_utc(event.at) or utcnow()
    return values


def _insert_audit(conn: Connection, event: Optional[AuditEvent]) -> None:
    if event is not None:
        conn.execute(audit_events.insert(), _audit_values(event))


