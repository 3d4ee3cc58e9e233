"""The secret scrubber: with many secrets known, its quick check changes no result."""

from __future__ import annotations

import random

from syncd import logs


def _naive(secrets: list[str], text: str) -> str:
    for secret in sorted(set(secrets), key=lambda secret: (-len(secret), secret)):
        text = text.replace(secret, "[redacted]")
    return text


def test_many_secrets_are_scrubbed_as_each_one_would_be() -> None:
    rnd = random.Random(3)
    alphabet = "abcdef0123-"
    secrets = ["".join(rnd.choices(alphabet, k=rnd.randint(4, 40))) for _ in range(300)]
    # A secret inside another, and one that is a prefix of another.
    secrets += ["key-0001-long-secret", "0001-long", "key-0001"]
    scrubber = logs.SecretScrubber()
    scrubber.register(secrets)
    scrubber.register(["abc"])  # too short: ignored
    texts = ["", "abc", "tenant-0001", "the key key-0001-long-secret was refused", "x" * 5000]
    for _ in range(2000):
        parts = [
            rnd.choice(secrets) if rnd.random() < 0.2 else "".join(rnd.choices(alphabet, k=5))
            for _ in range(rnd.randint(0, 6))
        ]
        texts.append("".join(parts))
    texts.append("y" * 4000 + secrets[0] + "y" * 200)  # past the quick check's length
    for text in texts:
        assert scrubber.scrub(text) == _naive(secrets, text), text
    assert scrubber.scrub("key-0001-long-secret") == "[redacted]"
    assert scrubber.scrub("tenant-0001 is fine") == "tenant-0001 is fine"


def test_issued_tokens_are_remembered_up_to_a_bound_and_configured_secrets_for_good() -> None:
    # A daemon is issued new tokens every run for years: the scrubber must not grow with them.
    scrubber = logs.SecretScrubber()
    scrubber.register(["configured-api-key"])
    tokens = [f"access-token-{n:06d}" for n in range(logs.TOKEN_MEMORY + 500)]
    for first in range(0, len(tokens), 64):
        scrubber.register_tokens(tokens[first : first + 64])
    scrubber.register_tokens([tokens[-2]])  # issued again: nothing new
    assert scrubber.scrub(tokens[499]) == tokens[499]  # the oldest 500 were forgotten
    assert scrubber.scrub(tokens[500]) == "[redacted]"
    scrubber.register_tokens([tokens[0]])  # forgotten, issued again: the newest now
    assert scrubber.scrub(tokens[0]) == "[redacted]"
    assert scrubber.scrub(tokens[500]) == tokens[500]
    assert scrubber.scrub(tokens[-1]) == "[redacted]"
    assert scrubber.scrub("key configured-api-key") == "key [redacted]"
    remembered = [t for t in tokens if scrubber.scrub(t) != t]
    assert len(remembered) == logs.TOKEN_MEMORY


def test_tokens_of_an_open_client_are_kept_however_many_are_issued_meanwhile() -> None:
    scrubber = logs.SecretScrubber()
    with scrubber.issued_tokens() as sink:
        sink(["long-run-access-token", "long-run-refresh-token"])
        # Other runs are issued many more tokens while this one goes on.
        for first in range(0, logs.TOKEN_MEMORY + 100, 50):
            scrubber.register_tokens([f"other-token-{n:06d}" for n in range(first, first + 50)])
        assert scrubber.scrub("bearer long-run-access-token") == "bearer [redacted]"
        assert scrubber.scrub("long-run-refresh-token") == "[redacted]"
        assert scrubber.scrub("other-token-000000") == "other-token-000000"
    # Closed: the oldest again, so forgotten with the next token issued.
    scrubber.register_tokens(["one-more-token"])
    assert scrubber.scrub("long-run-access-token") == "long-run-access-token"
    assert scrubber.scrub("one-more-token") == "[redacted]"
