"""results and alarms tables

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("line", sa.String(200)),
        sa.Column("lot", sa.String(200)),
        sa.Column("part_id", sa.String(200)),
        sa.Column("filename", sa.String(500)),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_ext", sa.String(10), nullable=False),
        sa.Column("overlay_sha256", sa.String(64)),
        sa.Column("score", sa.Float),
        sa.Column("is_defect", sa.Boolean),
        sa.Column("threshold", sa.Float),
        sa.Column("severity", sa.String(20)),
        sa.Column("record", sa.JSON, nullable=False),
        sa.Column("review_verdict", sa.String(10)),
        sa.Column("review_defect_type", sa.String(200)),
        sa.Column("review_comment", sa.Text),
        sa.Column("reviewed_at", sa.DateTime),
    )
    for col in ("created_at", "line", "lot", "is_defect", "review_verdict"):
        op.create_index(f"ix_results_{col}", "results", [col])
    op.create_table(
        "alarms",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("chart", sa.String(50), nullable=False),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("result_id", sa.Integer),
    )
    op.create_index("ix_alarms_created_at", "alarms", ["created_at"])


def downgrade() -> None:
    op.drop_table("alarms")
    op.drop_table("results")
