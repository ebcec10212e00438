"""Backoff of failed deliveries: exponential, capped, full jitter."""

from __future__ import annotations

import random

import pytest

from carebridge.engine.deliveries import backoff_ceiling, backoff_delay, idempotency_key


def test_ceiling_doubles_from_base_until_the_cap() -> None:
    ceilings = [backoff_ceiling(attempt, 1.0, 300.0) for attempt in range(1, 12)]
    assert ceilings[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert ceilings[9:] == [300, 300]
    assert all(a <= b for a, b in zip(ceilings, ceilings[1:], strict=False))


def test_ceiling_survives_absurd_attempt_numbers() -> None:
    assert backoff_ceiling(10_000, 0.5, 60.0) == 60.0
    assert backoff_ceiling(0, 2.0, 60.0) == 2.0


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 30])
def test_jitter_stays_within_zero_and_the_ceiling(attempt: int) -> None:
    rng = random.Random(20240501)
    ceiling = backoff_ceiling(attempt, 1.0, 300.0)
    delays = [backoff_delay(attempt, 1.0, 300.0, rng) for _ in range(2000)]
    assert all(0.0 <= delay <= ceiling for delay in delays)
    # Full jitter spreads over the whole range, not a band near the ceiling.
    assert min(delays) < ceiling * 0.05
    assert max(delays) > ceiling * 0.95


def test_jitter_is_reproducible_with_a_seed() -> None:
    first = [backoff_delay(4, 1.0, 300.0, random.Random(7)) for _ in range(3)]
    second = [backoff_delay(4, 1.0, 300.0, random.Random(7)) for _ in range(3)]
    assert first == second


def test_mean_delay_grows_with_attempts() -> None:
    rng = random.Random(1)

    def mean(attempt: int) -> float:
        return sum(backoff_delay(attempt, 1.0, 300.0, rng) for _ in range(500)) / 500

    means = [mean(attempt) for attempt in (1, 3, 5, 7)]
    assert means == sorted(means)


def test_idempotency_key_names_destination_kind_and_record() -> None:
    key = idempotency_key("erp", "journal", "3:2024-05-01:CLINIC:USD")
    assert key == "carebridge:erp:journal:3:2024-05-01:CLINIC:USD"
