"""Each decision's verdict as its writer saw it: PASS, REJECT, REVIEW, Drift or _unreadable.

A class name alone does not say whether the part passed: that depends on the good class of the model that decided
it, which the station only knows for the model it runs now. With several models in one store (a model replaced,
a sorter on an older one) the dashboard counts each row by its own verdict. ``verdict`` is NULL when the writer
did not give it (rows from before this revision, writers that do not know it, a model without a good class);
the dashboard then falls back to the row's model's class names.

Existing rows: REVIEW, Drift and unreadable decisions are their own verdict and are filled; a class decision's
verdict cannot be told in SQL and stays NULL.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as b:
        b.add_column(sa.Column("verdict", sa.Text))
    op.execute("UPDATE decisions SET verdict = decision WHERE decision IN ('REVIEW', 'Drift', '_unreadable')")


def downgrade() -> None:
    with op.batch_alter_table("decisions") as b:
        b.drop_column("verdict")
