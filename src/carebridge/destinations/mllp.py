"""An MLLP destination: each delivery is one HL7 v2 message, acknowledged by an ACK.

Each send opens a new TCP (or TLS) connection, writes one MLLP frame
(``0x0B`` message ``0x1C 0x0D``, HL7 v2.5 appendix C), reads until one
complete frame has arrived or the ACK timeout has passed, and closes the
connection. A fresh connection per message means that an ACK which arrives
late for an earlier exchange can never be read as the answer to this one.

HL7 v2 ties an ACK to its message only through MSA-2, which must equal the
message's MSH-10 (HL7 v2.5 chapter 2, section 2.9). A delivery is therefore
``delivered`` only for ``AA`` or ``CA`` with a matching MSA-2. A stale ACK
(another MSA-2), a reply that is not an ACK, an ACK without MSA-1, a closed
connection and a timeout all leave the delivery pending for a retry. What
``AE``/``CE`` and ``AR``/``CR`` do is set by ``ack_actions``.

HL7 v2 has no ``Idempotency-Key`` header. The destination therefore sets
MSH-10 to a control id derived from the delivery's idempotency key (see
:func:`control_id_for`). A resend after a lost ACK carries the same MSH-10,
so a receiver that deduplicates on it, such as carebridge's own listener,
answers the resend as a duplicate instead of storing it twice.

Only the engine's circuit breaker raises a warning when a receiver stays
unavailable. This module logs single attempts at INFO level at most, so a
retry storm produces one alert, not one per retry.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carebridge.destinations.registry import (
    DestinationType,
    Outbound,
    SendResult,
    Verdict,
    register,
)
from carebridge.ingest.hl7v2.ack import MshEcho
from carebridge.ingest.hl7v2.escapes import Delimiters, unescape
from carebridge.ingest.hl7v2.mllp import FrameDecoder, FrameTooLarge
from carebridge.ingest.hl7v2.parser import charset_codec

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
DETAIL_LIMIT = 300
CONTROL_ID_LENGTH = 20
"""HL7 v2.5 limits MSH-10 (ST) to 20 characters."""
_READ_SIZE = 65536

ACCEPTED = frozenset({"AA", "CA"})
"""MSA-1 codes that accept the message (HL7 table 0008)."""
ERROR_CODES = {"AE": "AE", "CE": "AE"}
REJECT_CODES = {"AR": "AR", "CR": "AR"}


class AckAction(StrEnum):
    """The effect of a negative ACK on its delivery."""

    RETRY = "retry"
    """Send again with backoff; the delivery is dead at ``max_attempts``."""
    DEAD = "dead"
    """Dead at once: the message goes to the dead letters (the error queue)."""
    WORK_ITEM = "work_item"
    """Dead at once, and ``last_error`` states that a person must act."""


DEFAULT_ACK_ACTIONS: dict[str, AckAction] = {"AE": AckAction.DEAD, "AR": AckAction.RETRY}
"""The default policy. ``AE`` means the receiver found an error in the
message, so the same bytes would fail again. ``AR`` also covers a receiver
that cannot process anything right now, so it is retried."""


class MllpSettings(BaseModel):
    """``settings:`` of a destination of type ``mllp``.

    The ``sending_*`` and ``receiving_*`` values are MSH-3 to MSH-6 of the
    messages that :mod:`carebridge.destinations.dft` builds for this
    destination. The sender does not change them in a payload.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    ack_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_ack_bytes: int = Field(default=1024 * 1024, ge=1024)
    ack_actions: dict[Literal["AE", "AR"], AckAction] = Field(
        default_factory=lambda: dict(DEFAULT_ACK_ACTIONS)
    )
    control_id_prefix: str = Field(default="CB", pattern=r"^[A-Za-z0-9]{0,8}$")
    default_charset: str = "UNICODE UTF-8"
    sending_application: str = "CAREBRIDGE"
    sending_facility: str = "CAREBRIDGE"
    receiving_application: str = ""
    receiving_facility: str = ""
    tls: bool = False
    tls_ca_file: str | None = None
    tls_verify: bool = True
    tls_server_name: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @field_validator("ack_actions")
    @classmethod
    def _complete_actions(cls, value: dict[str, AckAction]) -> dict[str, AckAction]:
        # A partial mapping overrides the defaults but does not remove them.
        return {**DEFAULT_ACK_ACTIONS, **value}

    @field_validator("default_charset")
    @classmethod
    def _known_charset(cls, value: str) -> str:
        charset_codec(value)
        return value

    @model_validator(mode="after")
    def _tls_options(self) -> MllpSettings:
        tls_only = {
            "tls_ca_file": self.tls_ca_file,
            "tls_server_name": self.tls_server_name,
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
        }
        if not self.tls:
            given = [name for name, value in tls_only.items() if value]
            if given or not self.tls_verify:
                names = ", ".join(given or ["tls_verify"])
                raise ValueError(f"{names} requires tls: true")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file requires tls_cert_file")
        return self

    def action(self, code: str) -> AckAction:
        """Return the action for a negative MSA-1 (``AE``, ``CE``, ``AR``, ``CR``)."""
        original = ERROR_CODES.get(code) or REJECT_CODES[code]
        return self.ack_actions[original]


