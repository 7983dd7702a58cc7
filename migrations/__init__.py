"""Alembic environment and versions for the registry schema (see registry.db.upgrade)."""
