"""Store messages received over MLLP in groups, then decide each one's ACK.

Frames from every connection go into one queue. A storer task takes what is
queued and stores it with :func:`carebridge.engine.intake.store_inputs` in
one transaction per group, in a thread so that the event loop keeps reading.
Intake returns a receipt for each message, and only then is each message's
future resolved with its ACK. ``AA`` therefore always follows a commit.

ACK policy (HL7 v2.5 chapter 2, 2.9.2 original mode, 2.9.3 enhanced mode):

* header checks fail (MSH-9 type or trigger, MSH-11, MSH-12 not supported):
  ``AR`` with ERR-3 200, 201, 202 or 203. The message is not stored, because
  an ``AR`` leaves it with the sender, and storing it would claim its
  control id (a corrected resend would then get 205). The log line keeps
  its control id.
* the payload cannot be decoded or its header is malformed: it is stored,
  failed with a work item by intake, and acknowledged with ``AE``;
* a resend of a stored message: the original ACK again, rebuilt from the
  original message's id, arrival time and outcome;
* the same control id with different content: ``AE`` with ERR-3 205
  (intake opens the ``control_id_reused`` work item);
* the commit fails: ``AR`` with ERR-3 207, so the sender keeps the message
  and sends it again later; no ``AA`` is ever sent for it.
"""

from __future__ import annotations

import asyncio
import codecs
import datetime as dt
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from sqlalchemy import Engine

from carebridge.config.model import ListenerConfig
from carebridge.engine.intake import DUPLICATE, FAILED, Receipt, store_inputs
from carebridge.errors import ParseError
from carebridge.ingest.files.sources import (
    HL7V2,
    RawInput,
    hl7_content_digest,
    hl7_dedup_key,
    hl7_ordering_key,
    sha256,
)
from carebridge.ingest.hl7v2.ack import AA, AE, AR, AckError, MshEcho, build_ack
from carebridge.ingest.hl7v2.parser import charset_codec, read_header
from carebridge.ingest.registry import HL7V2_CHARSET_FORMAT
from carebridge.workflows.reasons import Reason

log = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"
_UTF8 = codecs.lookup("utf-8").name
_ASCII = codecs.lookup("ascii").name


class ListenerPolicy:
    """Message types, versions and processing ids one listener accepts.

    They are prepared once so that the check of each message is cheap.
    """

    def __init__(self, config: ListenerConfig) -> None:
        self.name = config.name
        self.source = f"mllp:{config.name}"
        self.codec = charset_codec(config.default_charset)
        self.any_trigger = {t.split("^")[0] for t in config.message_types if t.endswith("^*")}
        self.pairs = {tuple(t.split("^")) for t in config.message_types}
        self.codes = {t.split("^")[0] for t in config.message_types}
        self.versions = frozenset(config.versions)
        self.processing_ids = frozenset(config.processing_ids)

    def storage_format(self, codec: str) -> str:
        """Return the stored ``format`` that makes the mapper use ``codec`` by default."""
        if codec in (_UTF8, _ASCII):
            return HL7V2
        return HL7V2_CHARSET_FORMAT + codec

    def unsupported(self, echo: MshEcho) -> AckError | None:
        """Return the AR reason for a header this listener does not accept.

        The order follows chapter 2, 2.9.2: MSH-9, then MSH-11, then MSH-12.
        """
        code, trigger = echo.component(9, 1), echo.component(9, 2)
        if code not in self.codes:
            return AckError(200, "MSH^1^9^1^1", f"message type {code} is not accepted")
        if code not in self.any_trigger and (code, trigger) not in self.pairs:
            return AckError(
                201, "MSH^1^9^1^2", f"event {code}^{trigger} is not accepted"
            )
        processing_id = echo.component(11, 1)
        if processing_id not in self.processing_ids:
            return AckError(
                202, "MSH^1^11", f"processing id {processing_id!r} is not accepted"
            )
        version = echo.component(12, 1)
        if version not in self.versions:
            return AckError(203, "MSH^1^12", f"version {version!r} is not accepted")
        return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Verdict of the checks run on one message before storage.

    ``code`` is ``AA``, ``AE`` (stored, failed) or ``AR`` (not stored);
    ``problem`` is the text intake records on the work item of an ``AE``.
    """

    code: str
    errors: tuple[AckError, ...] = ()
    problem: str | None = None


def parse_error_ack(exc: ParseError) -> AckError:
    """Map a :class:`ParseError` to an ERR segment (HL7 table 0357)."""
    location = exc.location or "MSH^1"
    text = str(exc).removeprefix(f"{location}: ")
    if location == "MSH^1^18":
        unsupported = text.startswith("unsupported character set")
        return AckError(103 if unsupported else 102, location, f"character set problem: {text}")
    if "missing" in text:
        return AckError(101, location, text)
    # A location without a field names a whole segment: its order or framing.
    return AckError(100 if location.count("^") < 2 else 102, location, text)


def assess(payload: bytes, echo: MshEcho, policy: ListenerPolicy) -> tuple[Verdict, str]:
    """Check one payload before storage; return the verdict and stored format."""
    codec = _UTF8 if payload.startswith(_BOM) else policy.codec
    fmt = policy.storage_format(codec)
    try:
        read_header(payload, default_charset=codec)
    except ParseError as exc:
        error = parse_error_ack(exc)
        return Verdict(AE, (error,), problem=str(exc)), fmt
    rejection = policy.unsupported(echo)
    if rejection is not None:
        return Verdict(AR, (rejection,)), fmt
    return Verdict(AA), fmt


@dataclass(slots=True)
class _Pending:
    """One stored-to-be message waiting for its group's commit."""

    raw: RawInput
    source: str
    echo: MshEcho
    verdict: Verdict
    future: asyncio.Future[bytes | None]


