"""The sorter's original result log (one ``decisions`` table), as ``resultlog.py`` created it.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.Text, nullable=False),
        sa.Column("file_name", sa.Text, nullable=False),
        sa.Column("source_path", sa.Text, nullable=False),
        sa.Column("content_sha256", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("top_class", sa.Text),
        sa.Column("confidence", sa.Float),
        sa.Column("probabilities", sa.Text),
        sa.Column("drift_score", sa.Float),
        sa.Column("model_id", sa.Text),
        sa.Column("model_version", sa.Text),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("status IN ('pending', 'done', 'error')", name="ck_decisions_status"),
        sa.UniqueConstraint("content_sha256", "file_name", name="uq_decisions_key"),
    )
    op.create_index("decisions_status", "decisions", ["status"])


def downgrade() -> None:
    op.drop_table("decisions")
