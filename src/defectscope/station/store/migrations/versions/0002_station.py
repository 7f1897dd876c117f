"""The inspection station: who decided where (source, station, lot, part), timing, the stored image,
the review flag, and a ``reviews`` table of human decisions.

The key becomes (content_sha256, file_name, request_id): the sorter's rows keep request_id '' (one row per
file, as before) while every API request gets its own id, because the same image posted twice is two
inspections.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A log written by the old stdlib ResultLog has an unnamed UNIQUE constraint; the naming convention
    # gives the reflected one the name revision 0001 uses, so one drop works on both kinds of database.
    # Its CHECK on status is unnamed too, which batch mode would drop on SQLite: restate it, named.
    checks = sa.inspect(op.get_bind()).get_check_constraints("decisions")
    restate = (sa.CheckConstraint("status IN ('pending', 'done', 'error')", name="ck_decisions_status"),) \
        if any(c.get("name") is None for c in checks) else ()
    with op.batch_alter_table("decisions", naming_convention={"uq": "uq_%(table_name)s_key"},
                              table_args=restate) as b:
        b.add_column(sa.Column("request_id", sa.Text, nullable=False, server_default=""))
        b.add_column(sa.Column("source", sa.Text, nullable=False, server_default="sort"))
        b.add_column(sa.Column("station", sa.Text))
        b.add_column(sa.Column("lot", sa.Text))
        b.add_column(sa.Column("part_id", sa.Text))
        b.add_column(sa.Column("decode_ms", sa.Float))
        b.add_column(sa.Column("infer_ms", sa.Float))
        b.add_column(sa.Column("total_ms", sa.Float))
        b.add_column(sa.Column("image_path", sa.Text))
        b.add_column(sa.Column("heatmap_path", sa.Text))
        b.add_column(sa.Column("needs_review", sa.Boolean, nullable=False, server_default=sa.false()))
        b.drop_constraint("uq_decisions_key", type_="unique")
        b.create_unique_constraint("uq_decisions_image", ["content_sha256", "file_name", "request_id"])
    op.create_index("decisions_time", "decisions", ["time"])
    op.create_index("decisions_review", "decisions", ["needs_review"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.Integer, sa.ForeignKey("decisions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.Text, nullable=False),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("comment", sa.Text),
    )
    op.create_index("reviews_decision", "reviews", ["decision_id"])


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_index("decisions_review", "decisions")
    op.drop_index("decisions_time", "decisions")
    with op.batch_alter_table("decisions") as b:
        b.drop_constraint("uq_decisions_image", type_="unique")
        b.create_unique_constraint("uq_decisions_key", ["content_sha256", "file_name"])
        for name in ("needs_review", "heatmap_path", "image_path", "total_ms", "infer_ms", "decode_ms", "part_id",
                     "lot", "station", "source", "request_id"):
            b.drop_column(name)
