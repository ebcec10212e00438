"""Claims and their service lines.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

Adds ``claims`` (one row per version of an encounter's 837P or 837I claim,
with its state, hold reasons and validated X12 text) and ``claim_lines``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _decimal() -> sa.types.TypeEngine:
    # The storage of schema.DecimalText, spelled out as in revision 0001.
    return sa.Numeric().with_variant(sa.String(length=40), "sqlite")


def upgrade() -> None:
    op.create_table(
        "claims",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("encounter_id", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(4), nullable=False),
        sa.Column("frequency_code", sa.String(1), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("claim_reference", sa.String(30), nullable=True),
        sa.Column("patient_control_number", sa.String(38), nullable=False),
        sa.Column("replaces_claim_id", sa.Integer(), sa.ForeignKey("claims.id"), nullable=True),
        sa.Column("original_reference", sa.String(30), nullable=True),
        sa.Column("total", _decimal(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("charge_line_count", sa.Integer(), nullable=False),
        sa.Column("diagnosis_codes", sa.Text(), nullable=True),
        sa.Column("hold_reasons", sa.Text(), nullable=True),
        sa.Column("validation_errors", sa.Text(), nullable=True),
        sa.Column("x12", sa.Text(), nullable=True),
        sa.Column("interchange_control_number", sa.Integer(), nullable=True),
        sa.Column("message_id", sa.Integer(), sa.ForeignKey("messages.id"), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("validated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replaced_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("encounter_id", "version", name="uq_claims_encounter_version"),
    )
    op.create_index("ix_claims_state", "claims", ["state"])
    op.create_table(
        "claim_lines",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("claim_id", sa.Integer(), sa.ForeignKey("claims.id"), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("procedure_code", sa.String(20), nullable=True),
        sa.Column("revenue_code", sa.String(4), nullable=False),
        sa.Column("units", _decimal(), nullable=False),
        sa.Column("amount", _decimal(), nullable=False),
        sa.Column("service_date", sa.Date(), nullable=False),
        sa.Column("charge_line_ids", sa.Text(), nullable=False),
        sa.UniqueConstraint("claim_id", "line_no", name="uq_claim_lines_claim_line"),
    )


def downgrade() -> None:
    op.drop_table("claim_lines")
    op.drop_index("ix_claims_state", table_name="claims")
    op.drop_table("claims")
