"""Move raw bytes out of messages into message_bodies, partitioned by month.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

On PostgreSQL ``message_bodies`` is partitioned by range of
``received_at``, one partition per calendar month (UTC), so that retention
prunes a month with ``DROP TABLE``. The revision creates a partition for
every month that has messages, plus the current and the next month; later
months are created on demand by intake and by pruning. On SQLite the table
is a plain table.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _month_start(value: dt.datetime) -> dt.datetime:
    value = value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return value.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(month: dt.datetime) -> dt.datetime:
    return (month + dt.timedelta(days=32)).replace(day=1)


def _create_partition(month: dt.datetime) -> None:
    # Same name and bounds as carebridge.engine.retention.partition_name;
    # written out here so the revision keeps working if that module changes.
    name = f"message_bodies_{month.year:04d}_{month.month:02d}"
    op.execute(
        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF message_bodies "
        f"FOR VALUES FROM ('{month.isoformat()}') TO ('{_next_month(month).isoformat()}')"
    )


def upgrade() -> None:
    bind = op.get_bind()
    postgresql = bind.dialect.name == "postgresql"
    op.create_table(
        "message_bodies",
        sa.Column("message_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "received_at"),
        postgresql_partition_by="RANGE (received_at)",
    )
    op.create_table(
        "retained_bodies",
        sa.Column("message_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("retained_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    if postgresql:
        stored = bind.execute(
            sa.text("SELECT DISTINCT date_trunc('month', received_at AT TIME ZONE 'UTC') "
                    "FROM messages")
        ).scalars()
        current = _month_start(dt.datetime.now(dt.UTC))
        months = {_month_start(value) for value in stored} | {current, _next_month(current)}
        for month in sorted(months):
            _create_partition(month)
    op.execute(
        "INSERT INTO message_bodies (message_id, received_at, raw) "
        "SELECT id, received_at, raw FROM messages"
    )
    # Plain ALTER TABLE on both backends: SQLite (3.35+) drops and adds
    # these columns in place, where a batch copy of messages would trip the
    # foreign keys that point at it.
    op.drop_column("messages", "raw")
    op.add_column(
        "messages", sa.Column("content_pruned_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("messages", sa.Column("content_archive", sa.String(length=300), nullable=True))


def downgrade() -> None:
    # Pruned content cannot come back from the database: such messages get
    # empty bytes, and their archive file (content_archive) still holds them.
    sqlite = op.get_bind().dialect.name == "sqlite"
    empty = sa.text("X''" if sqlite else "''::bytea")
    op.add_column(
        "messages", sa.Column("raw", sa.LargeBinary(), nullable=False, server_default=empty)
    )
    for table in ("message_bodies", "retained_bodies"):
        op.execute(
            f"UPDATE messages SET raw = (SELECT b.raw FROM {table} b "
            "WHERE b.message_id = messages.id) "
            f"WHERE id IN (SELECT message_id FROM {table})"
        )
    if not sqlite:
        op.alter_column("messages", "raw", server_default=None)
    op.drop_column("messages", "content_archive")
    op.drop_column("messages", "content_pruned_at")
    op.drop_table("retained_bodies")
    op.drop_table("message_bodies")
