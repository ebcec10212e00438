"""The initial schema: the tables carebridge 0.1.0 created with ``create_all``.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _decimal() -> sa.types.TypeEngine:
    # What schema.DecimalText stores: text on SQLite (which has no exact
    # decimal), unscaled NUMERIC elsewhere. Spelled out here so that this
    # revision keeps meaning the same schema whatever schema.py becomes.
    return sa.Numeric().with_variant(sa.String(length=40), "sqlite")


def _message_fk(column: str) -> sa.Column:
    return sa.Column(column, sa.Integer(), sa.ForeignKey("messages.id"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("origin", sa.String(length=500), nullable=True),
        sa.Column("format", sa.String(length=40), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("dedup_key", sa.String(length=300), nullable=False),
        sa.Column("occurrence", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("duplicate_of", sa.Integer(), sa.ForeignKey("messages.id"), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_id", sa.Integer(), nullable=True),
    )
    op.create_index("ix_messages_state_id", "messages", ["state", "id"])
    op.create_index("ix_messages_dedup_key", "messages", ["dedup_key"])

    op.create_table(
        "message_keys",
        sa.Column("dedup_key", sa.String(length=300), primary_key=True),
        _message_fk("message_id"),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
    )

    op.create_table(
        "patients",
        sa.Column("patient_id", sa.String(length=100), primary_key=True),
        sa.Column("mrn", sa.String(length=100), nullable=True),
        sa.Column("family_name", sa.String(length=200), nullable=True),
        sa.Column("given_name", sa.String(length=200), nullable=True),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("gender", sa.String(length=20), nullable=True),
        sa.Column("home_phone", sa.String(length=100), nullable=True),
        sa.Column("business_phone", sa.String(length=100), nullable=True),
        _message_fk("source_message_id"),
        _message_fk("updated_message_id"),
    )

    op.create_table(
        "encounters",
        sa.Column("encounter_id", sa.String(length=100), primary_key=True),
        sa.Column("patient_id", sa.String(length=100), nullable=False),
        sa.Column("encounter_class", sa.String(length=40), nullable=True),
        sa.Column("start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("code", sa.String(length=40), nullable=True),
        sa.Column("code_system", sa.String(length=20), nullable=True),
        sa.Column("department", sa.String(length=40), nullable=True),
        sa.Column("guarantor", sa.Text(), nullable=True),
        _message_fk("source_message_id"),
        _message_fk("updated_message_id"),
    )

    op.create_table(
        "work_items",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("subject_key", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("team", sa.String(length=40), nullable=False),
        _message_fk("message_id"),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("subject_key", "reason", name="uq_work_items_subject_reason"),
    )

    op.create_table(
        "services",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("service_key", sa.String(length=300), nullable=False),
        _message_fk("message_id"),
        sa.Column("origin", sa.String(length=20), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("code_system", sa.String(length=20), nullable=True),
        sa.Column("code", sa.String(length=60), nullable=True),
        sa.Column("quantity", _decimal(), nullable=True),
        sa.Column("service_date", sa.Date(), nullable=True),
        sa.Column("patient_id", sa.String(length=100), nullable=True),
        sa.Column("encounter_id", sa.String(length=100), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("work_item_id", sa.Integer(), sa.ForeignKey("work_items.id"), nullable=True),
    )
    op.create_index("ix_services_key", "services", ["service_key"])

    op.create_table(
        "journals",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("journal_key", sa.String(length=120), nullable=False, unique=True),
        sa.Column("posting_batch", sa.Integer(), nullable=False),
        sa.Column("posting_date", sa.Date(), nullable=False),
        sa.Column("department", sa.String(length=40), nullable=False),
        sa.Column("cost_center", sa.String(length=40), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("total_debit", _decimal(), nullable=False),
        sa.Column("total_credit", _decimal(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )

    op.create_table(
        "charge_lines",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("service_key", sa.String(length=300), nullable=False, unique=True),
        sa.Column("service_id", sa.Integer(), sa.ForeignKey("services.id"), nullable=False),
        sa.Column("charge_code", sa.String(length=60), nullable=False),
        sa.Column("revenue_code", sa.String(length=4), nullable=False),
        sa.Column("hcpcs", sa.String(length=20), nullable=True),
        sa.Column("units", _decimal(), nullable=False),
        sa.Column("unit_price", _decimal(), nullable=False),
        sa.Column("amount", _decimal(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("service_date", sa.Date(), nullable=False),
        sa.Column("department", sa.String(length=40), nullable=False),
        sa.Column("gl_account", sa.String(length=40), nullable=False),
        sa.Column("patient_id", sa.String(length=100), nullable=True),
        sa.Column("encounter_id", sa.String(length=100), nullable=True),
        _message_fk("source_message_id"),
        sa.Column("chargemaster_version", sa.String(length=60), nullable=False),
        sa.Column("journal_id", sa.Integer(), sa.ForeignKey("journals.id"), nullable=True),
    )

    op.create_table(
        "supply_usages",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("usage_key", sa.String(length=300), nullable=False),
        _message_fk("message_id"),
        sa.Column("code_system", sa.String(length=20), nullable=True),
        sa.Column("code", sa.String(length=60), nullable=True),
        sa.Column("quantity", _decimal(), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("work_item_id", sa.Integer(), sa.ForeignKey("work_items.id"), nullable=True),
    )
    op.create_index("ix_supply_usages_key", "supply_usages", ["usage_key"])

    op.create_table(
        "supply_issues",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("usage_key", sa.String(length=300), nullable=False, unique=True),
        sa.Column("usage_id", sa.Integer(), sa.ForeignKey("supply_usages.id"), nullable=False),
        sa.Column("item_code", sa.String(length=60), nullable=False),
        sa.Column("quantity", _decimal(), nullable=False),
        sa.Column("unit_cost", _decimal(), nullable=False),
        sa.Column("total_cost", _decimal(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("service_date", sa.Date(), nullable=False),
        sa.Column("department", sa.String(length=40), nullable=False),
        sa.Column("expense_account", sa.String(length=40), nullable=False),
        sa.Column("inventory_account", sa.String(length=40), nullable=False),
        sa.Column("encounter_id", sa.String(length=100), nullable=True),
        _message_fk("source_message_id"),
        sa.Column("journal_id", sa.Integer(), sa.ForeignKey("journals.id"), nullable=True),
    )

    op.create_table(
        "journal_lines",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("journal_id", sa.Integer(), sa.ForeignKey("journals.id"), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=40), nullable=False),
        sa.Column("debit", _decimal(), nullable=False),
        sa.Column("credit", _decimal(), nullable=False),
        sa.Column("cost_center", sa.String(length=40), nullable=False),
        sa.Column("source_kind", sa.String(length=20), nullable=False),
        sa.Column("source_record_id", sa.Integer(), nullable=False),
        sa.Column("source_key", sa.String(length=300), nullable=False),
        _message_fk("source_message_id"),
        sa.UniqueConstraint("journal_id", "line_no", name="uq_journal_lines_journal_line"),
    )

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("command", sa.String(length=40), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("chargemaster_version", sa.String(length=60), nullable=True),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; children go before their parents.
    for table in (
        "runs",
        "journal_lines",
        "supply_issues",
        "supply_usages",
        "charge_lines",
        "journals",
        "services",
        "work_items",
        "encounters",
        "patients",
        "message_keys",
        "messages",
    ):
        op.drop_table(table)
