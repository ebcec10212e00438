"""The stock, authorization and procurement steps, run after message processing.

:func:`run_workflow_steps` is called by the main job (after processing,
before journals are posted) and by every worker loop. Each step runs in its
own transaction and is idempotent, so a step killed midway is redone on the
next pass without a second stock move, authorization or purchase order. On
PostgreSQL a step that another worker is running is skipped, not waited for.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select, text

from carebridge import audit
from carebridge.config.model import Configuration
from carebridge.store.schema import rule_versions
from carebridge.workflows import authorizations, procurement, stock
from carebridge.workflows.stock_levels import lock_stock
from carebridge.workflows.work import SYSTEM_ACTOR

log = logging.getLogger(__name__)

_AUTHORIZATION_LOCK = 0x61757468  # "auth": PostgreSQL advisory lock of the message reader
_PROCUREMENT_LOCK = 0x70726F63  # "proc"

_recorded: set[tuple[str, str, str]] = set()
"""(database, version, digest) of the rule versions this process has recorded."""


@dataclass(slots=True)
class StepsResult:
    """Counts of one pass over the steps."""

    rule_versions: int = 0
    stock_counts: int = 0
    issued: int = 0
    held: int = 0
    par_requests: int = 0
    messages_read: int = 0
    authorizations: int = 0
    scheduled: int = 0
    work_items: int = 0
    expiry_warnings: int = 0
    decisions: int = 0

    @property
    def busy(self) -> bool:
        """Whether the pass changed anything, so another pass may find more to do."""
        return bool(self.stock_counts or self.issued or self.messages_read or self.decisions)


def record_rule_versions(engine: Engine, config: Configuration) -> int:
    """Record each rule version in ``rule_versions`` and the audit log the first time it is seen.

    Returns:
        The number of versions recorded now (0 when the database knew them all).
    """
    database = engine.url.render_as_string(hide_password=True)
    pending = [rules for rules in config.rule_book.versions
               if (database, rules.version, rules.digest) not in _recorded]
    if not pending:
        return 0
    recorded = 0
    with engine.begin() as conn:
        for rules in pending:
            known = conn.execute(
                select(rule_versions.c.id).where(rule_versions.c.version == rules.version,
                                                 rule_versions.c.digest == rules.digest)
            ).scalar()
            if known is None:
                version_id = conn.execute(insert(rule_versions).values(
                    version=rules.version, effective_from=rules.effective_from,
                    digest=rules.digest, path=rules.path,
                    first_seen_at=dt.datetime.now(dt.UTC),
                )).inserted_primary_key[0]
                audit.record(conn, SYSTEM_ACTOR, "rules.loaded", "rule_version", version_id,
                             {"version": rules.version, "digest": rules.digest,
                              "effective_from": rules.effective_from, "path": rules.path})
                recorded += 1
                log.info("rule version recorded", extra={"action": "rules_loaded",
                                                         "version": rules.version})
    _recorded.update((database, rules.version, rules.digest) for rules in pending)
    return recorded


def _try_lock(conn: Connection, key: int) -> bool:
    if conn.dialect.name != "postgresql":
        return True
    return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key}).scalar())


def run_workflow_steps(
    engine: Engine,
    config: Configuration,
    *,
    as_of: dt.date | None = None,
    until_idle: bool = False,
) -> StepsResult:
    """Run one pass of every step, or with ``until_idle`` passes until one does nothing.

    Args:
        engine: The carebridge database.
        config: Master data and rule versions.
        as_of: The date expiry warnings are computed for; today when ``None``.
        until_idle: Repeat until a pass finds nothing to do (the main job).
    """
    result = StepsResult()
    result.rule_versions = record_rule_versions(engine, config)
    while True:
        busy = _one_pass(engine, config, as_of or dt.date.today(), result)
        if not (until_idle and busy):
            break
    return result


def _one_pass(engine: Engine, config: Configuration, today: dt.date,
              result: StepsResult) -> bool:
    counts_before = (result.stock_counts, result.issued, result.messages_read, result.decisions)
    with engine.begin() as conn:
        if lock_stock(conn, wait=False):
            result.stock_counts += stock.apply_counts(conn, config)
            moved = stock.move_issues(conn, config)
            result.issued += moved.issued
            result.held = moved.held  # still held after this pass, not a running total
            result.par_requests += moved.requests
    with engine.begin() as conn:
        if _try_lock(conn, _AUTHORIZATION_LOCK):
            read = authorizations.read_messages(conn, config)
            result.messages_read += read.messages
            result.authorizations += read.authorizations
            result.scheduled += read.scheduled
            result.work_items += read.work_items
            result.expiry_warnings += authorizations.warn_expiring(conn, config, today)
    with engine.begin() as conn:
        if _try_lock(conn, _PROCUREMENT_LOCK):
            result.decisions += procurement.sync_decisions(conn, config)
    counts_after = (result.stock_counts, result.issued, result.messages_read, result.decisions)
    return counts_after != counts_before
