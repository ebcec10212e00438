"""Rule versions, stock, authorizations and procurement.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Adds the recorded rule versions, the cursors and marks of workflow steps
that read stored messages again, authorizations and scheduled services,
stock levels and moves, procurement requests with their approval chains,
purchase orders and goods receipts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _decimal() -> sa.types.TypeEngine:
    # The storage of schema.DecimalText, spelled out as in revision 0001.
    return sa.Numeric().with_variant(sa.String(length=40), "sqlite")


def _moment(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _message(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.Integer(), sa.ForeignKey("messages.id"), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "rule_versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("version", sa.String(60), nullable=False),
        sa.Column("effective_from", sa.Date(), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("path", sa.String(300), nullable=False),
        _moment("first_seen_at"),
        sa.UniqueConstraint("version", "digest", name="uq_rule_versions_version_digest"),
    )
    op.create_table(
        "workflow_cursors",
        sa.Column("step", sa.String(40), primary_key=True),
        sa.Column("last_message_id", sa.Integer(), nullable=False),
        _moment("updated_at"),
    )
    op.create_table(
        "workflow_marks",
        sa.Column("step", sa.String(40), primary_key=True),
        sa.Column("message_id", sa.Integer(), sa.ForeignKey("messages.id"), primary_key=True),
    )
    op.create_table(
        "authorizations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("auth_key", sa.String(300), nullable=False, unique=True),
        sa.Column("request_key", sa.String(300), nullable=True),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("patient_id", sa.String(100), nullable=True),
        sa.Column("code_system", sa.String(20), nullable=True),
        sa.Column("code", sa.String(60), nullable=True),
        sa.Column("units", _decimal(), nullable=True),
        sa.Column("valid_from", sa.Date(), nullable=True),
        sa.Column("valid_to", sa.Date(), nullable=True),
        sa.Column("reference", sa.String(120), nullable=True),
        _message("source_message_id"),
        _message("updated_message_id"),
        _moment("created_at"),
        _moment("updated_at"),
    )
    op.create_index(
        "ix_authorizations_patient_code", "authorizations", ["patient_id", "code_system", "code"]
    )
    op.create_index("ix_authorizations_request_key", "authorizations", ["request_key"])
    op.create_table(
        "scheduled_services",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("appointment_key", sa.String(300), nullable=False, unique=True),
        sa.Column("patient_id", sa.String(100), nullable=False),
        sa.Column("code_system", sa.String(20), nullable=False),
        sa.Column("code", sa.String(60), nullable=False),
        sa.Column("scheduled_on", sa.Date(), nullable=False),
        sa.Column("status", sa.String(40), nullable=True),
        sa.Column("authorization_status", sa.String(20), nullable=True),
        _message("message_id"),
        _moment("created_at"),
    )
    op.create_table(
        "stock_levels",
        sa.Column("location", sa.String(40), primary_key=True),
        sa.Column("item_code", sa.String(60), primary_key=True),
        sa.Column("on_hand", _decimal(), nullable=False),
        _moment("updated_at"),
    )
    op.create_table(
        "procurement_requests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_key", sa.String(300), nullable=False, unique=True),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("department", sa.String(40), nullable=False),
        sa.Column("location", sa.String(40), nullable=False),
        sa.Column("category", sa.String(60), nullable=False),
        sa.Column("supplier", sa.String(60), nullable=True),
        sa.Column("item_code", sa.String(60), nullable=False),
        sa.Column("quantity", _decimal(), nullable=False),
        sa.Column("unit_cost", _decimal(), nullable=False),
        sa.Column("amount", _decimal(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("requested_on", sa.Date(), nullable=False),
        sa.Column("needed_by", sa.Date(), nullable=True),
        sa.Column("requested_by", sa.String(120), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("rule_version", sa.String(60), nullable=False),
        _message("message_id"),
        _moment("created_at"),
        _moment("updated_at"),
    )
    op.create_index(
        "ix_procurement_requests_open",
        "procurement_requests",
        ["location", "item_code", "status"],
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "request_id", sa.Integer(), sa.ForeignKey("procurement_requests.id"), nullable=False
        ),
        sa.Column("step_no", sa.Integer(), nullable=False),
        sa.Column("step_name", sa.String(60), nullable=False),
        sa.Column("team", sa.String(40), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("work_item_id", sa.Integer(), sa.ForeignKey("work_items.id"), nullable=True),
        sa.Column("decided_by", sa.String(120), nullable=True),
        _moment("decided_at", nullable=True),
        sa.UniqueConstraint("request_id", "step_no", name="uq_approvals_request_step"),
    )
    op.create_table(
        "purchase_orders",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("po_number", sa.String(40), nullable=False, unique=True),
        sa.Column(
            "request_id",
            sa.Integer(),
            sa.ForeignKey("procurement_requests.id"),
            nullable=False,
            unique=True,
        ),
        sa.Column("supplier", sa.String(60), nullable=False),
        sa.Column("location", sa.String(40), nullable=False),
        sa.Column("item_code", sa.String(60), nullable=False),
        sa.Column("quantity", _decimal(), nullable=False),
        sa.Column("unit_cost", _decimal(), nullable=False),
        sa.Column("amount", _decimal(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("order_date", sa.Date(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("received_quantity", _decimal(), nullable=False),
        _moment("created_at"),
    )
    op.create_table(
        "goods_receipts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("receipt_key", sa.String(300), nullable=False, unique=True),
        sa.Column(
            "purchase_order_id",
            sa.Integer(),
            sa.ForeignKey("purchase_orders.id"),
            nullable=False,
        ),
        sa.Column("quantity", _decimal(), nullable=False),
        sa.Column("lot_number", sa.String(60), nullable=True),
        sa.Column("received_on", sa.Date(), nullable=False),
        sa.Column("received_by", sa.String(120), nullable=False),
        _message("message_id"),
        _moment("created_at"),
    )
    op.create_table(
        "stock_moves",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("move_key", sa.String(300), nullable=False, unique=True),
        sa.Column("location", sa.String(40), nullable=False),
        sa.Column("item_code", sa.String(60), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("quantity", _decimal(), nullable=False),
        sa.Column("on_hand_after", _decimal(), nullable=False),
        sa.Column("moved_on", sa.Date(), nullable=False),
        sa.Column(
            "supply_issue_id", sa.Integer(), sa.ForeignKey("supply_issues.id"), nullable=True
        ),
        sa.Column(
            "goods_receipt_id", sa.Integer(), sa.ForeignKey("goods_receipts.id"), nullable=True
        ),
        _message("message_id", nullable=True),
        _moment("created_at"),
    )
    op.create_index("ix_stock_moves_supply_issue", "stock_moves", ["supply_issue_id"])


def downgrade() -> None:
    op.drop_index("ix_stock_moves_supply_issue", table_name="stock_moves")
    op.drop_table("stock_moves")
    op.drop_table("goods_receipts")
    op.drop_table("purchase_orders")
    op.drop_table("approvals")
    op.drop_index("ix_procurement_requests_open", table_name="procurement_requests")
    op.drop_table("procurement_requests")
    op.drop_table("stock_levels")
    op.drop_table("scheduled_services")
    op.drop_index("ix_authorizations_request_key", table_name="authorizations")
    op.drop_index("ix_authorizations_patient_code", table_name="authorizations")
    op.drop_table("authorizations")
    op.drop_table("workflow_marks")
    op.drop_table("workflow_cursors")
    op.drop_table("rule_versions")
