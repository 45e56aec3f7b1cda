"""0002: device search by substring and the status/expiry filter, indexed for a million devices.

- ``devices.current_status`` and ``devices.current_not_after``: the current certificate's
  status and notAfter, copied onto the device row with indexes, so the registry's status
  and expiry filters read one table. Triggers keep them equal to the certificate's in the
  transaction of every write (enroll, re-enroll, supersede, revoke, delete): the database
  holds the rule for every writer, the store's methods, a bulk load or a repair by hand.
- Substring search: on PostgreSQL a pg_trgm GIN index, which ``LIKE '%...%'`` uses as is;
  on SQLite an FTS5 trigram table over ``devices.device_key`` (external content, kept by
  triggers) that reports.py asks for candidates, the same LIKE deciding, so results stay
  those of the plain scan.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

# The current certificate's fields, copied to the device row; the same SQL for both databases.
_COPY_FROM_CERTIFICATE = (
    "UPDATE devices SET current_status = NEW.status, current_not_after = NEW.not_after WHERE current_serial = NEW.serial"
)

_SQLITE = [
    f"CREATE TRIGGER certificates_device_status_insert AFTER INSERT ON certificates BEGIN {_COPY_FROM_CERTIFICATE}; END",
    f"CREATE TRIGGER certificates_device_status_update AFTER UPDATE OF status, not_after ON certificates BEGIN {_COPY_FROM_CERTIFICATE}; END",
    *(
        f"CREATE TRIGGER devices_current_certificate_{name} AFTER {event} ON devices BEGIN "
        "UPDATE devices SET current_status = (SELECT status FROM certificates WHERE serial = NEW.current_serial), "
        "current_not_after = (SELECT not_after FROM certificates WHERE serial = NEW.current_serial) WHERE id = NEW.id; END"
        for name, event in (("insert", "INSERT"), ("update", "UPDATE OF current_serial"))
    ),
    "CREATE VIRTUAL TABLE devices_search USING fts5(device_key, content='devices', content_rowid='id', tokenize='trigram')",
    "INSERT INTO devices_search(devices_search) VALUES ('rebuild')",
    "CREATE TRIGGER devices_search_insert AFTER INSERT ON devices BEGIN "
    "INSERT INTO devices_search(rowid, device_key) VALUES (NEW.id, NEW.device_key); END",
    "CREATE TRIGGER devices_search_delete AFTER DELETE ON devices BEGIN "
    "INSERT INTO devices_search(devices_search, rowid, device_key) VALUES ('delete', OLD.id, OLD.device_key); END",
    "CREATE TRIGGER devices_search_update AFTER UPDATE OF device_key ON devices BEGIN "
    "INSERT INTO devices_search(devices_search, rowid, device_key) VALUES ('delete', OLD.id, OLD.device_key); "
    "INSERT INTO devices_search(rowid, device_key) VALUES (NEW.id, NEW.device_key); END",
]
_SQLITE_DROP = [
    *(f"DROP TRIGGER {name}" for name in (
        "certificates_device_status_insert", "certificates_device_status_update", "devices_current_certificate_insert",
        "devices_current_certificate_update", "devices_search_insert", "devices_search_delete", "devices_search_update",
    )),  # fmt: skip
    "DROP TABLE devices_search",
]

_POSTGRESQL = [
    "CREATE FUNCTION certificates_device_status() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"{_COPY_FROM_CERTIFICATE}; RETURN NULL; END $$",
    "CREATE TRIGGER certificates_device_status AFTER INSERT OR UPDATE OF status, not_after ON certificates "
    "FOR EACH ROW EXECUTE FUNCTION certificates_device_status()",
    # No row (a certificate not written yet): SELECT INTO sets both to NULL.
    "CREATE FUNCTION devices_current_certificate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "SELECT status, not_after INTO NEW.current_status, NEW.current_not_after FROM certificates WHERE serial = NEW.current_serial; "
    "RETURN NEW; END $$",
    "CREATE TRIGGER devices_current_certificate BEFORE INSERT OR UPDATE OF current_serial ON devices "
    "FOR EACH ROW EXECUTE FUNCTION devices_current_certificate()",
    # pg_trgm is a trusted extension (PostgreSQL 13+): the database's owner may create it.
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX ix_devices_device_key_trgm ON devices USING gin (device_key gin_trgm_ops)",
]
_POSTGRESQL_DROP = [
    "DROP INDEX ix_devices_device_key_trgm",  # pg_trgm stays: other databases' objects may use it
    "DROP TRIGGER devices_current_certificate ON devices",
    "DROP FUNCTION devices_current_certificate()",
    "DROP TRIGGER certificates_device_status ON certificates",
    "DROP FUNCTION certificates_device_status()",
]


def upgrade() -> None:
    op.add_column("devices", sa.Column("current_status", sa.String(16)))
    op.add_column("devices", sa.Column("current_not_after", sa.DateTime))
    op.execute(
        "UPDATE devices SET current_status = (SELECT status FROM certificates WHERE serial = devices.current_serial), "
        "current_not_after = (SELECT not_after FROM certificates WHERE serial = devices.current_serial)"
    )
    # Status alone walks (status, id) newest first; status and an expiry window is one range of
    # (status, not_after); a window alone, of (not_after).
    op.create_index("ix_devices_current_status_id", "devices", ["current_status", "id"])
    op.create_index("ix_devices_current_status_not_after", "devices", ["current_status", "current_not_after"])
    op.create_index("ix_devices_current_not_after", "devices", ["current_not_after"])
    for statement in _SQLITE if op.get_bind().dialect.name == "sqlite" else _POSTGRESQL:
        op.execute(statement)


def downgrade() -> None:
    for statement in _SQLITE_DROP if op.get_bind().dialect.name == "sqlite" else _POSTGRESQL_DROP:
        op.execute(statement)
    op.drop_index("ix_devices_current_not_after", "devices")
    op.drop_index("ix_devices_current_status_not_after", "devices")
    op.drop_index("ix_devices_current_status_id", "devices")
    op.drop_column("devices", "current_not_after")
    op.drop_column("devices", "current_status")