def _origin_token() -> str:
    return f"{os.getpid()}-{time.time_ns():x}"


class GroupCommitter:
    """Queue of received messages and the storer task that commits them.

    Args:
        engine: The carebridge database.
        max_group: Maximum number of messages committed in one transaction.
        max_pending: Maximum number of messages waiting for their ACK across all
            connections; :meth:`submit` waits beyond it, which stops the
            listener reading from its sockets (back-pressure).
    """

    def __init__(self, engine: Engine, *, max_group: int = 500, max_pending: int = 5000):
        self.engine = engine
        self.max_group = max_group
        self._slots = asyncio.Semaphore(max_pending)
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._sequence = itertools.count(1)
        self._token = _origin_token()
        self.stored = 0
        self.store_failures = 0

    async def submit(self, payload: bytes, policy: ListenerPolicy, peer: str) -> asyncio.Future[bytes | None]:
        """Queue one framed payload; the future gets its ACK (or None: none due).

        Waits while ``max_pending`` messages are unacknowledged.
        """
        await self._slots.acquire()
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _f: self._slots.release())
        if payload.startswith(_BOM):
            payload_stored = payload[len(_BOM) :]
        else:
            payload_stored = payload
        echo = MshEcho(payload_stored)
        verdict, fmt = assess(payload, echo, policy)
        if verdict.code == AR:
            _log_nak(policy, echo, None, verdict.code, verdict.errors)
            future.set_result(_ack(echo, verdict.code, verdict.errors, None, None))
            return future
        digest = sha256(payload_stored)
        raw = RawInput(
            format=fmt,
            origin=f"mllp:{policy.name}:{peer}:{self._token}:{next(self._sequence)}",
            raw=payload_stored,
            content_sha256=digest,
            dedup_key=hl7_dedup_key(payload_stored, digest),
            problem=verdict.problem,
            dedup_digest=hl7_content_digest(payload_stored),
            ordering_key=hl7_ordering_key(payload_stored),
        )
        self._queue.append(_Pending(raw, policy.source, echo, verdict, future))
        self._wake.set()
        return future

    async def run(self, stop: asyncio.Event) -> None:
        """Commit queued groups until ``stop`` is set and the queue is empty."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                while self._queue:
                    group = [self._queue.popleft() for _ in range(min(self.max_group, len(self._queue)))]
                    receipts = await asyncio.to_thread(self._store, group)
                    for item, receipt in zip(group, receipts, strict=True):
                        _resolve(item, receipt)
                if stop.is_set():
                    return
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait((waker, stopper), return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
        finally:
            stopper.cancel()

    def _store(self, group: list[_Pending]) -> list[Receipt | None]:
        """Store ``group`` and return each message's receipt (runs in a thread).

        A failed commit is retried one message per transaction, so that one
        message the database refuses does not fail the others; a message
        that still fails gets ``None``, which becomes a NAK.
        """
        try:
            receipts = store_group(self.engine, group)
            self.stored += len(group)
            return receipts
        except Exception as exc:  # noqa: BLE001 - the group is answered, never dropped
            # The text of a database error can quote the raw bytes: type only.
            log.error(
                "MLLP group not stored",
                extra={"action": "mllp_store_failed", "messages": len(group),
                       "error_type": type(exc).__name__},
            )
        if len(group) == 1:
            self.store_failures += 1
            return [None]
        return [self._store([item])[0] for item in group]


def store_group(engine: Engine, group: list[_Pending]) -> list[Receipt]:
    """Store one group, one transaction per source, and return its receipts.

    Intake hands back each message's receipt from the transaction that
    stored it, so nothing is read back after the commit.

    Raises:
        Exception: Whatever the database raised; nothing was acknowledged.
    """
    by_source: dict[str, list[int]] = {}
    for position, item in enumerate(group):
        by_source.setdefault(item.source, []).append(position)
    receipts: list[Receipt | None] = [None] * len(group)
    for source, positions in by_source.items():
        found: list[Receipt] = []
        store_inputs(engine, [group[p].raw for p in positions], source=source,
                     batch_size=len(positions), receipts=found)
        if len(found) != len(positions):
            raise LookupError(f"{len(positions) - len(found)} stored message(s) without receipt")
        for position, receipt in zip(positions, found, strict=True):
            receipts[position] = receipt
    return receipts  # type: ignore[return-value]  # every slot was filled above


_REUSED_REASON = Reason.CONTROL_ID_REUSED.value
_REUSED = AckError(
    205, "MSH^1^10",
    "this control id was already used for a message with different content; "
    "both are held for review",
)
_NOT_STORED = AckError(
    207, None, "the message could not be stored; it is not accepted, send it again later"
)


def _resolve(item: _Pending, receipt: Receipt | None) -> None:
    """Give ``item`` its ACK now that its group's commit is settled."""
    if item.future.done():
        return
    if receipt is None:
        code, errors = AR, (_NOT_STORED,)
        item.future.set_result(_ack(item.echo, code, errors, None, None))
        _log_nak_item(item, None, code, errors)
        return
    code, errors = item.verdict.code, item.verdict.errors
    # A duplicate repeats its first copy's acknowledgement: that copy's id, arrival
    # time and, if it reused a control id, the 205 error.
    if receipt.reason == _REUSED_REASON and receipt.state in (FAILED, DUPLICATE):
        code, errors = AE, (*errors, _REUSED)
    ack_id = receipt.duplicate_of if receipt.state == DUPLICATE else receipt.message_id
    item.future.set_result(
        _ack(item.echo, code, errors, ack_id or receipt.message_id, receipt.received_at))
    if code != AA:
        _log_nak_item(item, receipt.message_id, code, errors)


