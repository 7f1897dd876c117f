"""Alembic environment: run on the connection :class:`defectscope.station.store.Store` hands over.

There is no alembic.ini and no URL here: the store opens the database (SQLite or PostgreSQL) and passes its
connection in ``config.attributes["connection"]``, so the migrations run inside the store's own process.
"""

from alembic import context

connection = context.config.attributes["connection"]
# Batch mode lets one migration script alter tables on SQLite (copy-and-move) and PostgreSQL (ALTER TABLE).
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
