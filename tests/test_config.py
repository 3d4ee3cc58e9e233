"""Config validation: every rule, with the exact message a user sees."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from syncd import config, errors

KEY_TENANT = {"name": "acme", "url": "https://vspc.example.com:1280", "api_key": "k-123456"}


def problems_of(
    data: dict[str, Any], environ: dict[str, str] | None = None, **kw: Any
) -> list[str]:
    with pytest.raises(errors.ConfigError) as caught:
        config.validate_config(data, environ=environ or {}, **kw)
    return list(caught.value.problems)


def test_minimal_config_has_documented_defaults() -> None:
    cfg = config.validate_config({"tenants": [KEY_TENANT]}, environ={})
    tenant = cfg.tenant("acme")
    assert tenant.url == "https://vspc.example.com:1280"
    assert isinstance(tenant.auth, config.ApiKeyAuth)
    assert tenant.auth.api_key.get_secret_value() == "k-123456"
    assert tenant.verify_tls is True
    settings = tenant.settings
    assert (settings.page_size, settings.max_concurrent_pages) == (500, 4)
    assert settings.interval_s == 900.0 and settings.cron is None
    assert (settings.max_delete_fraction, settings.max_retries) == (0.5, 5)
    assert cfg.database.url is None
    assert cfg.daemon.listen == "127.0.0.1:9187"


def test_per_tenant_overrides_are_resolved_once() -> None:
    cfg = config.validate_config(
        {
            "sync": {"page_size": 200, "interval": "5m", "max_retries": 2},
            "tenants": [
                {**KEY_TENANT, "page_size": 50, "cron": "*/10 * * * *"},
                {**KEY_TENANT, "name": "other"},
            ],
        },
        environ={},
    )
    first, second = cfg.tenants
    assert (first.settings.page_size, first.settings.cron, first.settings.max_retries) == (
        50,
        "*/10 * * * *",
        2,
    )
    assert (second.settings.page_size, second.settings.interval_s) == (200, 300.0)
    assert second.settings.cron is None


def test_tenant_interval_replaces_default_cron() -> None:
    cfg = config.validate_config(
        {"sync": {"cron": "0 * * * *"}, "tenants": [{**KEY_TENANT, "interval": "90s"}]},
        environ={},
    )
    assert cfg.tenants[0].settings.cron is None
    assert cfg.tenants[0].settings.interval_s == 90.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        (45, 45.0),
        ("2d", 172800.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert config.parse_duration_s(text) == seconds


def test_every_problem_reported_at_once_with_toml_paths() -> None:
    found = problems_of(
        {
            "sync": {"page_size": 501, "interval": "soon", "max_delete_fraction": 2},
            "daemon": {"listen": "nowhere"},
            "tenants": [
                KEY_TENANT,
                {**KEY_TENANT, "name": "second", "username": "u", "password": "p"},
                {**KEY_TENANT, "name": "third", "url": "ftp://host"},
                {**KEY_TENANT},
                {"name": "no-auth", "url": "http://h"},
                {**KEY_TENANT, "name": "x", "colour": "red"},
            ],
            "extra": 1,
        }
    )
    assert found == [
        "tenants[3].name: duplicate tenant name 'acme' (also tenants[0])",
        "sync.page_size: Input should be less than or equal to 500",
        "sync.interval: not a duration like '15m' or '90s': 'soon'",
        "sync.max_delete_fraction: Input should be less than or equal to 1",
        "daemon.listen: not a host:port like '127.0.0.1:9187': 'nowhere'",
        "tenants[1]: give api_key or username+password, not both",
        "tenants[2].url: not an http(s) URL",
        "tenants[4]: give api_key or username+password",
        "tenants[5].colour: unknown key",
        "extra: unknown key",
    ]


def test_auth_combinations() -> None:
    base = {"name": "t", "url": "https://h"}
    assert problems_of({"tenants": [{**base, "username": "u"}]}) == [
        "tenants[0]: password authentication needs both username and password"
    ]
    assert problems_of({"tenants": [{**base, "api_key": "a", "api_key_env": "X"}]}, {"X": "b"}) == [
        "tenants[0]: give one of api_key, api_key_env, api_key_file"
    ]
    cfg = config.validate_config(
        {"tenants": [{**base, "username": "u", "password_env": "PW"}]}, environ={"PW": "s3cret!"}
    )
    auth = cfg.tenants[0].auth
    assert isinstance(auth, config.PasswordAuth)
    assert (auth.username, auth.password.get_secret_value()) == ("u", "s3cret!")


def test_missing_secret_env_names_the_variable_not_the_secret() -> None:
    assert problems_of({"tenants": [{"name": "t", "url": "https://h", "api_key_env": "NOPE"}]}) == [
        "tenants[0].api_key_env: environment variable NOPE is not set or empty"
    ]


def test_secret_files_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("file-secret-value\n")
    cfg_file = tmp_path / "syncd.toml"
    cfg_file.write_text(
        textwrap.dedent(
            """
            [[tenants]]
            name = "t"
            url = "https://h"
            api_key_file = "key"
            [[tenants]]
            name = "u"
            url = "https://h"
            username = "me"
            password_file = "missing"
            """
        )
    )
    with pytest.raises(errors.ConfigError) as caught:
        config.load_config(cfg_file, environ={})
    assert caught.value.problems == (
        f"tenants[1].password_file: cannot read secret file {tmp_path / 'missing'}: "
        "No such file or directory",
    )
    (tmp_path / "missing").write_text("pw-from-file")
    cfg = config.load_config(cfg_file, environ={})
    first = cfg.tenants[0].auth
    assert isinstance(first, config.ApiKeyAuth)
    assert first.api_key.get_secret_value() == "file-secret-value"


def test_unreadable_ca_file(tmp_path: Path) -> None:
    found = problems_of({"tenants": [{**KEY_TENANT, "ca_file": "nope.pem"}]}, base_dir=tmp_path)
    assert found == [
        f"tenants[0].ca_file: cannot read CA file {tmp_path / 'nope.pem'}: "
        "No such file or directory"
    ]


def test_interval_and_cron_together() -> None:
    assert problems_of({"tenants": [{**KEY_TENANT, "interval": "1m", "cron": "* * * * *"}]}) == [
        "tenants[0]: give interval or cron, not both"
    ]
    assert problems_of({"tenants": [{**KEY_TENANT, "cron": "every tuesday"}]})[0].startswith(
        "tenants[0].cron: not a crontab expression like '*/15 * * * *'"
    )


def test_secrets_never_in_repr_or_errors() -> None:
    cfg = config.validate_config(
        {
            "database": {"url": "postgresql://syncd:dbpass-xyz@db:5432/syncd"},
            "tenants": [
                {**KEY_TENANT, "api_key": "key-abcdef"},
                {"name": "p", "url": "https://h", "username": "u", "password": "pw-ghijkl"},
            ],
        },
        environ={},
    )
    text = repr(cfg) + str(cfg)
    for secret in ("key-abcdef", "pw-ghijkl", "dbpass-xyz"):
        assert secret not in text
    assert set(cfg.secrets()) == {"key-abcdef", "pw-ghijkl", "dbpass-xyz"}
    # A bad value next to a secret: the message names the key, never the value.
    found = problems_of({"tenants": [{**KEY_TENANT, "api_key": "key-abcdef", "url": 5}]})
    assert found == ["tenants[0].url: Input should be a valid string"]
    assert "key-abcdef" not in str(found)


def test_database_url_forms_and_env_override() -> None:
    cfg = config.validate_config({"database": {"url": "postgres://u@h/d"}}, environ={})
    assert cfg.database.url is not None
    assert cfg.database.url.get_secret_value() == "postgresql+asyncpg://u@h/d"
    cfg = config.validate_config(
        {"database": {"url": "postgresql://u@h/d"}},
        environ={config.DATABASE_URL_ENV: "postgresql://other@h2/d2"},
    )
    assert cfg.database.url is not None
    assert cfg.database.url.get_secret_value() == "postgresql+asyncpg://other@h2/d2"
    assert problems_of({"database": {"url": "mysql://u@h/d"}}) == [
        "database.url: unsupported scheme 'mysql': use postgresql://"
    ]


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[sync\npage_size = 1\n")
    with pytest.raises(errors.ConfigError) as caught:
        config.load_config(bad, environ={})
    assert caught.value.problems[0].startswith("not valid TOML: ")
    assert str(bad) in str(caught.value)
    with pytest.raises(errors.ConfigError) as caught:
        config.load_config(tmp_path / "absent.toml", environ={})
    assert caught.value.problems == ("file not found",)


def test_config_path_resolution(tmp_path: Path) -> None:
    assert config.find_config_path(tmp_path / "x.toml", {}) == tmp_path / "x.toml"
    assert config.find_config_path(None, {config.CONFIG_ENV: "/etc/s.toml"}) == Path("/etc/s.toml")
    assert config.find_config_path(None, {}) == Path("syncd.toml")


def test_frozen() -> None:
    cfg = config.validate_config({"tenants": [KEY_TENANT]}, environ={})
    with pytest.raises(Exception, match="frozen"):
        cfg.tenants[0].settings.page_size = 3  # type: ignore[misc]


def test_secret_files_are_the_ones_holding_secrets(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("file-secret-value")
    inline = tmp_path / "inline.toml"
    inline.write_text('[[tenants]]\nname = "a"\nurl = "https://h"\napi_key = "inline-key"\n')
    by_file = tmp_path / "by-file.toml"
    by_file.write_text('[[tenants]]\nname = "a"\nurl = "https://h"\napi_key_file = "key"\n')
    by_env = tmp_path / "by-env.toml"
    by_env.write_text(
        '[database]\nurl = "postgresql://u@db/syncd"\n'
        '[[tenants]]\nname = "a"\nurl = "https://h"\napi_key_env = "K"\n'
    )
    assert config.load_config(inline, environ={}).secret_files == (inline,)
    assert config.load_config(by_file, environ={}).secret_files == (tmp_path / "key",)
    assert config.load_config(by_env, environ={"K": "env-key"}).secret_files == ()
