"""syncd's exceptions, grouped by what the caller should do about them.

- `RetryableError`: this one request may succeed if sent again (after a pause).
- `TenantError`: this tenant's run cannot go on; other tenants are unaffected.
- `DatabaseError`: the database cannot be used right now; try the run again later.
- `ConfigError` / `SchemaBehindError`: the process must stop until an operator acts.

Lower-level errors (aiohttp, asyncpg, OSError) are translated at the boundary where they
happen, with `raise ... from exc`, so the cause chain stays visible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

MESSAGE_MAX_CHARS = 500
"""The longest message syncd stores or shows: server text, `runs.error`, tables, `/status`."""

# C0 and C1 control characters, DEL, and the Unicode bidi/format controls that can reorder
# or hide text on a terminal. Tab and newline are turned into spaces, the rest dropped.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_WHITESPACE_RE = re.compile(r"[\t\n]+")


def clean_text(text: str, *, limit: int = MESSAGE_MAX_CHARS) -> str:
    """`text` made safe to store and show: control characters out, at most `limit` chars.

    Server- and tenant-supplied text is data: an escape sequence must not reach a terminal,
    and a 5 MB message must not become a 5 MB log line, database value or HTTP body.
    """
    if not text.isprintable():  # every character either pattern matches is unprintable
        text = _CONTROL_RE.sub("", _WHITESPACE_RE.sub(" ", text))
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "\u2026"


# Exit codes of the `syncd` command: a public interface (cron wrappers and orchestrators
# read them).
EXIT_OK = 0
EXIT_FAILED = 1  # a tenant's run was partial or failed, the database unreachable, ...
EXIT_USAGE = 2  # the command line or the configuration is wrong


class SyncdError(Exception):
    """Root of every error syncd raises on purpose."""


class UsageError(SyncdError):
    """The command line asks for something that cannot be done (exit 2)."""


class ConfigError(SyncdError):
    """The configuration is unusable: stop, and tell the operator every problem at once."""

    def __init__(self, problems: Sequence[str], path: Path | None = None) -> None:
        self.problems = tuple(problems)
        self.path = path
        where = f"{path}: " if path is not None else ""
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(
            f"{where}invalid configuration ({len(self.problems)} problem(s)):\n{lines}"
        )


class SchemaBehindError(SyncdError):
    """The database schema is not at the revision this syncd needs: run `syncd migrate`."""


class DatabaseError(SyncdError):
    """The database is unreachable or failed a statement; the run may be tried again later."""


class RetryableError(SyncdError):
    """A request failed in a way that is worth retrying (throttling, server error, network)."""

    def __init__(self, message: str, *, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class TenantError(SyncdError):
    """This tenant's run cannot go on (bad credentials, forbidden, bad answer); others go on."""


class AuthError(TenantError):
    """The tenant's credentials were refused or cannot be used."""


class ApiError(TenantError):
    """VSPC answered with an error that retrying will not fix."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def cause_chain(exc: BaseException) -> list[str]:
    """The messages of `exc` and of every exception that caused it, outermost first.

    SQLAlchemy's statement errors are left out when their cause is known: their text is
    the cause's message followed by the whole SQL statement and its parameters, which
    buries the one line an operator needs (and the statement lands in `sync_runs.error`).
    A message that the next one only repeats (or extends, e.g. with a HINT) is shown once,
    as the innermost, most specific one: a driver error re-wrapped.
    """
    entries: list[tuple[str, str]] = []  # (type prefix or "", text)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if not (cause is not None and _is_sql_statement_error(current)):
            text = str(current) or type(current).__name__
            prefix = "" if isinstance(current, SyncdError) else f"{type(current).__name__}: "
            if entries and entries[-1][0] and prefix and text.startswith(entries[-1][1]):
                entries[-1] = (prefix, text)
            else:
                entries.append((prefix, text))
        current = cause
    return [prefix + text for prefix, text in entries]


def _is_sql_statement_error(exc: BaseException) -> bool:
    # Duck-typed: sqlalchemy.exc.StatementError, without importing SQLAlchemy here.
    return hasattr(exc, "statement") and hasattr(exc, "orig") and hasattr(exc, "params")


class ResourceMissing(ApiError):
    """VSPC answered HTTP 404 for the resource asked for."""


class CollectionUnavailable(TenantError):
    """The server has no such collection (404 on its first page: an older VSPC).

    Not a failure: the run records the collection as unavailable and goes on without it.
    """

    def __init__(self, message: str, *, collection: str) -> None:
        super().__init__(message)
        self.collection = collection


class PageProblem(TenantError):
    """A page of a VSPC collection is not what was asked for (bad payload, paging mismatch).

    Fatal for the first page of a snapshot; for any later page it makes the snapshot
    incomplete. The message names the tenant, the offset and the field at fault.
    """

    def __init__(self, message: str, *, tenant: str, offset: int, field: str) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.offset = offset
        self.field = field


class UnreadablePage(PageProblem):
    """The body of a 200 answer is not valid JSON (truncated or malformed): worth one more try."""


class BoundExceeded(TenantError):
    """The server's answer exceeds a bound syncd keeps (size, count or time).

    The message names the bound and the config key that raises it.
    """

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class RetriesExhausted(TenantError):
    """A request kept failing in a retryable way until `max_retries` was used up."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransportError(TenantError):
    """VSPC cannot be reached safely: its TLS certificate is not trusted or TLS is misconfigured."""


class AsyncActionTimeout(TenantError):
    """VSPC queued a request (202) and did not finish it within `async_action_timeout`."""