def control_id_for(idempotency_key: str, prefix: str = "CB") -> str:
    """Return the MSH-10 that every send of one delivery carries.

    The id is ``prefix`` followed by base32 digits of the key's SHA-256, cut
    to the 20 characters HL7 v2.5 allows. With the default prefix that is
    90 bits, so two keys do not share an id in practice. Only letters and
    digits are used, so the id needs no HL7 escaping.
    """
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).digest()
    letters = base64.b32encode(digest).decode("ascii").rstrip("=")
    return prefix + letters[: CONTROL_ID_LENGTH - len(prefix)]


def message_bytes(payload: str, control_id: str, default_charset: str) -> bytes:
    """Return the payload as HL7 v2 bytes with CR terminators and MSH-10 set.

    The text is encoded in the character set that MSH-18 names, or in
    ``default_charset`` when MSH-18 is empty.

    Raises:
        ValueError: The payload does not start with an MSH segment, names an
            unknown character set, or cannot be encoded in it.
    """
    text = payload.lstrip("\ufeff")
    # HL7 v2.5 section 2.5.2: segments end with CR only.
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    if not text.endswith("\r"):
        text += "\r"
    header, _, rest = text.partition("\r")
    if not header.startswith("MSH") or len(header) < 8:
        raise ValueError("the payload is not an HL7 v2 message (no MSH segment)")
    fields = header.split(header[3])
    while len(fields) < 10:
        fields.append("")
    fields[9] = control_id
    charset = fields[17] if len(fields) > 17 else ""
    if charset:
        charset = charset.split(fields[1][1:2] or "~", 1)[0]
    codec = charset_codec(charset or default_charset)
    try:
        return (header[3].join(fields) + "\r" + rest).encode(codec)
    except UnicodeEncodeError as exc:
        raise ValueError(f"the payload cannot be encoded as {codec}: {exc.reason}") from exc


@dataclass(frozen=True, slots=True)
class AckReply:
    """The fields of a reply that decide a delivery's fate.

    Attributes:
        code: MSA-1, upper case, or ``""`` when it is missing.
        acknowledged_id: MSA-2, the MSH-10 of the message this ACK acknowledges.
        control_id: MSH-10 of the ACK itself.
        errors: Readable text of MSA-3 and each ERR segment.
    """

    code: str
    acknowledged_id: str
    control_id: str
    errors: tuple[str, ...]


class UnreadableAck(ValueError):
    """A reply frame that is not an HL7 v2 ACK."""


