"""Several station replicas: each decision says why (``reason``) and which replica made it (``replica``), and
``model_generations`` holds the model the station was asked to run, which every replica polls.

``reason``: the Predictor's why (``below the escape threshold``, ``review band``, ``Drift: ...``), empty when
the decision is simply the top class. ``replica``: the ``serve`` process (``host:port`` unless named) or NULL
for the sorter. A generation row is written by the replica that loaded a new model (its file changed, or
``POST /v1/model/reload``); the others load their own file when it holds that model.

The dashboard asks for ``status = 'done' AND time >= since`` (and a station): with only single-column indexes
SQLite picks ``decisions_status``, which every done row matches, and scans; two composite indexes serve those
queries (``tests/test_store.py`` checks SQLite's plan).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as b:
        b.add_column(sa.Column("reason", sa.Text))
        b.add_column(sa.Column("replica", sa.Text))
    op.create_table(
        "model_generations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.Text, nullable=False),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("replica", sa.Text, nullable=False),
    )
    op.create_index("decisions_status_time", "decisions", ["status", "time"])
    op.create_index("decisions_station_status_time", "decisions", ["station", "status", "time"])


def downgrade() -> None:
    op.drop_index("decisions_station_status_time", "decisions")
    op.drop_index("decisions_status_time", "decisions")
    op.drop_table("model_generations")
    with op.batch_alter_table("decisions") as b:
        b.drop_column("replica")
        b.drop_column("reason")
