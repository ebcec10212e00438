"""Destination types by name, and the interface every destination implements.

The delivery engine (:mod:`carebridge.engine.deliveries`) reaches a
destination only through :func:`build_destination`. The configuration
checks a destination's ``settings`` through :func:`validate_settings`.
A new type is therefore added by registering it here, and neither changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel

from carebridge.config.model import DestinationConfig


class Verdict(StrEnum):
    """The outcome a send attempt has for its delivery."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One delivery as handed to a destination."""

    delivery_id: int
    destination: str
    kind: str
    idempotency_key: str
    payload: str
    attempt: int


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one send.

    ``detail`` is short text for the outbox row (status and remote id, or
    the error); it must not repeat the payload. ``retry_after`` is the
    destination's own request to wait, in seconds, when it gave one.
    """

    verdict: Verdict
    detail: str
    status: int | None = None
    retry_after: float | None = None


class Destination(Protocol):
    """A downstream system that accepts deliveries."""

    name: str

    def send(self, outbound: Outbound) -> SendResult:
        """Deliver ``outbound`` once and return the result.

        A failed delivery is a result, not an exception; the engine still
        catches an exception and retries the delivery.
        """
        ...


class BatchDestination(Destination, Protocol):
    """A destination that takes a whole claim in one call.

    The engine calls :meth:`send_batch` instead of :meth:`send` when a
    destination has it, for systems where each call costs far more than
    each record in it (Tryton's JSON-RPC).
    """

    def send_batch(self, outbounds: Sequence[Outbound]) -> list[SendResult]:
        """Deliver ``outbounds`` and return one result per delivery, in order."""
        ...


@dataclass(frozen=True, slots=True)
class DestinationType:
    """A kind of destination: its settings model and how to build one."""

    name: str
    settings_model: type[BaseModel]
    build: Callable[[str, BaseModel], Destination]


_TYPES: dict[str, DestinationType] = {}


def register(kind: DestinationType) -> None:
    """Make ``kind`` available under ``kind.name``.

    Raises:
        ValueError: If another type already has that name.
    """
    existing = _TYPES.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"destination type {kind.name!r} is already registered")
    _TYPES[kind.name] = kind


_BUILTINS_LOADED = False


def _register_builtins() -> None:
    # Imported on first use, not at the top: the built-in types import this
    # module for the interface above.
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    from carebridge.destinations import (
        http,
        mllp,  # noqa: F401 - registers itself
        tryton,  # noqa: F401 - registers itself
    )

    register(DestinationType("http", http.HttpSettings, http.HttpDestination.build))
    _BUILTINS_LOADED = True


def type_names() -> tuple[str, ...]:
    """Return the names of every registered destination type, sorted."""
    _register_builtins()
    return tuple(sorted(_TYPES))


def destination_type(name: str) -> DestinationType:
    """Return the destination type called ``name``.

    Raises:
        LookupError: If no type has that name; the message lists the known ones.
    """
    _register_builtins()
    try:
        return _TYPES[name]
    except KeyError:
        known = ", ".join(sorted(_TYPES))
        message = f"unknown destination type {name!r} (known: {known})"
        raise LookupError(message) from None


def validate_settings(type_name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``settings`` against the type's model and return them normalised.

    Raises:
        LookupError: For an unknown type.
        pydantic.ValidationError: For settings the type does not accept.
    """
    model = destination_type(type_name).settings_model
    return model.model_validate(dict(settings)).model_dump()


def build_destination(config: DestinationConfig) -> Destination:
    """Build the live destination that ``config`` describes."""
    kind = destination_type(config.type)
    return kind.build(config.name, kind.settings_model.model_validate(config.settings))