def read_ack(frame: bytes) -> AckReply:
    """Read MSA and ERR from one reply frame's payload.

    The reader is lenient about everything except MSH and MSA: a receiver
    that leaves out an optional field still gets its ACK read.

    Raises:
        UnreadableAck: The frame has no MSH header or no MSA segment.
    """
    echo = MshEcho(frame)
    if not echo.fields:
        raise UnreadableAck("the reply is not an HL7 v2 message (no MSH segment)")
    try:
        codec = charset_codec(echo.component(18) or "UNICODE UTF-8")
    except ValueError:
        codec = "utf-8"
    text = frame.decode(codec, errors="replace")
    delimiters = echo.delimiters
    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    msa = next((s for s in segments if s.startswith("MSA" + delimiters.field)), None)
    if msa is None and "MSA" not in segments:
        raise UnreadableAck("the reply has no MSA segment")
    msa_fields = (msa or "MSA").split(delimiters.field)
    errors = []
    message_text = _leaf(msa_fields, 3, delimiters)
    if message_text:
        errors.append(message_text)
    for segment in segments:
        if segment.startswith("ERR" + delimiters.field):
            described = _describe_err(segment.split(delimiters.field), delimiters)
            if described:
                errors.append(described)
    return AckReply(
        code=_leaf(msa_fields, 1, delimiters).upper(),
        acknowledged_id=_leaf(msa_fields, 2, delimiters),
        control_id=echo.component(10),
        errors=tuple(errors),
    )


def _leaf(fields: list[str], number: int, d: Delimiters, component: int = 1) -> str:
    """Return one component of a segment's field, unescaped and stripped."""
    if number >= len(fields):
        return ""
    value = fields[number].split(d.repetition, 1)[0]
    parts = value.split(d.component)
    if component > len(parts):
        return ""
    return unescape(parts[component - 1].split(d.subcomponent, 1)[0], d).strip()


def _describe_err(fields: list[str], d: Delimiters) -> str:
    """Return ``code text: message`` from ERR-3 and ERR-8 (v2.5), else ERR-1 (v2.3)."""
    code, name, user_text = _leaf(fields, 3, d), _leaf(fields, 3, d, 2), _leaf(fields, 8, d)
    if not (code or name or user_text) and len(fields) > 1:
        # HL7 v2.3 puts everything in ERR-1: segment^sequence^field^code&text.
        condition = fields[1].split(d.repetition, 1)[0].split(d.component)
        if len(condition) >= 4:
            code, _, name = condition[3].partition(d.subcomponent)
    head = " ".join(part for part in (code, name) if part)
    return f"{head}: {user_text}" if head and user_text else head or user_text


class _NoAck(Exception):
    """The exchange ended without a complete reply frame."""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


