"""HTTP status classification for deliveries, and the http destination's settings."""

from __future__ import annotations

import datetime as dt

import pydantic
import pytest

from carebridge.config.model import DestinationConfig
from carebridge.destinations.http import (
    HttpDestination,
    HttpSettings,
    classify_status,
    describe_response,
    parse_retry_after,
)
from carebridge.destinations.registry import (
    Outbound,
    Verdict,
    build_destination,
    destination_type,
    type_names,
    validate_settings,
)

CLASSIFICATION = [
    (200, Verdict.DELIVERED),
    (201, Verdict.DELIVERED),
    (202, Verdict.DELIVERED),
    (204, Verdict.DELIVERED),
    (409, Verdict.DELIVERED),  # the destination already has this key
    (408, Verdict.RETRY),
    (429, Verdict.RETRY),
    (500, Verdict.RETRY),
    (502, Verdict.RETRY),
    (503, Verdict.RETRY),
    (504, Verdict.RETRY),
    (301, Verdict.DEAD),
    (307, Verdict.DEAD),
    (400, Verdict.DEAD),
    (401, Verdict.DEAD),
    (403, Verdict.DEAD),
    (404, Verdict.DEAD),
    (405, Verdict.DEAD),
    (410, Verdict.DEAD),
    (413, Verdict.DEAD),
    (415, Verdict.DEAD),
    (422, Verdict.DEAD),
]


@pytest.mark.parametrize(("status", "verdict"), CLASSIFICATION)
def test_classification_table(status: int, verdict: Verdict) -> None:
    assert classify_status(status) is verdict


def test_connection_refused_is_retryable() -> None:
    # Port 9 (discard) on 127.0.0.1 is closed on a test machine.
    destination = HttpDestination(
        "t", HttpSettings(url="http://127.0.0.1:9/x", timeout_seconds=2)
    )
    result = destination.send(Outbound(1, "t", "journal", "k", "{}", 1))
    assert result.verdict is Verdict.RETRY
    assert result.status is None
    assert "Connection" in result.detail or "refused" in result.detail.lower()


def test_retry_after_seconds_and_http_date() -> None:
    now = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_response_text_is_short_and_names_the_status() -> None:
    text = describe_response(400, "Bad Request", b'{"error": "' + b"x" * 5000 + b'"}')
    assert text.startswith("400 Bad Request: ")
    assert len(text) <= 300
    assert describe_response(201, "Created", b'{"id": "J-7"}') == "201 Created id=J-7"
    assert describe_response(204, "No Content", b"") == "204 No Content"


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x", "http:///no-host", "not a url", "https://user:pw@host/x"],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        HttpSettings(url=url)


def test_registry_builds_http_and_refuses_unknown_types() -> None:
    assert "http" in type_names()
    assert destination_type("http").settings_model is HttpSettings
    settings = validate_settings("http", {"url": "http://127.0.0.1:8080/j"})
    assert settings == {"url": "http://127.0.0.1:8080/j", "timeout_seconds": 10.0}
    config = DestinationConfig("erp", "http", ("journal",), settings)
    assert isinstance(build_destination(config), HttpDestination)
    with pytest.raises(LookupError, match="unknown destination type 'sftp'.*http"):
        destination_type("sftp")
    with pytest.raises(pydantic.ValidationError):
        validate_settings("http", {"url": "http://h/x", "verify": False})
