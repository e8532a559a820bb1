"""index on results.image_sha256: the hot folder looks an image up by its hash
before inspecting it, so a restart never inspects a file twice

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_results_image_sha256", "results", ["image_sha256"])


def downgrade() -> None:
    op.drop_index("ix_results_image_sha256", "results")
