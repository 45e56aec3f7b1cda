"""The tables. Times are UTC; serial numbers are lowercase hex without leading zeros."""

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
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
    sa.Column("last_enrolled", sa.DateTime, nullable=False),
    sa.Column("current_serial", sa.String(64), nullable=False),
    sa.Column("requester", sa.String(256), nullable=False),
    sa.Column("client_address", sa.String(64), nullable=False),
    sa.UniqueConstraint("label", "device_key", name="uq_devices_label_key"),
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
    sa.Column("issued_at", sa.DateTime, nullable=False),
    sa.Column("der", sa.LargeBinary, nullable=False),
)
