"""Several station replicas on one database: ``review_claims``, which reviewer holds which queue item until when.

A claim is a row per decision (``until``: ISO UTC, like every time in the store); an expired claim is free
again. Taken with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (:meth:`defectscope.station.store.Store.claim_review`).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_claims",
        sa.Column("decision_id", sa.Integer, sa.ForeignKey("decisions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("until", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("review_claims")
