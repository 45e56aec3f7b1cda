"""The revisions, oldest first (a package so that they ship with est_app; Alembic skips this file)."""
