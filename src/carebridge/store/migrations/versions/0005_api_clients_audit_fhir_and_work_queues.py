"""API clients and keys, the audit chain, FHIR resources and work queues.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

Adds what the FHIR and operations API needs: clients with roles, API keys,
the hash-chained audit log, versioned FHIR resources with their
conditional-create keys, the work-queue columns of ``work_items`` (assignee,
SLA deadline, priority, resolution) with their history, and
``messages.replay_of``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _decimal() -> sa.types.TypeEngine:
    # The storage of schema.DecimalText, spelled out as in revision 0001.
    return sa.Numeric().with_variant(sa.String(length=40), "sqlite")


def upgrade() -> None:
    # Plain ADD COLUMN, not batch mode: SQLite would rebuild the tables, and
    # other tables' foreign keys point at them. ``replay_of`` therefore has
    # no foreign key; it is set only by carebridge to an existing id.
    op.add_column("messages", sa.Column("replay_of", sa.Integer(), nullable=True))
    for column in (
        sa.Column("assignee", sa.String(120), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("priority_reason", sa.Text(), nullable=True),
        sa.Column("amount_at_risk", _decimal(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(120), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
    ):
        op.add_column("work_items", column)
    op.create_index("ix_work_items_team_status", "work_items", ["team", "status"])
    op.create_table(
        "work_item_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("work_item_id", sa.Integer(), sa.ForeignKey("work_items.id"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_work_item_events_item", "work_item_events", ["work_item_id", "id"])
    op.create_table(
        "api_clients",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.String(120), nullable=False, unique=True),
        sa.Column("roles", sa.String(300), nullable=False),
        sa.Column("secret_hash", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "client_id",
            sa.String(120),
            sa.ForeignKey("api_clients.client_id"),
            nullable=False,
        ),
        sa.Column("key_id", sa.String(40), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("action", sa.String(60), nullable=False),
        sa.Column("object_type", sa.String(60), nullable=False),
        sa.Column("object_id", sa.String(200), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "fhir_resources",
        sa.Column("resource_type", sa.String(60), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=True),
        sa.Column("is_current", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "resource_id", "version_id"),
    )
    op.create_index(
        "ix_fhir_resources_current",
        "fhir_resources",
        ["resource_type", "resource_id", "is_current"],
    )
    op.create_table(
        "fhir_conditional_keys",
        sa.Column("resource_type", sa.String(60), nullable=False),
        sa.Column("criteria", sa.String(500), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "criteria"),
    )


def downgrade() -> None:
    op.drop_table("fhir_conditional_keys")
    op.drop_index("ix_fhir_resources_current", table_name="fhir_resources")
    op.drop_table("fhir_resources")
    op.drop_table("audit_events")
    op.drop_table("api_keys")
    op.drop_table("api_clients")
    op.drop_index("ix_work_item_events_item", table_name="work_item_events")
    op.drop_table("work_item_events")
    op.drop_index("ix_work_items_team_status", table_name="work_items")
    for name in (
        "resolution", "resolved_by", "resolved_at", "amount_at_risk",
        "priority_reason", "priority", "due_at", "claimed_at", "assignee",
    ):
        op.drop_column("work_items", name)
    op.drop_column("messages", "replay_of")
