"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Runs on every alias of the cluster: guard each operation with ``allows(table)``
(allow_migrate for the alias being migrated; env.py provides it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def allows(table_name: str) -> bool:
    """Does allow_migrate put ``table_name`` on the alias being migrated?"""
    return bool(op.get_context().opts["shardkit_allows"](table_name))


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
