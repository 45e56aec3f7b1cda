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

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("common_name", sa.String(256), nullable=False, index=True),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("requester", sa.String(256), nullable=False),
    sa.Column("not_before", sa.DateTime, nullable=False),
    sa.Column("not_after", sa.DateTime, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False, default="valid"),
    sa.Column("issued_at", sa.DateTime, nullable=False),
    sa.Column("der", sa.LargeBinary, nullable=False),
)
