"""0004: revocations no stored CRL lists yet, the mark that makes a CA's CRL stale until it is re-signed.

Revocations made before this revision get no mark: each was published when it was made, or is
at the next half-life re-sign (`est-admin crl` re-signs every CA's CRL at once).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "unpublished_revocations",
        sa.Column("serial", sa.String(64), sa.ForeignKey("certificates.serial"), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("unpublished_revocations")
