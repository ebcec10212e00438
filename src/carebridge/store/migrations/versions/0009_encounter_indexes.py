"""Index services and charge lines by encounter.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05

The claims step reads each closed encounter's services and charge lines; a
load of 100,000 messages holds about 16,000 encounters, and without these
indexes every batch of encounters read both tables whole.
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_services_encounter", "services", ["encounter_id"])
    op.create_index("ix_charge_lines_encounter", "charge_lines", ["encounter_id"])


def downgrade() -> None:
    op.drop_index("ix_charge_lines_encounter", table_name="charge_lines")
    op.drop_index("ix_services_encounter", table_name="services")
