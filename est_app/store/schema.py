"""The tables at the newest revision. Times are UTC; serial numbers are lowercase hex without leading zeros.

Alembic revisions (est_app/store/migrations/) make these; a change here is a new revision there,
and a test checks that the upgraded database matches this file. The revisions also make what
SQLAlchemy does not describe: the triggers behind ``devices.current_*`` and the substring search
index (pg_trgm GIN on PostgreSQL, the FTS5 table ``devices_search`` on SQLite).
"""

import sqlalchemy as sa

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
    # The current certificate's status and notAfter, kept equal to it by triggers (revision 0002) for the filters.
    sa.Column("current_status", sa.String(16)),
    sa.Column("current_not_after", sa.DateTime),
    sa.UniqueConstraint("label", "device_key", name="uq_devices_label_key"),
    sa.Index("ix_devices_device_key", "device_key"),  # one identity, one owner: looked up across labels
    sa.Index("ix_devices_current_status_id", "current_status", "id"),
    sa.Index("ix_devices_current_status_not_after", "current_status", "current_not_after"),
    sa.Index("ix_devices_current_not_after", "current_not_after"),
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

# Enrollments waiting for an operator (approval: manual | inventory), revision 0003. The CSR is kept
# as DER to issue from once approved; a serverkeygen key is made only when the device collects.
enrollment_requests = sa.Table(
    "enrollment_requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("device_key", sa.String(256), nullable=False),
    sa.Column("csr", sa.LargeBinary, nullable=False),
    sa.Column("public_key_hash", sa.String(64), nullable=False),  # SHA-256 of the SubjectPublicKeyInfo, hex
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("operation", sa.String(32), nullable=False),  # simpleenroll | simplereenroll | serverkeygen
    sa.Column("requester", sa.String(256), nullable=False),
    sa.Column("client_address", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | approved | rejected | collected | expired
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("decided_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("decided_at", sa.DateTime),
    sa.Index("ix_enrollment_requests_label_device_key", "label", "device_key", "id"),
    sa.Index("ix_enrollment_requests_status_id", "status", "id"),
    sqlite_autoincrement=True,
)

# The asset inventory: devices a label with ``approval: inventory`` issues to without waiting.
inventory = sa.Table(
    "inventory",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("device_key", sa.String(256), nullable=False),
    sa.Column("added_by", sa.String(256), nullable=False),
    sa.Column("added_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("label", "device_key", name="uq_inventory_label_key"),
)

# Revocations no stored CRL lists yet, revision 0004: a row is written in the revocation's own transaction and
# deleted in the transaction that stores a CRL listing it, so a CA's CRL is stale exactly while it has a row here.
unpublished_revocations = sa.Table(
    "unpublished_revocations",
    metadata,
    sa.Column("serial", sa.String(64), sa.ForeignKey("certificates.serial"), primary_key=True),
)
