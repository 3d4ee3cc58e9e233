"""Configuration: a TOML file validated into frozen, typed objects.

The file format is a public interface (see `config.example.toml`). Validation reports every
problem at once, each with its TOML path (`tenants[2].url: not an http(s) URL`), and raises
`errors.ConfigError`. Secrets are held as `SecretStr` and never appear in `repr` or messages.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from syncd import errors

DEFAULT_CONFIG_NAME = "syncd.toml"
CONFIG_ENV = "SYNCD_CONFIG"
DATABASE_URL_ENV = "SYNCD_DATABASE_URL"
MAX_PAGE_SIZE = 500  # VSPC's default MaxPageSize

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*)+$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration_s(value: object) -> float:
    """Seconds in a duration written as "90s", "15m", "1h30m", "500ms" or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("not a duration like '15m' or '90s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.match(value):
        seconds = sum(
            float(number) * _UNIT_S[unit] for number, unit in _DURATION_PART_RE.findall(value)
        )
    else:
        raise ValueError(f"not a duration like '15m' or '90s': {value!r}")
    if seconds <= 0:
        raise ValueError("must be a positive duration")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration_s)]


def _environ(info: ValidationInfo) -> Mapping[str, str]:
    context = info.context or {}
    environ: Mapping[str, str] = context.get("environ", os.environ)
    return environ


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    base: Path = context.get("base_dir", Path.cwd())
    return base


def _secret_from_env(value: object, info: ValidationInfo) -> object:
    """Reads the secret held by the environment variable named `value`."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError("must be the name of an environment variable")
    secret = _environ(info).get(value)
    if not secret:
        raise ValueError(f"environment variable {value} is not set or empty")
    return SecretStr(secret)


def _secret_from_file(value: object, info: ValidationInfo) -> object:
    """Reads the secret held by the file at path `value` (trailing newline stripped)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError("must be a file path")
    path = _base_dir(info) / Path(value).expanduser()
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return SecretStr(secret)


SecretFromEnv = Annotated[SecretStr | None, BeforeValidator(_secret_from_env)]
SecretFromFile = Annotated[SecretStr | None, BeforeValidator(_secret_from_file)]

