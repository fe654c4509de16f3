"""countries (default only) and users (sharded)

Revision ID: 0001
Revises:
Create Date: 2024-06-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def allows(table_name: str) -> bool:
    """Does allow_migrate put ``table_name`` on the alias being migrated?"""
    return bool(op.get_context().opts["shardkit_allows"](table_name))


def upgrade() -> None:
    if allows("countries"):
        op.create_table(
            "countries",
            sa.Column("code", sa.String(2), primary_key=True),
            sa.Column("name", sa.String(100), nullable=False),
        )
    if allows("users"):
        op.create_table(
            "users",
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("name", sa.String(50), nullable=False),
        )


def downgrade() -> None:
    if allows("users"):
        op.drop_table("users")
    if allows("countries"):
        op.drop_table("countries")
