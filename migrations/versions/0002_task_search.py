"""Full-text search over tasks on PostgreSQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Exactly the expression the task list searches with (taskflow.models
# SEARCH_DOCUMENT, copied so that this migration never changes), or PostgreSQL
# will not use the index. SQLite has no such index: the embedded default
# searches by substring.
SEARCH_DOCUMENT = "to_tsvector('simple', title || ' ' || coalesce(description, ''))"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_tasks_search", "tasks", [sa.text(SEARCH_DOCUMENT)], postgresql_using="gin"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_tasks_search", table_name="tasks")