_UNSTORED_IDS = itertools.count(1)
_UNSTORED_TOKEN = f"{os.getpid():x}{int(time.time()):x}"


def _ack(
    echo: MshEcho,
    code: str,
    errors: tuple[AckError, ...],
    message_id: int | None,
    received_at: dt.datetime | None,
) -> bytes | None:
    """Build the ACK, or None when MSH-15 requests no accept acknowledgement for this outcome."""
    if echo.enhanced:
        wanted = echo.accept_ack_type
        if wanted == "NE" or (wanted == "ER" and code == AA) or (wanted == "SU" and code != AA):
            return None
    if message_id is None:
        # Nothing stored: an id that cannot collide with a message's ACK id.
        control_id = f"CBN{_UNSTORED_TOKEN}-{next(_UNSTORED_IDS)}"
        moment = dt.datetime.now(dt.UTC)
    else:
        # Derived from the stored message only, so a resend gets the same ACK.
        control_id, moment = f"CB{message_id}", received_at or dt.datetime.now(dt.UTC)
    return build_ack(echo, code=code, control_id=control_id, timestamp=moment, errors=errors)


def _log_nak(
    policy: ListenerPolicy, echo: MshEcho, message_id: int | None, code: str,
    errors: tuple[AckError, ...],
) -> None:
    # Control ids and message ids only: never field content.
    log.warning(
        "MLLP message not accepted: %s", code,
        extra={"action": "mllp_nak", "listener": policy.name, "code": code,
               "control_id": echo.component(10), "message_id": message_id,
               "errors": [error.code for error in errors]},
    )


def _log_nak_item(
    item: _Pending, message_id: int | None, code: str, errors: tuple[AckError, ...]
) -> None:
    log.warning(
        "MLLP message not accepted: %s", code,
        extra={"action": "mllp_nak", "source": item.source, "code": code,
               "control_id": item.echo.component(10), "message_id": message_id,
               "errors": [error.code for error in errors]},
    )
