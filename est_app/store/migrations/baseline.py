"""Revision 0001's schema, frozen: the tables as est_app made them before migrations (Store.create_schema,
with the issuer columns it added in place and without the dropped ``app_secrets`` table).

Revision 0001 creates these in an empty database and adopts a database made before migrations
(no ``alembic_version`` table): it does what that version's start-up did (creates missing tables
and indexes, adds the two nullable issuer columns, drops ``app_secrets``) and refuses, changing
nothing, a database lacking any other column. Never edit these tables: a later schema is a later
revision (schema.py is the head).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..records import SchemaOutdated

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("role", sa.String(16), nullable=False, server_default="est"),  # est | admin
    sa.Column("created_at", sa.DateTime, nullable=False),
)

# Registration authorities (gateways) known by their client certificate.
ra_clients = sa.Table(
    "ra_clients",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),  # SHA-256 of the DER, hex
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # space-separated; "" is the unlabelled path
    sa.Column("created_at", sa.DateTime, nullable=False),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("device_key", sa.String(256), nullable=False),  # CN, serialNumber or SAN, per label
    sa.Column("first_enrolled", sa.DateTime, nullable=False),
    sa.Column("last_enrolled", sa.DateTime, nullable=False, index=True),
    sa.Column("current_serial", sa.String(64), nullable=False, index=True),
    sa.Column("requester", sa.String(256), nullable=False),
    sa.Column("client_address", sa.String(64), nullable=False),
    sa.UniqueConstraint("label", "device_key", name="uq_devices_label_key"),
    sa.Index("ix_devices_device_key", "device_key"),  # one identity, one owner: looked up across labels
    sqlite_autoincrement=True,  # a deleted device's id is never given to another
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id", ondelete="SET NULL"), index=True),
    sa.Column("common_name", sa.String(256), nullable=False, index=True),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("requester", sa.String(256), nullable=False),
    sa.Column("operation", sa.String(32), nullable=False),
    sa.Column("not_before", sa.DateTime, nullable=False),
    sa.Column("not_after", sa.DateTime, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),  # valid | superseded | revoked
    sa.Column("revoked_at", sa.DateTime),
    sa.Column("revocation_reason", sa.String(32)),
    sa.Column("issued_at", sa.DateTime, nullable=False, index=True),
    sa.Column("der", sa.LargeBinary, nullable=False),
    # The issuing CA (est_app.ca.authority.issuer_id); NULL on rows written before it was recorded: the top-level CA.
    sa.Column("issuer", sa.String(64)),
    # Counts by status and expiry (overview, metrics, `cert expiring`) without reading certificate bodies.
    sa.Index("ix_certificates_status_not_after_serial", "status", "not_after", "serial"),
)

# Append-only: rows are inserted, never updated or deleted.
audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime, nullable=False, index=True),
    sa.Column("event", sa.String(32), nullable=False),  # enroll, reenroll, serverkeygen, bootstrap, revoke, ...
    sa.Column("outcome", sa.String(16), nullable=False),  # ok | refused
    sa.Column("actor", sa.String(256), nullable=False),  # user:NAME, ra:FINGERPRINT, device:SERIAL, admin:NAME, cli:LOGIN
    sa.Column("client_address", sa.String(64), nullable=False),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("device", sa.String(256), nullable=False, index=True),
    sa.Column("serial", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

# Every CRL issued; a CA's highest number is its current one. The numbers are one sequence shared
# by all CAs: each CA's CRL numbers still only increase (RFC 5280 5.2.3 allows the gaps).
crls = sa.Table(
    "crls",
    metadata,
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("this_update", sa.DateTime, nullable=False),
    sa.Column("next_update", sa.DateTime, nullable=False),
    sa.Column("der", sa.LargeBinary, nullable=False),
    # The signing CA, as certificates.issuer (NULL: the top-level CA, before it was recorded).
    sa.Column("issuer", sa.String(64)),
    sa.Index("ix_crls_issuer_number", "issuer", "number"),
)

# Signed-in dashboard sessions. The cookie holds a random token; only its SHA-256 is kept here.
admin_sessions = sa.Table(
    "admin_sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("data", sa.Text, nullable=False),  # JSON: the CSRF token, flashed messages
    sa.Column("created_at", sa.DateTime, nullable=False),  # for the absolute lifetime
    sa.Column("last_seen", sa.DateTime, nullable=False, index=True),  # for the idle timeout
)

# Failed password checks, per account ("account:NAME") and per client address ("address:IP").
auth_failures = sa.Table(
    "auth_failures",
    metadata,
    sa.Column("subject", sa.String(160), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_failure", sa.DateTime, nullable=False, index=True),
    sa.Column("blocked_until", sa.DateTime, nullable=False),
)

NOT_OURS = "not a database est_app can upgrade in place (restore a backup made by est_app)"

# Nullable columns the last version before migrations added in place to a database older still.
ADDED_COLUMNS = frozenset({("certificates", "issuer"), ("crls", "issuer")})


def gaps(conn: Connection) -> tuple[list[str], list[sa.Column], list[str]]:
    """Read-only: (one line per table lacking columns that cannot be added in place; the
    ADDED_COLUMNS missing; the tables missing)."""
    inspector = sa.inspect(conn)
    present_tables = set(inspector.get_table_names())
    refused, added, missing_tables = [], [], []
    for table in metadata.sorted_tables:
        if table.name not in present_tables:
            missing_tables.append(table.name)
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column for column in table.columns if column.name not in present]
        lacking = [column.name for column in missing if (table.name, column.name) not in ADDED_COLUMNS]
        if lacking:
            refused.append(f"table {table.name} lacks column(s) {', '.join(lacking)}")
        added += [column for column in missing if (table.name, column.name) in ADDED_COLUMNS]
    return refused, added, missing_tables


def create_or_adopt(conn: Connection) -> None:
    """Revision 0001: the tables above in an empty database, or a database made before migrations brought to them."""
    refused, added, _ = gaps(conn)
    if refused:
        raise SchemaOutdated(f"{refused[0]}: {NOT_OURS}")
    # Held the key that signed dashboard cookies (before server-side sessions): not to be kept.
    conn.exec_driver_sql("DROP TABLE IF EXISTS app_secrets")
    metadata.create_all(conn)
    for column in added:
        _add_column(conn, column)
    for table in metadata.sorted_tables:
        for index in table.indexes:
            index.create(conn, checkfirst=True)


def _add_column(conn: Connection, column: sa.Column) -> None:
    """ALTER TABLE ... ADD COLUMN for one of the ADDED_COLUMNS (nullable, so old rows stay as they are)."""
    preparer = conn.dialect.identifier_preparer
    spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE {preparer.format_table(column.table)} ADD COLUMN {spec}"))
