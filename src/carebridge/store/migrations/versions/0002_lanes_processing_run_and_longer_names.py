"""Lanes, the processing run, service fingerprints, the delivery outbox, longer names.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LIVE = sa.text("state != 'dead'")


def upgrade() -> None:
    op.create_table(
        "lanes",
        sa.Column("lane", sa.Integer(), primary_key=True, autoincrement=False),
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("ordering_key", sa.String(length=200), nullable=True))
        # Messages stored before lanes existed have no ordering key, which
        # is lane 0; the server default gives them that lane, the same as
        # schema.py's default for new rows.
        batch.add_column(
            sa.Column("lane", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("processed_run_id", sa.Integer(), nullable=True))
        batch.create_index("ix_messages_state_lane_id", ["state", "lane", "id"])

    with op.batch_alter_table("patients") as batch:
        for column, length in (
            ("family_name", 200),
            ("given_name", 200),
            ("home_phone", 100),
            ("business_phone", 100),
        ):
            batch.alter_column(
                column,
                existing_type=sa.String(length=length),
                type_=sa.Text(),
                existing_nullable=True,
            )

    # Rows from before fingerprints get an empty one. Elsewhere the default
    # is dropped again, as schema.py sets none and an insert that forgets the
    # fingerprint should fail; SQLite keeps it, because dropping a default
    # there means copying the table, which the charge lines' foreign keys
    # to services forbid.
    for table in ("services", "supply_usages"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("fingerprint", sa.String(length=64), nullable=False, server_default="")
            )
        if op.get_bind().dialect.name != "sqlite":
            op.alter_column(table, "fingerprint", server_default=None)

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(length=60), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=300), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_token", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("response", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replay_of", sa.Integer(), sa.ForeignKey("deliveries.id"), nullable=True),
    )
    op.create_index(
        "ix_deliveries_due", "deliveries", ["destination", "state", "next_attempt_at"]
    )
    op.create_index("ix_deliveries_record", "deliveries", ["kind", "record_id"])
    op.create_index(
        "uq_deliveries_live_key",
        "deliveries",
        ["destination", "idempotency_key"],
        unique=True,
        sqlite_where=LIVE,
        postgresql_where=LIVE,
    )

    op.create_table(
        "destination_states",
        sa.Column("destination", sa.String(length=60), primary_key=True),
        sa.Column("circuit", sa.String(length=20), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("destination_states")
    op.drop_table("deliveries")

    for table in ("supply_usages", "services"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("fingerprint")

    # Values longer than the old limits would not fit back: PostgreSQL
    # refuses the downgrade rather than cut them.
    with op.batch_alter_table("patients") as batch:
        for column, length in (
            ("business_phone", 100),
            ("home_phone", 100),
            ("given_name", 200),
            ("family_name", 200),
        ):
            batch.alter_column(
                column,
                existing_type=sa.Text(),
                type_=sa.String(length=length),
                existing_nullable=True,
            )

    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_state_lane_id")
        batch.drop_column("processed_run_id")
        batch.drop_column("lane")
        batch.drop_column("ordering_key")

    op.drop_table("lanes")
