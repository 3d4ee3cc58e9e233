"""Retry decisions as pure functions: what an answer means, and how long to wait.

No I/O and no clock or randomness of its own: callers pass the jitter draw and "now", so
every decision is reproducible in tests. The loop that sleeps and re-sends is in `vspc.py`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import orjson

from syncd import errors

# Client errors VSPC keeps as such: sending the same request again cannot help.
NEVER_RETRY = frozenset({400, 403, 404, 405, 409, 415})
RETRYABLE_ERROR_TYPES = frozenset({"transport", "retryableLogical"})
# VSPC's own verdict that a server error is not transient.
FINAL_ERROR_TYPES = frozenset({"logical", "security"})
UNSUPPORTED_API_VERSION = "UnsupportedApiVersion"


class Verdict(enum.Enum):
    """What to do with a non-200 answer."""

    RETRY = "retry"
    REAUTHENTICATE = "reauthenticate"
    FAIL = "fail"
    UNSUPPORTED_VERSION = "unsupported_version"


@dataclass(frozen=True)
class ErrorBody:
    """What an error body says, in either of VSPC's shapes (or nothing, if it is not JSON).

    `{"errors": [{"message", "type", "code", "retryAfter"}]}` for API errors, and
    `{"error": {"code": "UnsupportedApiVersion", "message"}}` for the version check.
    """

    message: str | None = None
    types: tuple[str, ...] = ()
    code: str | None = None
    retry_after_s: float | None = None


def parse_error_body(body: bytes) -> ErrorBody:
    """Reads an error body leniently: any part that is missing or malformed is left out."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ErrorBody()
    if not isinstance(document, dict):
        return ErrorBody()
    single = document.get("error")
    if isinstance(single, dict):
        message = _text(single.get("message"))
        code = _text(single.get("code"))
        return ErrorBody(
            message=None if message is None else errors.clean_text(message),
            code=None if code is None else errors.clean_text(code, limit=100),
        )
    entries = document.get("errors")
    if not isinstance(entries, list):
        return ErrorBody()
    objects = [entry for entry in entries if isinstance(entry, dict)]
    messages = [text for entry in objects if (text := _text(entry.get("message")))]
    types = tuple(text for entry in objects if (text := _text(entry.get("type"))))
    retry_after = [
        value for entry in objects if (value := _seconds(entry.get("retryAfter"))) is not None
    ]
    return ErrorBody(
        message=errors.clean_text("; ".join(messages)) or None,
        types=types,
        retry_after_s=max(retry_after) if retry_after else None,
    )


def classify(status: int, error: ErrorBody) -> Verdict:
    """The verdict on an answer with HTTP `status` (not 200/202) and error body `error`."""
    if error.code == UNSUPPORTED_API_VERSION:
        return Verdict.UNSUPPORTED_VERSION
    if status == 401:
        return Verdict.REAUTHENTICATE
    if status in NEVER_RETRY:
        return Verdict.FAIL
    if status == 429 or status == 408:
        return Verdict.RETRY
    if status >= 500:
        # VSPC sends every server error as 520 and types it; "logical" and "security" are
        # its way of saying the same request will fail again. A bare 5xx (a proxy) retries.
        if error.types and all(kind in FINAL_ERROR_TYPES for kind in error.types):
            return Verdict.FAIL
        return Verdict.RETRY
    if any(kind in RETRYABLE_ERROR_TYPES for kind in error.types):
        return Verdict.RETRY
    return Verdict.FAIL


def parse_retry_after_header(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait per a `Retry-After` header (delta-seconds or HTTP-date), if valid."""
    if value is None:
        return None
    text = value.strip()
    seconds = _seconds(text)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_s(retry_number: int, *, base_s: float, cap_s: float, jitter: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**n)).

    `retry_number` counts from 0 for the first retry; `jitter` is a draw from [0, 1).
    """
    ceiling = min(cap_s, base_s * math.pow(2.0, min(retry_number, 60)))
    return ceiling * jitter


def delay_s(
    retry_number: int,
    *,
    retry_after_s: float | None,
    base_s: float,
    cap_s: float,
    retry_after_max_s: float,
    jitter: float,
) -> float:
    """How long to wait before retry `retry_number` (0-based).

    A server-given wait (`retryAfter` / `Retry-After`) wins over the backoff, capped at
    `retry_after_max_s` so a confused server cannot park a sync for hours; without one,
    full-jitter exponential backoff.
    """
    if retry_after_s is not None:
        return min(max(0.0, retry_after_s), retry_after_max_s)
    return backoff_s(retry_number, base_s=base_s, cap_s=cap_s, jitter=jitter)


def _text(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