class MllpDestination:
    """Sends each delivery's HL7 v2 payload over MLLP and judges the ACK."""

    def __init__(self, name: str, settings: MllpSettings) -> None:
        self.name = name
        self.settings = settings
        self._tls_context: ssl.SSLContext | None = None

    @classmethod
    def build(cls, name: str, settings: BaseModel) -> MllpDestination:
        """Build from validated settings (the registry's constructor)."""
        if not isinstance(settings, MllpSettings):
            raise TypeError(f"expected MllpSettings, got {type(settings).__name__}")
        return cls(name, settings)

    def control_id(self, outbound: Outbound) -> str:
        """Return the MSH-10 that ``outbound`` is sent with."""
        return control_id_for(outbound.idempotency_key, self.settings.control_id_prefix)

    def send(self, outbound: Outbound) -> SendResult:
        """Send ``outbound.payload`` once and return the outcome as a result."""
        control_id = self.control_id(outbound)
        try:
            message = message_bytes(
                outbound.payload, control_id, self.settings.default_charset
            )
        except ValueError as exc:
            # The same payload would fail the same way at every attempt.
            return SendResult(Verdict.DEAD, _short(f"not sent: {exc}"))
        try:
            frame = self.exchange(message)
        except _NoAck as exc:
            return self._retry(outbound, control_id, str(exc))
        except (OSError, ssl.SSLError) as exc:
            # Refused, reset or timed out: the receiver may or may not have
            # the message, and the fixed MSH-10 makes a resend safe.
            return self._retry(outbound, control_id, f"{type(exc).__name__}: {exc}")
        return self.judge(outbound, control_id, frame)

    def exchange(self, message: bytes) -> bytes:
        """Write one frame on a new connection and return the first reply frame.

        The reply may arrive in any number of reads , so this
        returns only once its ``0x1C 0x0D`` trailer has arrived.

        Raises:
            _NoAck: The connection closed, the reply grew beyond
                ``max_ack_bytes``, or ``ack_timeout_seconds`` passed first.
            OSError: The connection could not be opened or broke.
        """
        settings = self.settings
        sock = socket.create_connection(
            (settings.host, settings.port), timeout=settings.connect_timeout_seconds
        )
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if settings.tls:
                sock = self._context().wrap_socket(
                    sock, server_hostname=settings.tls_server_name or settings.host
                )
            sock.settimeout(settings.ack_timeout_seconds)
            sock.sendall(START_BLOCK + message + END_BLOCK)
            return self._read_reply(sock)
        finally:
            sock.close()

    def _read_reply(self, sock: socket.socket) -> bytes:
        timeout = self.settings.ack_timeout_seconds
        deadline = time.monotonic() + timeout
        decoder = FrameDecoder(self.settings.max_ack_bytes)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _NoAck(f"no ACK within {timeout:g} s{_stray(decoder)}")
            sock.settimeout(remaining)
            try:
                data = sock.recv(_READ_SIZE)
            except TimeoutError:
                raise _NoAck(f"no ACK within {timeout:g} s{_stray(decoder)}") from None
            if not data:
                raise _NoAck(
                    f"connection closed before a complete ACK{_stray(decoder)}"
                )
            try:
                frames = decoder.feed(data)
            except FrameTooLarge:
                raise _NoAck(
                    f"reply larger than max_ack_bytes ({self.settings.max_ack_bytes})"
                ) from None
            if frames:
                return frames[0]

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            settings = self.settings
            context = ssl.create_default_context(cafile=settings.tls_ca_file)
            if not settings.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if settings.tls_cert_file:
                context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
            self._tls_context = context
        return self._tls_context

    def judge(self, outbound: Outbound, control_id: str, frame: bytes) -> SendResult:
        """Return the result that the reply ``frame`` means for ``outbound``."""
        try:
            ack = read_ack(frame)
        except UnreadableAck as exc:
            return self._retry(outbound, control_id, f"unreadable reply: {exc}")
        if not ack.code:
            return self._retry(outbound, control_id, "ACK without MSA-1")
        if ack.acknowledged_id != control_id:
            return self._retry(
                outbound,
                control_id,
                f"stale ACK: MSA-2 {ack.acknowledged_id or '(empty)'} "
                f"does not match MSH-10 {control_id}",
            )
        summary = f"{ack.code} MSA-2={ack.acknowledged_id} ACK MSH-10={ack.control_id}"
        if ack.code in ACCEPTED:
            return SendResult(Verdict.DELIVERED, _short(summary))
        if ack.code not in ERROR_CODES and ack.code not in REJECT_CODES:
            return self._retry(outbound, control_id, f"unknown MSA-1 {ack.code!r}")
        detail = f"{summary}: {'; '.join(ack.errors)}" if ack.errors else summary
        action = self.settings.action(ack.code)
        if action is AckAction.RETRY:
            return SendResult(Verdict.RETRY, _short(detail))
        if action is AckAction.WORK_ITEM:
            detail = f"a person must act (work_item): {detail}"
        return SendResult(Verdict.DEAD, _short(detail))

    def _retry(self, outbound: Outbound, control_id: str, reason: str) -> SendResult:
        # INFO only: the circuit breaker gives the one warning per incident.
        log.info(
            "MLLP send not acknowledged",
            extra={
                "action": "mllp_send_unacknowledged",
                "destination": self.name,
                "delivery_id": outbound.delivery_id,
                "attempt": outbound.attempt,
                "control_id": control_id,
                "reason": reason,
            },
        )
        return SendResult(Verdict.RETRY, _short(reason))


def _stray(decoder: FrameDecoder) -> str:
    dropped = decoder.stray_bytes + decoder.partial_bytes
    return f" ({dropped} bytes outside a complete frame)" if dropped else ""


MLLP = DestinationType("mllp", MllpSettings, MllpDestination.build)
register(MLLP)
