"""0003: manual approval (RFC 7030 4.2.3): enrollment requests waiting for an operator, and the asset inventory."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "enrollment_requests",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("device_key", sa.String(256), nullable=False),
        sa.Column("csr", sa.LargeBinary, nullable=False),
        sa.Column("public_key_hash", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("requester", sa.String(256), nullable=False),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("decided_by", sa.String(256), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("decided_at", sa.DateTime),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_enrollment_requests_label_device_key", "enrollment_requests", ["label", "device_key", "id"])
    op.create_index("ix_enrollment_requests_status_id", "enrollment_requests", ["status", "id"])
    op.create_table(
        "inventory",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("device_key", sa.String(256), nullable=False),
        sa.Column("added_by", sa.String(256), nullable=False),
        sa.Column("added_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("label", "device_key", name="uq_inventory_label_key"),
    )


def downgrade() -> None:
    op.drop_table("inventory")
    op.drop_index("ix_enrollment_requests_status_id", "enrollment_requests")
    op.drop_index("ix_enrollment_requests_label_device_key", "enrollment_requests")
    op.drop_table("enrollment_requests")