PageSize = Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)]
PositiveInt = Annotated[int, Field(ge=1, le=1000)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Retries = Annotated[int, Field(ge=0, le=100)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


def _check_cron(value: str | None) -> str | None:
    if value is None:
        return None
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(value)
    except ValueError as exc:
        raise ValueError(f"not a crontab expression like '*/15 * * * *': {exc}") from None
    return value


Cron = Annotated[str | None, BeforeValidator(_check_cron)]


def _reject_interval_and_cron(data: Any) -> Any:
    """A schedule is an interval or a crontab, never both at the same level."""
    if isinstance(data, dict) and "interval" in data and "cron" in data:
        raise ValueError("give interval or cron, not both")
    return data


class SyncSettings(_Model):
    """How one tenant is synced. `[sync]` gives the defaults; a tenant may override any key."""

    page_size: PageSize = MAX_PAGE_SIZE
    max_concurrent_pages: PositiveInt = 4
    interval_s: Duration = Field(default=900.0, alias="interval")
    cron: Cron = None
    max_delete_fraction: Fraction = 0.5
    mass_delete_floor: Annotated[int, Field(ge=0)] = 10
    max_retries: Retries = 5
    backoff_base_s: Duration = Field(default=1.0, alias="backoff_base")
    backoff_max_s: Duration = Field(default=60.0, alias="backoff_max")
    retry_after_max_s: Duration = Field(default=300.0, alias="retry_after_max")
    connect_timeout_s: Duration = Field(default=10.0, alias="connect_timeout")
    request_timeout_s: Duration = Field(default=60.0, alias="request_timeout")
    async_action_timeout_s: Duration = Field(default=300.0, alias="async_action_timeout")
    token_refresh_margin_s: Duration = Field(default=300.0, alias="token_refresh_margin")
    client_version: str = "3.6"

    _interval_or_cron = model_validator(mode="before")(_reject_interval_and_cron)


# Keys a tenant may override: every `[sync]` key, by its TOML name.
SYNC_KEYS: frozenset[str] = frozenset(
    field.alias or name for name, field in SyncSettings.model_fields.items()
)


class DatabaseConfig(_Model):
    """`[database]`: where syncd keeps its copy. No url: an embedded PostgreSQL."""

    url: SecretStr | None = None
    pool_size: Annotated[int, Field(ge=1, le=500)] | None = None
    statement_timeout_s: Duration = Field(default=600.0, alias="statement_timeout")
    connect_timeout_s: Duration = Field(default=10.0, alias="connect_timeout")

    @field_validator("url", mode="before")
    @classmethod
    def _postgres_url(cls, value: object) -> object:
        if value is None:
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str):
            raise ValueError("must be a string like 'postgresql://user:password@host:5432/db'")
        return SecretStr(normalize_database_url(text))


class DaemonConfig(_Model):
    """`[daemon]`: settings of `syncd run`."""

    listen: str = "127.0.0.1:9187"
    max_concurrent_tenants: Annotated[int, Field(ge=1, le=1000)] = 8
    shutdown_grace_s: Duration = Field(default=30.0, alias="shutdown_grace")
    startup_spread_s: Duration = Field(default=10.0, alias="startup_spread")
    max_failure_backoff_factor: Annotated[float, Field(ge=1.0, le=100.0)] = 4.0

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_listen(value)
        return value


def parse_listen(value: str) -> tuple[str, int]:
    """Splits "host:port" (IPv6 as "[::1]:9187"); raises ValueError when it is not one."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"not a host:port like '127.0.0.1:9187': {value!r}")
    return host.strip("[]"), int(port_text)


class TenantConfig(_Model):
    """One `[[tenants]]` entry as written; `Tenant` is what syncd uses after resolving it."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    url: str
    api_key: SecretStr | None = None
    api_key_env: SecretFromEnv = None
    api_key_file: SecretFromFile = None
    username: str | None = None
    password: SecretStr | None = None
    password_env: SecretFromEnv = None
    password_file: SecretFromFile = None
    verify_tls: bool = True
    ca_file: Path | None = None

    # Per-tenant overrides of [sync]; None means "use the default".
    page_size: PageSize | None = None
    max_concurrent_pages: PositiveInt | None = None
    interval_s: Duration | None = Field(default=None, alias="interval")
    cron: Cron = None
    max_delete_fraction: Fraction | None = None
    mass_delete_floor: Annotated[int, Field(ge=0)] | None = None
    max_retries: Retries | None = None
    backoff_base_s: Duration | None = Field(default=None, alias="backoff_base")
    backoff_max_s: Duration | None = Field(default=None, alias="backoff_max")
    retry_after_max_s: Duration | None = Field(default=None, alias="retry_after_max")
    connect_timeout_s: Duration | None = Field(default=None, alias="connect_timeout")
    request_timeout_s: Duration | None = Field(default=None, alias="request_timeout")
    async_action_timeout_s: Duration | None = Field(default=None, alias="async_action_timeout")
    token_refresh_margin_s: Duration | None = Field(default=None, alias="token_refresh_margin")
    client_version: str | None = None

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError("must be printable, without leading or trailing spaces")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except (ValueError, TypeError):
            raise ValueError("not an http(s) URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("not an http(s) URL")
        if url.query_string or url.fragment:
            raise ValueError("give the server root only, without query or fragment")
        return value.rstrip("/")

    @field_validator("ca_file", mode="after")
    @classmethod
    def _readable_ca_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _base_dir(info) / value.expanduser()
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ValueError(f"cannot read CA file {path}: {exc.strerror or exc}") from None
        return path

    _interval_or_cron = model_validator(mode="before")(_reject_interval_and_cron)

    @model_validator(mode="after")
    def _one_auth_method(self) -> TenantConfig:
        key_sources = [s for s in (self.api_key, self.api_key_env, self.api_key_file) if s]
        password_sources = [s for s in (self.password, self.password_env, self.password_file) if s]
        if len(key_sources) > 1:
            raise ValueError("give one of api_key, api_key_env, api_key_file")
        if len(password_sources) > 1:
            raise ValueError("give one of password, password_env, password_file")
        has_password_auth = self.username is not None or bool(password_sources)
        if key_sources and has_password_auth:
            raise ValueError("give api_key or username+password, not both")
        if not key_sources and not has_password_auth:
            raise ValueError("give api_key or username+password")
        if has_password_auth and (self.username is None or not password_sources):
            raise ValueError("password authentication needs both username and password")
        return self

    def overrides(self) -> dict[str, Any]:
        """The `[sync]` keys this tenant sets, by field name."""
        return {
            name: getattr(self, name)
            for name in SyncSettings.model_fields
            if getattr(self, name) is not None
        }


class RawConfig(_Model):
    """The whole file as written."""

    database: DatabaseConfig = DatabaseConfig()
    sync: SyncSettings = SyncSettings()
    daemon: DaemonConfig = DaemonConfig()
    tenants: list[TenantConfig] = Field(default_factory=list)


@dataclass(frozen=True)
class ApiKeyAuth:
    """`Authorization: Bearer <api key>`; API keys do not expire."""

    api_key: SecretStr
    method: Literal["api_key"] = "api_key"


@dataclass(frozen=True)
class PasswordAuth:
    """OAuth2 password grant on `POST /api/v3/token`, with refresh."""

    username: str
    password: SecretStr
    method: Literal["password"] = "password"


@dataclass(frozen=True)
class Tenant:
    """One VSPC server or account, with its effective sync settings."""

    name: str
    url: str
    auth: ApiKeyAuth | PasswordAuth
    verify_tls: bool
    ca_file: Path | None
    settings: SyncSettings

    def secrets(self) -> tuple[str, ...]:
        """Every secret value of this tenant (for log scrubbing)."""
        if isinstance(self.auth, ApiKeyAuth):
            return (self.auth.api_key.get_secret_value(),)
        return (self.auth.password.get_secret_value(),)


@dataclass(frozen=True)
class Config:
    """Validated, resolved configuration."""

    database: DatabaseConfig
    sync: SyncSettings
    daemon: DaemonConfig
    tenants: tuple[Tenant, ...]
    path: Path | None = None
    # Files whose contents include a secret: the config file itself when it holds one
    # inline, and every *_file a tenant names. Others must not be able to read them.
    secret_files: tuple[Path, ...] = ()

    def tenant(self, name: str) -> Tenant:
        """The tenant called `name`; KeyError when there is none."""
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        raise KeyError(name)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value in the configuration (for log scrubbing)."""
        values = [secret for tenant in self.tenants for secret in tenant.secrets()]
        if self.database.url is not None:
            password = URL(self.database.url.get_secret_value()).password
            if password:
                values.append(password)
        return tuple(values)


def normalize_database_url(url: str) -> str:
    """`postgresql://...` as users write it, turned into SQLAlchemy's asyncpg form."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("not a PostgreSQL URL like 'postgresql://user:password@host:5432/db'")
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"unsupported scheme {scheme!r}: use postgresql://")


def _format_location(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        location = _format_location(tuple(error["loc"]))
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{location}: {message}" if location else message)
    return problems


def _duplicate_tenant_names(data: Mapping[str, Any]) -> list[str]:
    tenants = data.get("tenants")
    if not isinstance(tenants, list):
        return []
    first_index: dict[str, int] = {}
    problems = []
    for index, tenant in enumerate(tenants):
        name = tenant.get("name") if isinstance(tenant, dict) else None
        if not isinstance(name, str):
            continue
        if name in first_index:
            problems.append(
                f"tenants[{index}].name: duplicate tenant name {name!r} "
                f"(also tenants[{first_index[name]}])"
            )
        else:
            first_index[name] = index
    return problems


def _effective_settings(defaults: SyncSettings, tenant: TenantConfig) -> SyncSettings:
    overrides = tenant.overrides()
    # A tenant that picks a schedule kind replaces the default's, not mixes with it.
    if "cron" in overrides:
        overrides.setdefault("interval_s", defaults.interval_s)
    elif "interval_s" in overrides:
        overrides["cron"] = None
    return defaults.model_copy(update=overrides)


def _resolve_tenant(defaults: SyncSettings, raw: TenantConfig) -> Tenant:
    api_key = raw.api_key or raw.api_key_env or raw.api_key_file
    password = raw.password or raw.password_env or raw.password_file
    auth: ApiKeyAuth | PasswordAuth
    if api_key is not None:
        auth = ApiKeyAuth(api_key=api_key)
    else:
        assert raw.username is not None and password is not None  # checked by the model
        auth = PasswordAuth(username=raw.username, password=password)
    return Tenant(
        name=raw.name,
        url=raw.url,
        auth=auth,
        verify_tls=raw.verify_tls,
        ca_file=raw.ca_file,
        settings=_effective_settings(defaults, raw),
    )


def validate_config(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    path: Path | None = None,
) -> Config:
    """Validates parsed TOML into a `Config`; raises `ConfigError` listing every problem."""
    environ = os.environ if environ is None else environ
    file_data = data
    data = dict(data)
    problems = _duplicate_tenant_names(data)
    override_url = environ.get(DATABASE_URL_ENV)
    if override_url:
        database = dict(data.get("database") or {})
        database["url"] = override_url
        data["database"] = database
    raw: RawConfig | None = None
    try:
        raw = RawConfig.model_validate(
            data, context={"environ": environ, "base_dir": base_dir or Path.cwd()}
        )
    except ValidationError as exc:
        problems.extend(_format_validation_error(exc))
    if problems or raw is None:
        raise errors.ConfigError(problems, path)
    return Config(
        database=raw.database,
        sync=raw.sync,
        daemon=raw.daemon,
        tenants=tuple(_resolve_tenant(raw.sync, tenant) for tenant in raw.tenants),
        path=path,
        secret_files=_secret_files(file_data, base_dir or Path.cwd(), path),
    )


def _secret_files(data: Mapping[str, Any], base_dir: Path, path: Path | None) -> tuple[Path, ...]:
    """The config file if it holds a secret inline, then every secret file it names."""
    tenants = [t for t in data.get("tenants") or [] if isinstance(t, dict)]
    database_url = (data.get("database") or {}).get("url")
    inline = any("api_key" in t or "password" in t for t in tenants) or bool(
        isinstance(database_url, str) and "://" in database_url and URL(database_url).password
    )
    files = [path] if inline and path is not None else []
    for tenant in tenants:
        for key in ("api_key_file", "password_file"):
            if isinstance(tenant.get(key), str):
                files.append(base_dir / Path(tenant[key]).expanduser())
    return tuple(files)


def find_config_path(explicit: Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """`--config`, else `$SYNCD_CONFIG`, else `./syncd.toml`."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return explicit
    from_env = environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    return Path(DEFAULT_CONFIG_NAME)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Reads and validates the TOML file at `path`."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise errors.ConfigError(["file not found"], path) from None
    except OSError as exc:
        raise errors.ConfigError([f"cannot read: {exc.strerror or exc}"], path) from None
    except tomllib.TOMLDecodeError as exc:
        raise errors.ConfigError([f"not valid TOML: {exc}"], path) from None
    return validate_config(data, environ=environ, base_dir=path.parent, path=path)


def loosely_readable(path: Path) -> bool:
    """True when users other than the owner may read `path` (bad for a file with secrets)."""
    try:
        return bool(path.stat().st_mode & 0o044)
    except OSError:
        return False
