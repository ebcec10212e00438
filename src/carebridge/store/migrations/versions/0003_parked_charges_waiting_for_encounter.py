"""Add waits: charges parked until their encounter is registered.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 16:25:03.009082
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('waits',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('wait_key', sa.String(length=200), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], ),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('waits', schema=None) as batch_op:
        batch_op.create_index('ix_waits_state_deadline', ['state', 'deadline'], unique=False)
        batch_op.create_index('ix_waits_state_kind_key', ['state', 'kind', 'wait_key'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('waits', schema=None) as batch_op:
        batch_op.drop_index('ix_waits_state_kind_key')
        batch_op.drop_index('ix_waits_state_deadline')

    op.drop_table('waits')
