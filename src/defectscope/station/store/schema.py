"""The tables as SQLAlchemy Core objects, for queries. The database itself is created and upgraded only by
the Alembic scripts in ``migrations/versions``; ``tests/test_store.py`` checks that both agree."""

from __future__ import annotations

import sqlalchemy as sa

# Named for what it holds: "metadata" elsewhere means a model card or the station/lot/part of an image.
TABLES = sa.MetaData()

decisions = sa.Table(
    "decisions", TABLES,
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
    sa.Column("request_id", sa.Text, nullable=False, server_default=""),
    sa.Column("source", sa.Text, nullable=False, server_default="sort"),
    sa.Column("station", sa.Text),
    sa.Column("lot", sa.Text),
    sa.Column("part_id", sa.Text),
    sa.Column("decode_ms", sa.Float),
    sa.Column("infer_ms", sa.Float),
    sa.Column("total_ms", sa.Float),
    sa.Column("image_path", sa.Text),
    sa.Column("heatmap_path", sa.Text),
    sa.Column("needs_review", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("reason", sa.Text),
    sa.Column("replica", sa.Text),
    sa.Column("verdict", sa.Text),  # PASS / REJECT / REVIEW / Drift / _unreadable as its writer saw it, or NULL
    sa.CheckConstraint("status IN ('pending', 'done', 'error')", name="ck_decisions_status"),
    sa.UniqueConstraint("content_sha256", "file_name", "request_id", name="uq_decisions_image"),
    sa.Index("decisions_status", "status"),
    sa.Index("decisions_time", "time"),
    sa.Index("decisions_review", "needs_review"),
    # The dashboard asks for done rows since a time (per station): with status alone SQLite picks the status
    # index, which every done row matches, and scans the table.
    sa.Index("decisions_status_time", "status", "time"),
    sa.Index("decisions_station_status_time", "station", "status", "time"),
)

reviews = sa.Table(
    "reviews", TABLES,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.Integer, sa.ForeignKey("decisions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("time", sa.Text, nullable=False),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("comment", sa.Text),
    sa.Index("reviews_decision", "decision_id"),
)

review_claims = sa.Table(
    "review_claims", TABLES,
    sa.Column("decision_id", sa.Integer, sa.ForeignKey("decisions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("until", sa.Text, nullable=False),
)

model_generations = sa.Table(
    "model_generations", TABLES,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Text, nullable=False),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("replica", sa.Text, nullable=False),
)
