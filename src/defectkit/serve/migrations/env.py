"""Alembic environment: runs on the connection that ``store.upgrade`` passes in."""

from __future__ import annotations

from alembic import context

from defectkit.serve.store import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the store always passes one
    raise RuntimeError("run migrations through defectkit.serve.store.upgrade")
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
