"""The delivery outbox: posted records reach downstream systems once in effect.

The database is the queue. A record's deliveries are inserted by
:func:`enqueue` in the transaction that creates the record, so there is no
moment when one exists without the other. A worker pass
(:func:`run_deliveries`) then, per destination:

1. checks the destination's circuit breaker (``destination_states``);
2. claims a batch of due deliveries in one short transaction, marking them
   ``in_flight`` under a lease (owner, token, expiry). PostgreSQL skips rows
   another worker holds (``FOR UPDATE SKIP LOCKED``); SQLite has one writer;
3. sends each one with no transaction open (a destination that has
   ``send_batch`` gets the whole claim in one call);
4. records each result in a new short transaction, only if the lease token
   is still the one it claimed with.

A worker that dies leaves its deliveries ``in_flight`` until the lease
expires; anyone may then claim them again. The destination may thus see a
key twice, and its ``Idempotency-Key`` handling (409 for a key it has)
makes the second call harmless.

A delivery that fails is retried with full-jitter exponential backoff and
goes ``dead`` after ``max_attempts`` or at once for a permanent refusal.
:func:`replay` puts dead deliveries back in the queue as new rows that name
the dead one in ``replay_of``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Connection, Engine, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from carebridge.config.model import Configuration, DestinationConfig
from carebridge.destinations.registry import (
    BatchDestination,
    Destination,
    Outbound,
    SendResult,
    Verdict,
    build_destination,
)
from carebridge.store.schema import (
    deliveries,
    destination_states,
    journal_lines,
    journals,
    supply_issues,
)

log = logging.getLogger(__name__)

PENDING, IN_FLIGHT, DELIVERED, DEAD = "pending", "in_flight", "delivered", "dead"
STATES = (PENDING, IN_FLIGHT, DELIVERED, DEAD)
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
DETAIL_LIMIT = 500
_ID_CHUNK = 500
_RANDOM = random.Random()


# --------------------------------------------------------------------- time


def utcnow() -> dt.datetime:
    """Return the current time in UTC."""
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; everything stored here is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


class _Clock:
    """The pass's ``now`` plus the time the pass has taken so far."""

    def __init__(self, start: dt.datetime) -> None:
        self._start = start
        self._started = time.monotonic()

    def __call__(self) -> dt.datetime:
        return self._start + dt.timedelta(seconds=time.monotonic() - self._started)


# ------------------------------------------------------------------ backoff


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """Return the longest wait after failed attempt number ``attempt`` (from 1).

    ``base * 2**(attempt - 1)``, never above ``cap``.
    """
    # Bounding the exponent keeps a huge attempt number from overflowing.
    exponent = min(max(attempt - 1, 0), 60)
    return min(cap, base * 2.0**exponent)


def backoff_delay(
    attempt: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Return a wait drawn uniformly from ``[0, backoff_ceiling(...)]``.

    Full jitter spreads the retries of many deliveries that failed together
    (one outage) instead of sending them back in one burst.
    """
    return (rng or _RANDOM).uniform(0.0, backoff_ceiling(attempt, base, cap))


# ------------------------------------------------------------------ enqueue


def idempotency_key(destination: str, kind: str, record_key: str) -> str:
    """Return the key a destination deduplicates a record's delivery by."""
    return f"carebridge:{destination}:{kind}:{record_key}"


def _json_default(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"cannot put {type(value).__name__} in a payload")


def enqueue(
    conn: Connection,
    destination: str,
    kind: str,
    record_id: int,
    key: str,
    payload: Mapping[str, Any] | str,
    *,
    now: dt.datetime | None = None,
) -> int:
    """Promise a record to a destination, inside the caller's transaction.

    Args:
        conn: The connection whose transaction also writes the record.
        destination: The destination's configured name.
        kind: What the record is, e.g. ``journal``.
        record_id: The record's id in its own table.
        key: The idempotency key (see :func:`idempotency_key`).
        payload: The body to send, as JSON text or a mapping to encode.
        now: The time to store, for tests; the current time otherwise.

    Returns:
        The id of the delivery. If this key was already enqueued for this
        destination, the existing delivery's id: a record is promised once.
    """
    existing = conn.execute(
        select(deliveries.c.id)
        .where(
            deliveries.c.destination == destination, deliveries.c.idempotency_key == key
        )
        .order_by(deliveries.c.id.desc())
        .limit(1)
    ).scalar()
    if existing is not None:
        return existing
    if not isinstance(payload, str):
        payload = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), default=_json_default
        )
    moment = now or utcnow()
    return conn.execute(
        insert(deliveries).values(
            destination=destination,
            kind=kind,
            record_id=record_id,
            idempotency_key=key,
            payload=payload,
            state=PENDING,
            attempts=0,
            next_attempt_at=moment,
            created_at=moment,
        )
    ).inserted_primary_key[0]


