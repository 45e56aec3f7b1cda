"""Alembic's environment: run the revisions on the connection est_app hands over (migrations.upgrade), in its transaction."""

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
