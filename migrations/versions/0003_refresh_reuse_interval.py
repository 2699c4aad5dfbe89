"""Remember each session's previous refresh token and when it was spent

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: no table rewrite, a brief lock only.
    with op.batch_alter_table("auth_sessions") as batch:
        batch.add_column(sa.Column("spent_refresh_token_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("auth_sessions") as batch:
        batch.drop_column("refreshed_at")
        batch.drop_column("spent_refresh_token_hash")
