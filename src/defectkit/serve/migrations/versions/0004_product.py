"""results.product: the product an image was inspected as (a model's product, or
the one a multi-product model assigned), for filtering the dashboard and the API

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("results", sa.Column("product", sa.String(200)))
    op.create_index("ix_results_product", "results", ["product"])


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:  # SQLite cannot drop a column in place
        batch.drop_index("ix_results_product")
        batch.drop_column("product")