def _amount(value: Decimal) -> str:
    # PostgreSQL returns NUMERIC(20, 4) with four places and SQLite the text
    # stored; two places when exact keep payloads identical on both.
    cents = value.quantize(Decimal("0.01"))
    return str(cents) if cents == value else str(value.normalize())


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start : start + _ID_CHUNK]


def journal_payloads(conn: Connection, journal_ids: Iterable[int]) -> dict[int, dict]:
    """Return the delivery payload of each journal: header, lines, amounts as text.

    Each line names its source record (charge line or supply issue) and the
    message behind it, so the destination can trace every amount.
    """
    ids = sorted(set(journal_ids))
    payloads: dict[int, dict] = {}
    for chunk in _chunks(ids):
        for row in conn.execute(
            select(journals).where(journals.c.id.in_(chunk))
        ).mappings():
            payloads[row["id"]] = {
                "kind": "journal",
                "journal": {
                    "id": row["id"],
                    "journal_key": row["journal_key"],
                    "posting_batch": row["posting_batch"],
                    "posting_date": row["posting_date"].isoformat(),
                    "department": row["department"],
                    "cost_center": row["cost_center"],
                    "currency": row["currency"],
                    "total_debit": _amount(row["total_debit"]),
                    "total_credit": _amount(row["total_credit"]),
                },
                "lines": [],
            }
        lines = conn.execute(
            select(journal_lines)
            .where(journal_lines.c.journal_id.in_(chunk))
            .order_by(journal_lines.c.journal_id, journal_lines.c.line_no)
        ).mappings()
        for line in lines:
            payloads[line["journal_id"]]["lines"].append(_journal_line(line))
    return payloads


def _journal_line(line: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "line_no": line["line_no"],
        "account": line["account"],
        "debit": _amount(line["debit"]),
        "credit": _amount(line["credit"]),
        "cost_center": line["cost_center"],
        "source_kind": line["source_kind"],
        "source_record_id": line["source_record_id"],
        "source_key": line["source_key"],
        "source_message_id": line["source_message_id"],
    }


def enqueue_journals(
    conn: Connection,
    config: Configuration,
    journal_ids: Iterable[int],
    *,
    now: dt.datetime | None = None,
) -> list[int]:
    """Enqueue each journal for every destination whose ``kinds`` has ``journal``.

    Call inside the posting transaction. A disabled destination still gets
    its deliveries: ``enabled: false`` pauses sending, it does not forget.

    Returns:
        The delivery ids, in journal then destination order.
    """
    targets = [d for d in config.destinations if "journal" in d.kinds]
    if not targets:
        return []
    payloads = journal_payloads(conn, journal_ids)
    created: list[int] = []
    for journal_id, payload in sorted(payloads.items()):
        record_key = payload["journal"]["journal_key"]
        for target in targets:
            key = idempotency_key(target.name, "journal", record_key)
            created.append(
                enqueue(conn, target.name, "journal", journal_id, key, payload, now=now)
            )
    return created


