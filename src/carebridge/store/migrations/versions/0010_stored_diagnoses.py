"""Store each processed message's diagnoses.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

The claims step read an encounter's diagnoses by mapping its messages
again. A FHIR transaction Bundle of several hundred resources was parsed
again for every check of one of its encounters. Diagnoses are now written
when the message is processed. Messages processed before keep
``diagnoses_stored`` = 0 and are mapped again as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "diagnoses",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("encounter_id", sa.String(100), nullable=False),
        sa.Column("code_system", sa.Text, nullable=False),
        sa.Column("code", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=True),
    )
    op.create_index("ix_diagnoses_encounter", "diagnoses", ["encounter_id"])
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("diagnoses_stored", sa.Integer, nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("diagnoses_stored")
    op.drop_index("ix_diagnoses_encounter", table_name="diagnoses")
    op.drop_table("diagnoses")
