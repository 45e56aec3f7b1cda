"""Persistence through SQLAlchemy Core: users and issued certificates.

SQLite (the default) runs in WAL mode with full synchronous commits, a busy
timeout, and ``BEGIN IMMEDIATE`` for writes, so several gunicorn workers can
share one file safely. Any other SQLAlchemy URL (PostgreSQL) works as is.
The store knows bytes and fields, not X.509.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .schema import certificates, metadata, users


class UserExists(Exception):
    pass


class SerialTaken(Exception):
    """A serial number collided with one already stored (vanishingly rare; draw again)."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    password_hash: str
    created_at: datetime


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    common_name: str
    subject: str
    label: str
    requester: str
    not_before: datetime
    not_after: datetime
    der: bytes
    status: str = "valid"
    issued_at: Optional[datetime] = None


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value


class Store:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self._writer = self.engine.execution_options(est_write=True)

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    # users

    def add_user(self, name: str, password_hash: str) -> None:
        try:
            with self._writer.begin() as conn:
                conn.execute(users.insert().values(name=name, password_hash=password_hash, created_at=utcnow()))
        except sa.exc.IntegrityError:
            raise UserExists(name) from None

    def get_user(self, name: str) -> Optional[User]:
        with self.engine.connect() as conn:
            row = conn.execute(users.select().where(users.c.name == name)).first()
        return User(**row._mapping) if row else None

    def list_users(self) -> list[User]:
        with self.engine.connect() as conn:
            return [User(**row._mapping) for row in conn.execute(users.select().order_by(users.c.name))]

    def remove_user(self, name: str) -> bool:
        with self._writer.begin() as conn:
            return conn.execute(users.delete().where(users.c.name == name)).rowcount > 0

    # certificates

    def record_certificate(self, record: CertificateRecord) -> None:
        """Commit ``record``; when this returns, the certificate is durably stored."""
        values = {
            **record.__dict__,
            "not_before": _naive_utc(record.not_before),
            "not_after": _naive_utc(record.not_after),
            "issued_at": _naive_utc(record.issued_at) if record.issued_at else utcnow(),
        }
        try:
            with self._writer.begin() as conn:
                conn.execute(certificates.insert().values(**values))
        except sa.exc.IntegrityError:
            with self.engine.connect() as conn:
                taken = conn.execute(sa.select(certificates.c.serial).where(certificates.c.serial == record.serial)).first()
            if taken:
                raise SerialTaken(record.serial) from None
            raise

    def get_certificate(self, serial: str) -> Optional[CertificateRecord]:
        with self.engine.connect() as conn:
            row = conn.execute(certificates.select().where(certificates.c.serial == serial)).first()
        return CertificateRecord(**row._mapping) if row else None

    def count_certificates(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(certificates)).scalar_one()


def create_engine(url: str) -> Engine:
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # Hand transaction control to the "begin" hook below (pysqlite's own is unreliable).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=10000", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Writers take the lock up front, so a read-then-write never deadlocks on upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("est_write") else "BEGIN")