def supply_issue_payloads(conn: Connection, issue_ids: Iterable[int]) -> dict[int, dict]:
    """Return the delivery payload of each supply issue: item, quantity, cost, date.

    The payload names the issue, its journal and its message by id only;
    the usage key (which contains the encounter id) stays in carebridge.
    """
    ids = sorted(set(issue_ids))
    payloads: dict[int, dict] = {}
    for chunk in _chunks(ids):
        rows = conn.execute(
            select(supply_issues).where(supply_issues.c.id.in_(chunk))
        ).mappings()
        for row in rows:
            payloads[row["id"]] = {
                "kind": "supply_issue",
                "issue": {
                    "id": row["id"],
                    "item_code": row["item_code"],
                    "quantity": str(row["quantity"]),
                    "unit_cost": str(row["unit_cost"]),
                    "total_cost": _amount(row["total_cost"]),
                    "currency": row["currency"],
                    "service_date": row["service_date"].isoformat(),
                    "department": row["department"],
                    "expense_account": row["expense_account"],
                    "inventory_account": row["inventory_account"],
                    "journal_id": row["journal_id"],
                    "source_message_id": row["source_message_id"],
                },
            }
    return payloads


def enqueue_supply_issues(
    conn: Connection,
    config: Configuration,
    issue_ids: Iterable[int],
    *,
    now: dt.datetime | None = None,
) -> list[int]:
    """Enqueue each supply issue for every destination whose ``kinds`` has ``supply_issue``.

    Call inside the posting transaction, after the issues are journaled, so
    that an ERP receives the stock movement together with its journal.

    Returns:
        The delivery ids, in issue then destination order.
    """
    targets = [d for d in config.destinations if "supply_issue" in d.kinds]
    if not targets:
        return []
    created: list[int] = []
    for issue_id, payload in sorted(supply_issue_payloads(conn, issue_ids).items()):
        for target in targets:
            key = idempotency_key(target.name, "supply_issue", str(issue_id))
            created.append(
                enqueue(conn, target.name, "supply_issue", issue_id, key, payload, now=now)
            )
    return created


