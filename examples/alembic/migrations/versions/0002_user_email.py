"""users.email

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def allows(table_name: str) -> bool:
    """Does allow_migrate put ``table_name`` on the alias being migrated?"""
    return bool(op.get_context().opts["shardkit_allows"](table_name))


def upgrade() -> None:
    if allows("users"):
        with op.batch_alter_table("users") as batch:
            batch.add_column(sa.Column("email", sa.String(200), nullable=True))


def downgrade() -> None:
    if allows("users"):
        with op.batch_alter_table("users") as batch:
            batch.drop_column("email")
