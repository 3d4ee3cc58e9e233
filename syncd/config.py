"""Configuration: a TOML file validated into frozen, typed objects.

The file format is a public interface (see `config.example.toml`). Validation reports every
problem at once, each with its TOML path (`tenants[2].url: not an http(s) URL`), and raises
`errors.ConfigError`. Secrets are held as `SecretStr` and never appear in `repr` or messages.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping, Sequence
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

from syncd import collections, environment, errors
from syncd.paging import MAX_PAGE_SIZE

CONFIG_ENV = environment.CONFIG_ENV
DATABASE_URL_ENV = environment.DATABASE_URL_ENV
DEFAULT_CONFIG_NAME = environment.DEFAULT_CONFIG_NAME

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

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?\s*$")
_UNIT_BYTES = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_size_bytes(value: object) -> int:
    """Bytes in a size written as "16MiB", "512KiB", "2GB" or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("not a size like '16MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        size = int(match.group(1)) * _UNIT_BYTES[match.group(2)]
    else:
        raise ValueError(f"not a size like '16MiB' or '512KiB': {value!r}")
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_size_bytes)]

# Secret files hold a key or a password: anything bigger is not one (or is /dev/zero).
SECRET_FILE_MAX_BYTES = 64 * 1024


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
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise ValueError(f"secret file {path} is not a regular file")
            raw = handle.read(SECRET_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    if len(raw) > SECRET_FILE_MAX_BYTES:
        raise ValueError(f"secret file {path} is larger than {SECRET_FILE_MAX_BYTES // 1024} KiB")
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"secret file {path} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return SecretStr(secret)


SecretFromEnv = Annotated[SecretStr | None, BeforeValidator(_secret_from_env)]
SecretFromFile = Annotated[SecretStr | None, BeforeValidator(_secret_from_file)]

# At least 2: consecutive pages share one item, which is how drift between page fetches
# shows; pages of one item cannot overlap, and a snapshot could then miss a pair.
PageSize = Annotated[int, Field(ge=2, le=MAX_PAGE_SIZE)]
PositiveInt = Annotated[int, Field(ge=1, le=1000)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Retries = Annotated[int, Field(ge=0, le=100)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


def _check_cron(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("not a crontab expression like '*/15 * * * *'")
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(value)
    except ValueError as exc:
        raise ValueError(f"not a crontab expression like '*/15 * * * *': {exc}") from None
    return value


Cron = Annotated[str | None, BeforeValidator(_check_cron)]
CollectionNames = Annotated[tuple[str, ...], BeforeValidator(collections.check_names)]
ALL_COLLECTIONS: tuple[str, ...] = tuple(collections.COLLECTIONS)


def _reject_interval_and_cron(data: Any) -> Any:
    """A schedule is an interval or a crontab, never both at the same level."""
    if isinstance(data, dict) and "interval" in data and "cron" in data:
        raise ValueError("give interval or cron, not both")
    return data


class SyncSettings(_Model):
    """How one tenant is synced. `[sync]` gives the defaults; a tenant may override any key.

    This is the one declaration of the `[sync]` keys: a tenant's overrides are validated
    against it too (see `_tenant_settings`).
    """

    page_size: PageSize = MAX_PAGE_SIZE
    max_concurrent_pages: PositiveInt = 4
    interval_s: Duration = Field(default=900.0, alias="interval")
    cron: Cron = None
    max_delete_fraction: Fraction = 0.5
    mass_delete_floor: Annotated[int, Field(ge=0)] = 10
    delete_baseline_window_s: Duration = Field(default=7 * 86400.0, alias="delete_baseline_window")
    max_retries: Retries = 5
    backoff_base_s: Duration = Field(default=1.0, alias="backoff_base")
    backoff_max_s: Duration = Field(default=60.0, alias="backoff_max")
    retry_after_max_s: Duration = Field(default=300.0, alias="retry_after_max")
    connect_timeout_s: Duration = Field(default=10.0, alias="connect_timeout")
    request_timeout_s: Duration = Field(default=60.0, alias="request_timeout")
    async_action_timeout_s: Duration = Field(default=300.0, alias="async_action_timeout")
    token_refresh_margin_s: Duration = Field(default=300.0, alias="token_refresh_margin")
    run_timeout_s: Duration = Field(default=3600.0, alias="run_timeout")
    max_total: Annotated[int, Field(ge=1)] = 10_000_000
    max_body_bytes: ByteSize = Field(default=16 * 1024**2, alias="max_body_size")
    # Sent as the X-Client-Version header: a version number, nothing that could end a header.
    client_version: Annotated[str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.\-]{0,19}$")] = "3.6"
    # Which VSPC collections to copy (names of `collections.COLLECTIONS`); all by default.
    collections: CollectionNames = ALL_COLLECTIONS

    _interval_or_cron = model_validator(mode="before")(_reject_interval_and_cron)


# Keys a tenant may override: every `[sync]` key, by its TOML name.
SYNC_KEYS: frozenset[str] = frozenset(
    field.alias or name for name, field in SyncSettings.model_fields.items()
)
_FIELD_OF_KEY = {field.alias or name: name for name, field in SyncSettings.model_fields.items()}


DEFAULT_MAX_CONCURRENT_APPLIES = 2


class DatabaseConfig(_Model):
    """`[database]`: where syncd keeps its copy. No url: an embedded PostgreSQL."""

    url: SecretStr | None = None
    pool_size: Annotated[int, Field(ge=1, le=500)] | None = None
    max_concurrent_applies: Annotated[int, Field(ge=1, le=1000)] = DEFAULT_MAX_CONCURRENT_APPLIES
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


def default_replica_name() -> str:
    """This process's name among replicas when `[daemon] replica_name` is unset: host-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class DaemonConfig(_Model):
    """`[daemon]`: settings of `syncd run`."""

    listen: str = "127.0.0.1:9187"
    max_concurrent_tenants: Annotated[int, Field(ge=1, le=1000)] = 8
    shutdown_grace_s: Duration = Field(default=30.0, alias="shutdown_grace")
    startup_spread_s: Duration = Field(default=10.0, alias="startup_spread")
    max_failure_backoff_factor: Annotated[float, Field(ge=1.0, le=100.0)] = 4.0
    # Who claims tenants and runs them (`syncd.runs.replica`): unique per process.
    replica_name: Annotated[str, Field(min_length=1, max_length=200)] | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("replica_name")
    @classmethod
    def _printable_replica(cls, value: str | None) -> str | None:
        if value is not None and (value != value.strip() or not value.isprintable()):
            raise ValueError("must be printable, without leading or trailing spaces")
        return value

    def replica(self) -> str:
        """`replica_name`, or host-pid when unset."""
        return self.replica_name or default_replica_name()


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

    # The `[sync]` keys this tenant sets, by TOML name, as written; validated against
    # `SyncSettings` when the tenant is resolved, so every key is declared once.
    sync_overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_sync_overrides(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "sync_overrides" in data:
            raise ValueError("sync_overrides: unknown key")
        _reject_interval_and_cron(data)
        overrides = {key: value for key, value in data.items() if key in SYNC_KEYS}
        rest = {key: value for key, value in data.items() if key not in SYNC_KEYS}
        return {**rest, "sync_overrides": overrides}

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
        if url.user is not None or url.password is not None:
            raise ValueError(
                "must not hold a user name or password (user:password@): give them as "
                "username/password or api_key, which syncd keeps out of logs"
            )
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

    def select_tenants(self, names: Sequence[str]) -> list[Tenant]:
        """The tenants `names` (all when empty), once each.

        `errors.UsageError` for unknown names, or when no tenant is configured at all.
        """
        if not self.tenants:
            raise errors.UsageError("no tenants configured: add [[tenants]] to the config file")
        if not names:
            return list(self.tenants)
        known = {tenant.name for tenant in self.tenants}
        unknown = [name for name in names if name not in known]
        if unknown:
            configured = ", ".join(tenant.name for tenant in self.tenants) or "none"
            raise errors.UsageError(
                f"unknown tenant(s): {', '.join(unknown)} (configured: {configured})"
            )
        return [self.tenant(name) for name in dict.fromkeys(names)]

    def secrets(self) -> tuple[str, ...]:
        """Every secret value in the configuration (for log scrubbing)."""
        values = [secret for tenant in self.tenants for secret in tenant.secrets()]
        if self.database.url is not None:
            password = database_url_password(self.database.url.get_secret_value())
            if password:
                values.append(password)
        return tuple(values)


# Query parameters of a database URL that reach asyncpg.connect; `sslmode` is libpq's name
# for asyncpg's `ssl` and is translated.
_DATABASE_URL_PARAMETERS = frozenset(
    {"ssl", "sslmode", "user", "password", "host", "port", "passfile", "target_session_attrs"}
)
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def normalize_database_url(url: str) -> str:
    """`postgresql://...` as users write it, checked and turned into SQLAlchemy's asyncpg form.

    Raises ValueError (never naming the URL, which may hold a password) when the scheme,
    port or a query parameter is not one asyncpg can use.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("not a PostgreSQL URL like 'postgresql://user:password@host:5432/db'")
    if scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"unsupported scheme {scheme!r}: use postgresql://")
    try:
        parsed = URL(f"postgresql://{rest}")
        port = parsed.explicit_port
    except (ValueError, TypeError):
        raise ValueError(
            "not a valid URL (is the port a number from 1 to 65535, and are special "
            "characters in the password percent-encoded?)"
        ) from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535")
    query = dict(parsed.query)
    unknown = sorted(set(query) - _DATABASE_URL_PARAMETERS)
    if unknown:
        known = ", ".join(sorted(_DATABASE_URL_PARAMETERS))
        raise ValueError(f"unknown query parameter(s) {', '.join(unknown)} (known: {known})")
    if "ssl" in query and "sslmode" in query:
        raise ValueError("give ssl or sslmode, not both")
    mode = query.get("sslmode") or query.get("ssl")
    if mode is not None and mode not in SSL_MODES:
        raise ValueError(f"sslmode {mode!r} is not one of {', '.join(SSL_MODES)}")
    if "port" in query and not query["port"].isdigit():
        raise ValueError("the port query parameter is not a number")
    if "sslmode" not in query:
        return f"postgresql+asyncpg://{rest}"  # as written: no re-quoting of the password
    query["ssl"] = query.pop("sslmode")
    return "postgresql+asyncpg://" + str(parsed.with_query(query)).partition("://")[2]


def database_url_password(url: str) -> str | None:
    """The password a database URL holds, in its user info or its query (`?password=`)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return None
    return parsed.password or parsed.query.get("password") or None


def _format_location(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _format_validation_error(exc: ValidationError, prefix: tuple[int | str, ...] = ()) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        location = _format_location((*prefix, *error["loc"]))
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


def _tenant_settings(
    defaults: SyncSettings, overrides: Mapping[str, Any], index: int
) -> tuple[SyncSettings | None, list[str]]:
    """The tenant's effective settings: `defaults` with its `[sync]` overrides; or problems.

    The overrides are validated by `SyncSettings` itself, so each key is declared once.
    """
    checked = dict(overrides)
    if "interval" in checked and "cron" in checked:
        checked.pop("cron")  # TenantConfig reports the pair
    try:
        validated = SyncSettings.model_validate(checked)
    except ValidationError as exc:
        return None, _format_validation_error(exc, ("tenants", index))
    update = {_FIELD_OF_KEY[key]: getattr(validated, _FIELD_OF_KEY[key]) for key in overrides}
    # A tenant that picks a schedule kind replaces the default's, not mixes with it.
    if "cron" in update:
        update.setdefault("interval_s", defaults.interval_s)
    elif "interval_s" in update:
        update["cron"] = None
    return defaults.model_copy(update=update), []


def _resolve_tenant(raw: TenantConfig, settings: SyncSettings) -> Tenant:
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
        settings=settings,
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
    defaults = raw.sync if raw is not None else SyncSettings()
    settings: list[SyncSettings | None] = []
    tenants_data = data.get("tenants")
    for index, tenant_data in enumerate(tenants_data if isinstance(tenants_data, list) else []):
        overrides = (
            {key: value for key, value in tenant_data.items() if key in SYNC_KEYS}
            if isinstance(tenant_data, dict)
            else {}
        )
        resolved, tenant_problems = _tenant_settings(defaults, overrides, index)
        settings.append(resolved)
        problems.extend(tenant_problems)
    if problems or raw is None:
        raise errors.ConfigError(problems, path)
    return Config(
        database=raw.database,
        sync=raw.sync,
        daemon=raw.daemon,
        tenants=tuple(
            _resolve_tenant(tenant, tenant_settings)
            for tenant, tenant_settings in zip(raw.tenants, settings, strict=True)
            if tenant_settings is not None
        ),
        path=path,
        secret_files=_secret_files(file_data, base_dir or Path.cwd(), path),
    )


def _secret_files(data: Mapping[str, Any], base_dir: Path, path: Path | None) -> tuple[Path, ...]:
    """The config file if it holds a secret inline, then every secret file it names."""
    tenants = [t for t in data.get("tenants") or [] if isinstance(t, dict)]
    database_url = (data.get("database") or {}).get("url")
    inline = any("api_key" in t or "password" in t for t in tenants) or bool(
        isinstance(database_url, str) and database_url_password(database_url)
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
    except UnicodeDecodeError as exc:
        raise errors.ConfigError(
            [f"not UTF-8 text: {exc.reason} at byte {exc.start}"], path
        ) from None
    return validate_config(data, environ=environ, base_dir=path.parent, path=path)


@dataclass(frozen=True)
class ConfigWarning:
    """Something in a valid configuration that an operator should fix.

    `subject` (a file path or a tenant) lets a reloading daemon say each one once.
    """

    subject: str
    message: str
    path: Path | None = None
    # Permissions can change at any time: said at every (re)load. The rest once per subject.
    repeat_on_reload: bool = False


def config_warnings(cfg: Config) -> list[ConfigWarning]:
    """Secret files others may read, and credentials that would cross the network in clear.

    Reads file permissions: call it at every load, so a reload re-checks them.
    """
    found = []
    for secret_file in cfg.secret_files:
        if not loosely_readable(secret_file):
            continue
        if secret_file == cfg.path:
            message = (
                "the config file is readable by other users and syncd holds secrets in it: "
                "chmod 600 it, or move them to api_key_file/password_file or the environment"
            )
        else:
            message = f"secret file {secret_file} is readable by other users: chmod 600 it"
        found.append(ConfigWarning(f"file:{secret_file}", message, secret_file, True))
    for tenant in cfg.tenants:
        url = URL(tenant.url)
        if url.scheme == "http" and not _is_loopback(url.host or ""):
            found.append(
                ConfigWarning(
                    f"tenant:{tenant.name}:{tenant.url}",
                    f"tenant {tenant.name!r}: url is plain http:// to {url.host}: its "
                    f"{'API key' if tenant.auth.method == 'api_key' else 'password'} and "
                    "data cross the network unencrypted; use https://",
                )
            )
    return found


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loosely_readable(path: Path) -> bool:
    """True when users other than the owner may read `path` (bad for a file with secrets)."""
    try:
        return bool(path.stat().st_mode & 0o044)
    except OSError:
        return False