# -------------------------------------------------------------------- claim


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery this worker holds under a lease until ``lease_until``."""

    delivery_id: int
    destination: str
    kind: str
    idempotency_key: str
    payload: str
    attempt: int
    lease_token: str
    lease_until: dt.datetime

    def outbound(self) -> Outbound:
        """Return what the destination is handed."""
        return Outbound(
            self.delivery_id,
            self.destination,
            self.kind,
            self.idempotency_key,
            self.payload,
            self.attempt,
        )


def _due(destination: str, now: dt.datetime):
    c = deliveries.c
    return and_(
        c.destination == destination,
        or_(
            and_(c.state == PENDING, c.next_attempt_at <= now),
            and_(c.state == IN_FLIGHT, c.lease_until <= now),
        ),
    )


def claim(
    engine: Engine,
    destination: DestinationConfig,
    *,
    owner: str,
    now: dt.datetime,
    limit: int,
) -> list[Claim]:
    """Claim up to ``limit`` due deliveries of ``destination`` and commit.

    Due means ``pending`` with ``next_attempt_at`` reached, or ``in_flight``
    with an expired lease (its worker died or stalled). Each claim counts
    as an attempt, so a delivery whose worker keeps dying still ends.
    """
    if limit <= 0:
        return []
    token = uuid.uuid4().hex
    lease_until = now + dt.timedelta(seconds=destination.lease_seconds)
    c = deliveries.c
    due_ids = (
        select(c.id)
        .where(_due(destination.name, now))
        .order_by(c.next_attempt_at, c.id)
        .limit(limit)
    )
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Lock the rows first and update that fixed list: PostgreSQL may
            # run an IN (... SKIP LOCKED LIMIT n) subquery more than once and
            # so claim more than n rows.
            chosen = (
                conn.execute(due_ids.with_for_update(skip_locked=True)).scalars().all()
            )
            target = c.id.in_(chosen or [-1])
        else:
            # SQLite: one statement, so the write lock is taken before the
            # read and two workers cannot pick the same rows.
            target = c.id.in_(due_ids.scalar_subquery())
        conn.execute(
            update(deliveries)
            .where(target, _due(destination.name, now))
            .values(
                state=IN_FLIGHT,
                attempts=c.attempts + 1,
                lease_owner=owner,
                lease_token=token,
                lease_until=lease_until,
            )
        )
        rows = conn.execute(
            select(c.id, c.kind, c.idempotency_key, c.payload, c.attempts)
            .where(c.lease_token == token)
            .order_by(c.next_attempt_at, c.id)
        ).all()
    return [
        Claim(
            row.id,
            destination.name,
            row.kind,
            row.idempotency_key,
            row.payload,
            row.attempts,
            token,
            lease_until,
        )
        for row in rows
    ]


def release(engine: Engine, claims: Sequence[Claim]) -> int:
    """Return unsent claims to ``pending`` without spending an attempt."""
    released = 0
    with engine.begin() as conn:
        for item in claims:
            released += conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.id == item.delivery_id,
                    deliveries.c.lease_token == item.lease_token,
                    deliveries.c.state == IN_FLIGHT,
                )
                .values(
                    state=PENDING,
                    attempts=deliveries.c.attempts - 1,
                    lease_token=None,
                    lease_until=None,
                )
            ).rowcount
    return released


# ---------------------------------------------------------- circuit breaker


def _ensure_state(engine: Engine, destination: str, now: dt.datetime) -> None:
    with engine.connect() as conn:
        found = conn.execute(
            select(destination_states.c.destination).where(
                destination_states.c.destination == destination
            )
        ).scalar()
    if found is not None:
        return
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(destination_states).values(
                    destination=destination,
                    circuit=CLOSED,
                    consecutive_failures=0,
                    updated_at=now,
                )
            )
    except IntegrityError:
        pass  # another worker created it first


def admit(
    engine: Engine, destination: DestinationConfig, now: dt.datetime
) -> tuple[int, bool]:
    """Return how many deliveries the circuit lets this pass claim, and if a trial.

    ``(batch_size, False)`` when closed; ``(0, False)`` while open;
    ``(1, True)`` for the trial once the cool-down is over.

    The switch to ``half_open`` is a compare-and-set, so only one of several
    workers gets the trial. The trial expires after ``lease_seconds`` in
    case that worker dies.
    """
    _ensure_state(engine, destination.name, now)
    s = destination_states.c
    with engine.begin() as conn:
        row = conn.execute(
            select(s.circuit, s.retry_at).where(s.destination == destination.name)
        ).one()
        if row.circuit == CLOSED:
            return destination.batch_size, False
        if _utc(row.retry_at) is not None and _utc(row.retry_at) > now:
            return 0, False
        trial_until = now + dt.timedelta(seconds=destination.lease_seconds)
        won = conn.execute(
            update(destination_states)
            .where(
                s.destination == destination.name,
                s.circuit.in_((OPEN, HALF_OPEN)),
                or_(s.retry_at.is_(None), s.retry_at <= now),
            )
            .values(circuit=HALF_OPEN, retry_at=trial_until, updated_at=now)
        ).rowcount
    return (1, True) if won else (0, False)


def _return_trial(engine: Engine, name: str, now: dt.datetime) -> None:
    # Nothing was due for the trial: let the next pass try straight away.
    s = destination_states.c
    with engine.begin() as conn:
        conn.execute(
            update(destination_states)
            .where(s.destination == name, s.circuit == HALF_OPEN)
            .values(circuit=OPEN, retry_at=now, updated_at=now)
        )


def _breaker_success(conn: Connection, name: str, now: dt.datetime) -> bool:
    """Reset the failure count; return True if this closed an open circuit."""
    s = destination_states.c
    closed = conn.execute(
        update(destination_states)
        .where(s.destination == name, s.circuit != CLOSED)
        .values(circuit=CLOSED, consecutive_failures=0, retry_at=None, updated_at=now)
    ).rowcount
    conn.execute(
        update(destination_states)
        .where(s.destination == name, s.consecutive_failures != 0)
        .values(consecutive_failures=0, updated_at=now)
    )
    return bool(closed)


def _breaker_failure(
    conn: Connection, destination: DestinationConfig, now: dt.datetime, error: str
) -> tuple[str, bool]:
    """Count a failure; return the circuit afterwards and whether it just opened."""
    s = destination_states.c
    name = destination.name
    reopen_at = now + dt.timedelta(seconds=destination.circuit_cooldown_seconds)
    conn.execute(
        update(destination_states)
        .where(s.destination == name)
        .values(
            consecutive_failures=s.consecutive_failures + 1,
            last_error=error,
            updated_at=now,
        )
    )
    # A failed trial re-opens the circuit: the same incident, no new alert.
    conn.execute(
        update(destination_states)
        .where(s.destination == name, s.circuit == HALF_OPEN)
        .values(circuit=OPEN, retry_at=reopen_at)
    )
    opened = conn.execute(
        update(destination_states)
        .where(
            s.destination == name,
            s.circuit == CLOSED,
            s.consecutive_failures >= destination.circuit_failure_threshold,
        )
        .values(circuit=OPEN, opened_at=now, retry_at=reopen_at)
    ).rowcount
    circuit = conn.execute(select(s.circuit).where(s.destination == name)).scalar_one()
    return circuit, bool(opened)


# ------------------------------------------------------------------- record


@dataclass(frozen=True, slots=True)
class Recorded:
    """The result of :func:`record`: the delivery's new state and the circuit's."""

    state: str | None
    circuit: str
    circuit_opened: bool = False
    circuit_closed: bool = False


def _delivery_values(
    destination: DestinationConfig,
    item: Claim,
    result: SendResult,
    now: dt.datetime,
    rng: random.Random | None,
) -> dict[str, Any]:
    detail = result.detail[:DETAIL_LIMIT]
    done = {"lease_token": None, "lease_until": None}
    if result.verdict is Verdict.DELIVERED:
        return {
            **done,
            "state": DELIVERED,
            "delivered_at": now,
            "response": detail,
            "last_error": None,
        }
    if result.verdict is Verdict.DEAD:
        return {
            **done,
            "state": DEAD,
            "dead_at": now,
            "response": detail,
            "last_error": detail,
        }
    if item.attempt >= destination.max_attempts:
        reason = f"gave up after {item.attempt} attempts: {detail}"
        return {
            **done,
            "state": DEAD,
            "dead_at": now,
            "last_error": reason[:DETAIL_LIMIT],
        }
    wait = backoff_delay(
        item.attempt,
        destination.backoff_base_seconds,
        destination.backoff_cap_seconds,
        rng,
    )
    if result.retry_after is not None:
        # The destination requested a wait (RFC 9110 §10.2.3). The cap still
        # bounds it, so a wrong header cannot park a delivery for days.
        wait = max(wait, min(result.retry_after, destination.backoff_cap_seconds))
    return {
        **done,
        "state": PENDING,
        "next_attempt_at": now + dt.timedelta(seconds=wait),
        "last_error": detail,
    }


def record(
    engine: Engine,
    destination: DestinationConfig,
    item: Claim,
    result: SendResult,
    *,
    now: dt.datetime,
    rng: random.Random | None = None,
) -> Recorded:
    """Write a send's result and update the circuit, if the lease is still ours.

    Returns:
        ``state`` None when another worker has claimed the delivery since
        (the lease expired); nothing about the delivery is written then.
    """
    values = _delivery_values(destination, item, result, now, rng)
    c = deliveries.c
    with engine.begin() as conn:
        written = conn.execute(
            update(deliveries)
            .where(
                c.id == item.delivery_id,
                c.lease_token == item.lease_token,
                c.state == IN_FLIGHT,
            )
            .values(**values)
        ).rowcount
        if result.verdict is Verdict.RETRY:
            circuit, opened = _breaker_failure(conn, destination, now, result.detail)
            outcome = Recorded(values["state"] if written else None, circuit, opened)
        else:
            # Any response other than a retryable one shows the destination is up.
            closed = _breaker_success(conn, destination.name, now)
            outcome = Recorded(
                values["state"] if written else None, CLOSED, circuit_closed=closed
            )
    _log_recorded(destination, item, result, outcome, values)
    return outcome


def _log_recorded(
    destination: DestinationConfig,
    item: Claim,
    result: SendResult,
    outcome: Recorded,
    values: Mapping[str, Any],
) -> None:
    extra = {
        "delivery_id": item.delivery_id,
        "destination": destination.name,
        "attempt": item.attempt,
        "status": result.status,
    }
    if outcome.circuit_opened:
        log.warning(
            "circuit opened: deliveries paused",
            extra={
                **extra,
                "action": "circuit_open",
                "cooldown_seconds": destination.circuit_cooldown_seconds,
            },
        )
    if outcome.circuit_closed:
        log.info(
            "circuit closed: deliveries resume",
            extra={**extra, "action": "circuit_closed"},
        )
    if outcome.state is None:
        log.info(
            "lease lost before the result was written",
            extra={**extra, "action": "delivery_lease_lost"},
        )
    elif outcome.state == PENDING:
        log.info(
            "delivery will be retried",
            extra={
                **extra,
                "action": "delivery_retry",
                "next_attempt_at": values["next_attempt_at"],
            },
        )
    elif outcome.state == DEAD:
        log.warning("delivery dead", extra={**extra, "action": "delivery_dead"})
    else:
        log.debug("delivery delivered", extra={**extra, "action": "delivery_done"})


# --------------------------------------------------------------------- pass


@dataclass(frozen=True, slots=True)
class DeliveryPassResult:
    """Counts of one pass over every enabled destination.

    ``lost`` counts results not written because the lease had passed to
    another worker. ``circuit_open`` counts destinations skipped by their
    breaker, and ``released`` counts claims returned unsent.
    """

    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    released: int = 0
    circuit_open: int = 0

    def __add__(self, other: DeliveryPassResult) -> DeliveryPassResult:
        return DeliveryPassResult(
            **{
                f.name: getattr(self, f.name) + getattr(other, f.name)
                for f in fields(self)
            }
        )


def _send(sender: Destination, item: Claim) -> SendResult:
    try:
        return sender.send(item.outbound())
    except Exception as exc:  # a destination bug must not kill the worker
        log.exception(
            "destination failed with an unexpected error",
            extra={
                "action": "delivery_error",
                "delivery_id": item.delivery_id,
                "destination": item.destination,
                "attempt": item.attempt,
            },
        )
        return SendResult(Verdict.RETRY, f"unexpected error {type(exc).__name__}")


def _lease_exhausted(destination: DestinationConfig, item: Claim) -> SendResult | None:
    # Claimed more often than allowed: its workers died holding it each time.
    if item.attempt > destination.max_attempts:
        return SendResult(
            Verdict.DEAD, f"lease expired at each of {item.attempt - 1} attempts"
        )
    return None


def _run_destination(
    engine: Engine,
    destination: DestinationConfig,
    *,
    owner: str,
    clock: _Clock,
    limit: int | None,
    rng: random.Random | None,
) -> DeliveryPassResult:
    allowed, trial = admit(engine, destination, clock())
    if allowed == 0:
        return DeliveryPassResult(circuit_open=1)
    claims = claim(
        engine,
        destination,
        owner=owner,
        now=clock(),
        limit=min(allowed, limit) if limit is not None else allowed,
    )
    if trial and not claims:
        _return_trial(engine, destination.name, clock())
    sender = build_destination(destination) if claims else None
    counts: Counter[str] = Counter(claimed=len(claims))
    if claims and hasattr(sender, "send_batch"):
        batch_sender = cast(BatchDestination, sender)
        counts.update(
            _run_batch(engine, destination, batch_sender, claims, clock=clock, rng=rng)
        )
        return DeliveryPassResult(**counts)
    for index, item in enumerate(claims):
        if clock() >= item.lease_until:
            # Too late to send under this lease: another worker may hold it.
            counts["released"] += release(engine, claims[index:])
            break
        result = _lease_exhausted(destination, item) or _send(sender, item)
        outcome = record(engine, destination, item, result, now=clock(), rng=rng)
        key = {DELIVERED: "delivered", PENDING: "retried", DEAD: "dead", None: "lost"}
        counts[key[outcome.state]] += 1
        if outcome.circuit != CLOSED:
            counts["released"] += release(engine, claims[index + 1 :])
            break
    return DeliveryPassResult(**counts)


def _send_batch(sender: BatchDestination, items: Sequence[Claim]) -> list[SendResult]:
    try:
        results = list(sender.send_batch([item.outbound() for item in items]))
    except Exception as exc:  # a destination bug must not kill the worker
        log.exception(
            "destination failed with an unexpected error",
            extra={
                "action": "delivery_error",
                "destination": items[0].destination,
                "deliveries": len(items),
            },
        )
        results = []
        detail = f"unexpected error {type(exc).__name__}"
    else:
        detail = "the destination returned no result for this delivery"
    if len(results) != len(items):
        results = [SendResult(Verdict.RETRY, detail)] * len(items)
    return results


def _run_batch(
    engine: Engine,
    destination: DestinationConfig,
    sender: BatchDestination,
    claims: Sequence[Claim],
    *,
    clock: _Clock,
    rng: random.Random | None,
) -> Counter[str]:
    """Send all ``claims`` in one ``send_batch`` call, then record each result.

    A destination that implements ``send_batch`` (for example Tryton, where
    each JSON-RPC call has a fixed cost of tens of milliseconds) receives
    the whole claim at once. Every result that is not a retry is recorded even after the
    circuit opens, because the destination has already acted on it. The
    retries left when the circuit opens are released unsent, as in the
    one-by-one path, so one outage does not spend an attempt of each.
    """
    counts: Counter[str] = Counter()
    if clock() >= claims[0].lease_until:
        counts["released"] += release(engine, claims)
        return counts
    results: dict[int, SendResult] = {}
    to_send: list[Claim] = []
    for item in claims:
        exhausted = _lease_exhausted(destination, item)
        if exhausted is not None:
            results[item.delivery_id] = exhausted
        else:
            to_send.append(item)
    if to_send:
        sent = _send_batch(sender, to_send)
        results.update(zip((item.delivery_id for item in to_send), sent, strict=True))
    names = {DELIVERED: "delivered", PENDING: "retried", DEAD: "dead", None: "lost"}
    unsent: list[Claim] = []
    circuit_open = False
    for item in claims:
        result = results[item.delivery_id]
        if circuit_open and result.verdict is Verdict.RETRY:
            unsent.append(item)
            continue
        outcome = record(engine, destination, item, result, now=clock(), rng=rng)
        counts[names[outcome.state]] += 1
        circuit_open = circuit_open or outcome.circuit != CLOSED
    if unsent:
        counts["released"] += release(engine, unsent)
    return counts


def run_deliveries(
    engine: Engine,
    config: Configuration,
    *,
    owner: str,
    now: dt.datetime | None = None,
    limit: int | None = None,
    rng: random.Random | None = None,
) -> DeliveryPassResult:
    """Run one pass: for each enabled destination, claim, send and record.

    Args:
        engine: The database.
        config: Its ``destinations`` are served in order.
        owner: This worker's id, stored with each lease (e.g. host:pid).
        now: The pass's start time, for tests; the current time otherwise.
        limit: At most this many claims per destination (default: its
            ``batch_size``).
        rng: The random source of the backoff jitter, for tests.
    """
    clock = _Clock(now or utcnow())
    log.debug(
        "delivery pass started", extra={"action": "delivery_pass", "owner": owner}
    )
    total = DeliveryPassResult()
    for destination in config.destinations:
        if destination.enabled:
            total += _run_destination(
                engine, destination, owner=owner, clock=clock, limit=limit, rng=rng
            )
    return total


# ------------------------------------------------------------------- replay


def replay(
    conn: Connection,
    delivery_ids: Iterable[int] | None = None,
    destination: str | None = None,
    kind: str | None = None,
    since: dt.datetime | None = None,
    all_dead: bool = False,
    *,
    now: dt.datetime | None = None,
) -> list[int]:
    """Queue dead deliveries again as new ``pending`` rows.

    Filters combine (all must hold); ``since`` compares with the time the
    delivery died. Each copy keeps the payload and idempotency key and
    names its original in ``replay_of``; the original stays ``dead``. A
    dead delivery whose key is already live again (replayed before and not
    dead) is skipped.

    Returns:
        The ids of the new deliveries.

    Raises:
        ValueError: If no filter is given and ``all_dead`` is false.
    """
    ids = None if delivery_ids is None else sorted(set(delivery_ids))
    if ids is None and destination is None and kind is None and since is None:
        if not all_dead:
            raise ValueError("name deliveries, a filter, or all_dead=True")
    c = deliveries.c
    query = select(deliveries).where(c.state == DEAD).order_by(c.id)
    if ids is not None:
        query = query.where(c.id.in_(ids or [-1]))
    if destination is not None:
        query = query.where(c.destination == destination)
    if kind is not None:
        query = query.where(c.kind == kind)
    if since is not None:
        query = query.where(c.dead_at >= since)
    moment = now or utcnow()
    created: list[int] = []
    for row in conn.execute(query).mappings().all():
        if _live(conn, row["destination"], row["idempotency_key"]):
            continue
        created.append(_copy_dead(conn, row, moment))
    log.info(
        "dead deliveries replayed",
        extra={"action": "delivery_replay", "replayed": len(created)},
    )
    return created


def _live(conn: Connection, destination: str, key: str) -> bool:
    c = deliveries.c
    return (
        conn.execute(
            select(c.id)
            .where(
                c.destination == destination, c.idempotency_key == key, c.state != DEAD
            )
            .limit(1)
        ).scalar()
        is not None
    )


def _copy_dead(conn: Connection, row: Mapping[str, Any], now: dt.datetime) -> int:
    new_id = conn.execute(
        insert(deliveries).values(
            destination=row["destination"],
            kind=row["kind"],
            record_id=row["record_id"],
            idempotency_key=row["idempotency_key"],
            payload=row["payload"],
            state=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            replay_of=row["id"],
        )
    ).inserted_primary_key[0]
    log.info(
        "delivery replayed",
        extra={
            "action": "delivery_replay",
            "delivery_id": new_id,
            "replay_of": row["id"],
            "destination": row["destination"],
        },
    )
    return new_id


# ------------------------------------------------------------------ summary


def delivery_summary(conn: Connection) -> dict[str, dict[str, int]]:
    """Count deliveries by destination and state (every state, zeros included)."""
    summary: dict[str, dict[str, int]] = {}
    rows = conn.execute(
        select(deliveries.c.destination, deliveries.c.state, func.count())
        .group_by(deliveries.c.destination, deliveries.c.state)
        .order_by(deliveries.c.destination)
    ).all()
    for name, state, count in rows:
        summary.setdefault(name, dict.fromkeys(STATES, 0))[state] = count
    return summary


def circuit_states(conn: Connection) -> dict[str, dict[str, Any]]:
    """Return each destination's circuit, failure count and reopen time."""
    s = destination_states.c
    return {
        row.destination: {
            "circuit": row.circuit,
            "consecutive_failures": row.consecutive_failures,
            "retry_at": _utc(row.retry_at),
        }
        for row in conn.execute(select(destination_states).order_by(s.destination))
    }
