"""Approved patient merges.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

Adds ``patient_links``: one row per merge a person approved from a
duplicate-patient work item, naming the merged and the surviving patient.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient_links",
        sa.Column("merged_patient_id", sa.String(100), primary_key=True),
        sa.Column("surviving_patient_id", sa.String(100), nullable=False),
        sa.Column("work_item_id", sa.Integer(), sa.ForeignKey("work_items.id"),
                  nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("linked_by", sa.String(120), nullable=False),
        sa.Column("repointed", sa.Text(), nullable=False),
    )
    op.create_index("ix_patient_links_surviving", "patient_links", ["surviving_patient_id"])


def downgrade() -> None:
    op.drop_index("ix_patient_links_surviving", table_name="patient_links")
    op.drop_table("patient_links")
