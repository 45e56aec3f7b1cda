"""0001: the schema before migrations (migrations/baseline.py), created, or adopted in place."""

from alembic import op

from est_app.store.migrations import baseline

revision = "0001"
down_revision = None


def upgrade() -> None:
    baseline.create_or_adopt(op.get_bind())


def downgrade() -> None:
    raise NotImplementedError("revision 0001 is the first: restore the backup made before upgrading instead")
