"""The deployment files and the documentation, checked against the code so they cannot drift.

No Docker engine runs here: docker-compose.yml is read with PyYAML and its wiring checked,
the config files it mounts are validated with `config.load_config`, and the Dockerfile is
read instruction by instruction. README.md and config.example.toml must name every config
key, CLI command, view column and metric the code has, and the README's SQL must run.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import cli, config, metrics, schema
from syncd import simulator as sim
from syncd.sync import sync_tenant
from tests.fixtures.helpers import tenant_for

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = ROOT / "config.example.toml"

SECTIONS: dict[str, type[BaseModel]] = {
    "database": config.DatabaseConfig,
    "sync": config.SyncSettings,
    "daemon": config.DaemonConfig,
    "tenants": config.TenantConfig,
}


def keys_of(model: type[BaseModel]) -> list[str]:
    """The TOML keys of a config model (its aliases, where it has them).

    A tenant's `[sync]` overrides arrive in one internal field, not as keys of their own.
    """
    return [
        field.alias or name
        for name, field in model.model_fields.items()
        if not (model is config.TenantConfig and name == "sync_overrides")
    ]


# --- docker-compose.yml --------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` substitution."""

    def substitute(match: re.Match[str]) -> str:
        value = environ.get(match["name"], "")
        if match["op"] == "?" and not value:
            raise AssertionError(f"compose would refuse: {match['name']}: {match['arg']}")
        if match["op"] == "-" and not value:
            return match["arg"]
        return value

    return _VARIABLE.sub(substitute, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def service_environment(service: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """A service's environment as the container would see it (given the host's `environ`)."""
    raw = service.get("environment", {})
    assert isinstance(raw, dict), "write environment as a mapping"
    return {key: interpolate(str(value), environ) for key, value in raw.items()}


def config_mount(service: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[Path, str, str]:
    """(host path, container path, mode) of the service's config file mount."""
    mounts = [interpolate(volume, environ) for volume in service["volumes"]]
    toml_mounts = [mount for mount in mounts if mount.split(":")[0].endswith(".toml")]
    assert len(toml_mounts) == 1, mounts
    source, target, mode = toml_mounts[0].split(":")
    return (ROOT / source).resolve(), target, mode


def test_compose_services_and_their_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "migrate",
        "syncd",
        "simulator",
        # profile "monitoring", checked in test_monitoring.py
        "reader-role",
        "grant-reader",
        "prometheus",
        "grafana",
    }

    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:1[78](\.\d+)*", postgres["image"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume, _, data_path = postgres["volumes"][0].partition(":")
    assert volume in compose["volumes"] and data_path == "/var/lib/postgresql/data"

    migrate, syncd = services["migrate"], services["syncd"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert syncd["command"] == ["run"]
    assert syncd["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    health = " ".join(syncd["healthcheck"]["test"])
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    for name in ("postgres", "migrate", "syncd"):
        assert "profiles" not in services[name], f"{name} must start without a profile"

    simulator = services["simulator"]
    assert simulator["profiles"] == ["demo"]
    assert simulator["command"][:3] == ["simulate", "--host", "0.0.0.0"]
    # One image, built from this repository's Dockerfile, serves all three.
    for name in ("migrate", "syncd", "simulator"):
        assert services[name]["build"] == "."
        assert services[name]["image"] == syncd["image"]


def test_compose_gives_runs_time_to_finish(compose: dict[str, Any]) -> None:
    grace_s = config.parse_duration_s(compose["services"]["syncd"]["stop_grace_period"])
    assert grace_s > config.DaemonConfig().shutdown_grace_s


def test_compose_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    host = {"POSTGRES_PASSWORD": "s3cretpw", "VSPC_API_KEY": "key-from-host"}
    for name in ("migrate", "syncd"):
        environment = service_environment(services[name], host)
        assert environment["VSPC_API_KEY"] == "key-from-host"
        url = sa.engine.make_url(environment[config.DATABASE_URL_ENV])
        postgres_env = service_environment(services["postgres"], host)
        assert url.host == "postgres"
        assert url.password == postgres_env["POSTGRES_PASSWORD"] == "s3cretpw"
        assert url.username == postgres_env["POSTGRES_USER"]
        assert url.database == postgres_env["POSTGRES_DB"]
        _, target, mode = config_mount(services[name], host)
        assert mode == "ro"
        assert environment[config.CONFIG_ENV] == target


def test_compose_scales_syncd_without_a_host_port_clash(compose: dict[str, Any]) -> None:
    """`docker compose up --scale syncd=3`: each replica takes a host port of a range (on
    127.0.0.1), and nothing else names a container or a port only one of them can have."""
    syncd = compose["services"]["syncd"]
    assert "container_name" not in syncd
    for mapping in syncd["ports"]:
        address, host_ports, container_port = str(mapping).split(":")
        assert address == "127.0.0.1", "publish on the host's loopback only"
        first, _, last = host_ports.partition("-")
        assert last and int(last) - int(first) + 1 >= 3, f"{mapping}: not a range of 3+ ports"
        assert int(first) == int(container_port) == 9187


@pytest.mark.parametrize(
    "config_file", [None, "./deploy/production.toml"], ids=["demo-default", "production"]
)
def test_compose_config_files_exist_and_validate(
    compose: dict[str, Any], config_file: str | None
) -> None:
    host = {"VSPC_API_KEY": "key-from-host"}
    if config_file is not None:
        host["SYNCD_CONFIG_FILE"] = config_file
    syncd = compose["services"]["syncd"]
    path, _, _ = config_mount(syncd, host)
    assert path.is_file(), f"{path} is mounted but missing from the repository"
    cfg = config.load_config(path, environ=service_environment(syncd, host))
    assert cfg.database.url is not None
    assert cfg.tenants
    host_port = int(syncd["ports"][0].rsplit(":", 1)[1])
    assert config.parse_listen(cfg.daemon.listen) == ("0.0.0.0", host_port)
    assert f":{host_port}/healthz" in " ".join(syncd["healthcheck"]["test"])


def test_demo_config_holds_the_simulator_services_keys(compose: dict[str, Any]) -> None:
    command = compose["services"]["simulator"]["command"][1:]
    flags = dict(zip(command[::2], command[1::2], strict=True))
    dataset = sim.make_dataset(
        tenants=int(flags["--tenants"]),
        pairs_per_tenant=int(flags["--pairs"]),
        seed=int(flags["--seed"]),
    )
    cfg = config.load_config(ROOT / "deploy" / "demo.toml", environ={})
    assert [tenant.name for tenant in cfg.tenants] == [tenant.name for tenant in dataset]
    for tenant, simulated in zip(cfg.tenants, dataset, strict=True):
        assert tenant.url == f"http://simulator:{flags['--port']}"
        assert isinstance(tenant.auth, config.ApiKeyAuth)
        assert tenant.auth.api_key.get_secret_value() == simulated.api_key


# --- deploy/kubernetes ----------------------------------------------------------------------

KUBERNETES = ROOT / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every object of deploy/kubernetes/*.yaml (but the kustomization), by kind."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert "namespace" not in document["metadata"], f"{path.name} names a namespace"
            assert document["kind"] not in by_kind, f"two {document['kind']} objects"
            by_kind[document["kind"]] = document
    return by_kind


def _container(workload: Mapping[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _environment(workload: Mapping[str, Any], secret: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment: its `env` values and every key of the Secret it reads."""
    container = _container(workload)
    environment = {item["name"]: item["value"] for item in container.get("env", [])}
    for source in container.get("envFrom", []):
        assert source["secretRef"]["name"] == secret["metadata"]["name"]
        environment.update(secret["stringData"])
    return environment


def _mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity)
    assert match is not None, f"{quantity}: write memory in Mi or Gi"
    return float(match[1]) * (1024 if match[2] == "Gi" else 1)


def test_kubernetes_has_every_object_and_the_kustomization_lists_them(
    manifests: dict[str, dict[str, Any]],
) -> None:
    assert set(manifests) == {"ConfigMap", "Secret", "Job", "Deployment", "PodDisruptionBudget"}
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert "namespace" not in kustomization


def test_kubernetes_config_loads_with_the_secrets_environment(
    manifests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The ConfigMap's syncd.toml, mounted where SYNCD_CONFIG says, validates with syncd's
    own loader given the Secret's keys as environment; probes reach its listen port."""
    deployment, secret = manifests["Deployment"], manifests["Secret"]
    environment = _environment(deployment, secret)
    mount = next(
        item for item in _container(deployment)["volumeMounts"] if item["name"] == "config"
    )
    config_path = Path(environment[config.CONFIG_ENV])
    assert config_path.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    volume = next(
        item
        for item in deployment["spec"]["template"]["spec"]["volumes"]
        if item["name"] == "config"
    )
    configmap = manifests["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    path = tmp_path / config_path.name
    path.write_text(configmap["data"][config_path.name])
    cfg = config.load_config(path, environ=environment)
    assert cfg.database.url is not None and cfg.tenants
    assert cfg.daemon.replica_name is None, "the pod's name must make each replica's name"
    host, port = config.parse_listen(cfg.daemon.listen)
    assert host == "0.0.0.0"
    container = _container(deployment)
    ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path_
        assert ports.get(http["port"], http["port"]) == port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > cfg.daemon.shutdown_grace_s


def test_kubernetes_runs_two_replicas_as_the_images_user_within_a_budget(
    manifests: dict[str, dict[str, Any]],
) -> None:
    deployment, budget = manifests["Deployment"], manifests["PodDisruptionBudget"]
    assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == selector
    user = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "USER"][-1]
    for workload in (deployment, manifests["Job"]):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert (
            f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
        )
        container = _container(workload)
        assert container["image"] == _container(deployment)["image"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        # The measured RSS of a replica (see the scaling guide) fits the request.
        assert _mebibytes(requests["memory"]) >= 100
        assert _mebibytes(limits["memory"]) >= 2 * _mebibytes(requests["memory"])
    assert _container(deployment)["args"] == ["run"]


def test_kubernetes_migrates_with_a_one_shot_job(manifests: dict[str, dict[str, Any]]) -> None:
    job, secret = manifests["Job"], manifests["Secret"]
    assert _container(job)["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert 1 <= job["spec"]["backoffLimit"] <= 10
    # The Job reads the same config: it must get the same environment to validate it.
    assert _environment(job, secret) == _environment(manifests["Deployment"], secret)


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def test_dockerfile_runs_syncd_as_non_root_with_a_health_check(compose: dict[str, Any]) -> None:
    instructions = dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in instructions:
        by_keyword.setdefault(keyword, []).append(arguments)
    assert all(image.startswith("python:3.12-slim") for image in by_keyword["FROM"])
    user = by_keyword["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    # USER comes after everything that needs root (installing), before the entrypoint.
    keywords = [keyword for keyword, _ in instructions]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:]
    assert json.loads(by_keyword["ENTRYPOINT"][-1]) == ["syncd"]
    assert json.loads(by_keyword["CMD"][-1]) == ["run"]
    healthcheck = by_keyword["HEALTHCHECK"][-1]
    assert "urllib" in healthcheck and "curl" not in healthcheck
    environment = " ".join(by_keyword["ENV"])
    assert "SYNCD_HEALTHCHECK_URL=http://127.0.0.1:9187/healthz" in environment
    assert "SYNCD_HEALTHCHECK_URL" in healthcheck
    target = config_mount(compose["services"]["syncd"], {})[1]
    assert f"{config.CONFIG_ENV}={target}" in environment
    assert "9187" in by_keyword["EXPOSE"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "syncd" in pyproject["project"]["scripts"]


def test_dockerignore_keeps_the_build_inputs_and_drops_secrets() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/")
            for pattern in patterns
        )

    sources = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and not arguments.startswith("--from"):
            sources.extend(arguments.split()[:-1])
    assert set(sources) >= {"pyproject.toml", "README.md", "syncd", "migrations"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied but .dockerignore drops it"
    for secret in (".env", "syncd.toml", ".git", ".venv"):
        assert ignored(secret), f"{secret} would be sent to the Docker build"


# --- config.example.toml -------------------------------------------------------------------

_SETTING = re.compile(r"^#?\s*(?P<key>[a-z_]+)\s*=\s*(?P<value>.+?)\s*(?:#.*)?$")


def example_settings() -> dict[str, list[tuple[str, str]]]:
    """(key, value text) of every setting line, commented or not, by section."""
    found: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        header = re.fullmatch(r"\[\[?(\w+)\]\]?", line.strip())
        if header:
            section = header[1]
            continue
        match = _SETTING.match(line.strip())
        if match and section:
            found.setdefault(section, []).append((match["key"], match["value"]))
    return found


def test_example_config_loads() -> None:
    environ = {"VSPC_ACME_API_KEY": "acme-key", "VSPC_GLOBEX_PASSWORD": "globex-password"}
    cfg = config.load_config(EXAMPLE, environ=environ)
    assert [tenant.auth.method for tenant in cfg.tenants] == ["api_key", "password"]
    assert cfg.database.url is None  # the embedded PostgreSQL, as the comments say
    assert cfg.sync == config.SyncSettings() and cfg.daemon == config.DaemonConfig()


def test_example_config_names_every_key() -> None:
    found = example_settings()
    for section, model in SECTIONS.items():
        missing = set(keys_of(model)) - {key for key, _ in found.get(section, [])}
        assert not missing, f"config.example.toml [{section}] lacks {sorted(missing)}"


def test_example_config_shows_the_real_defaults() -> None:
    for section, settings in example_settings().items():
        model = config.SyncSettings if section == "tenants" else SECTIONS[section]
        default = model.model_validate({})
        by_key = {field.alias or name: name for name, field in model.model_fields.items()}
        for key, text in settings:
            name = by_key.get(key)
            if name is None or getattr(default, name) is None:
                continue  # not a [sync] key in a tenant, or no default (url, cron, ...)
            value = tomllib.loads(f"value = {text}")["value"]
            shown = getattr(model.model_validate({key: value}), name)
            assert shown == getattr(default, name), f"[{section}] {key} = {text} is not the default"


# --- README --------------------------------------------------------------------------------


def readme_section(heading: str) -> str:
    """The README text under `heading` (a whole heading line), up to the next heading of the
    same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = README.index(heading + "\n") + len(heading) + 1
    following = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(README, start)
    return README[start : following.start() if following else len(README)]


def test_readme_quickstart_is_the_two_make_commands() -> None:
    quickstart = readme_section("## Quickstart")
    first_block = re.search(r"```sh\n(.*?)```", quickstart, re.DOTALL)
    assert first_block is not None
    assert first_block[1].split("\n")[:-1] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: .*\n\t.*syncd demo$", makefile, re.MULTILINE)
    assert re.search(r"^test: lint typecheck pytest$", makefile, re.MULTILINE)


def test_readme_documents_every_config_key() -> None:
    reference = readme_section("## Configuration reference")
    for section, model in SECTIONS.items():
        heading = f"### `[[{section}]]`" if section == "tenants" else f"### `[{section}]`"
        text = readme_section(heading) if section != "tenants" else reference
        missing = [key for key in keys_of(model) if f"`{key}`" not in text]
        if section == "tenants":
            # Tenants document their own keys and inherit [sync]'s by reference.
            missing = [key for key in missing if key not in config.SYNC_KEYS]
        assert not missing, f"README {heading} lacks {missing}"


def test_readme_documents_every_command_and_option() -> None:
    parser = cli.build_parser()
    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    text = readme_section("## Command line")
    for action in parser._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help", "--version"):
                assert option in text, f"README lacks the global option {option}"
    for name, subparser in commands.choices.items():
        assert f"`syncd {name}" in text, f"README lacks `syncd {name}`"
        for action in subparser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"README lacks `syncd {name} {option}`"


def test_readme_lists_every_metric() -> None:
    families = metrics.Metrics().registry.collect()
    section = readme_section("## Metrics and alerts")
    for family in families:
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in section, f"README lacks the metric {name}"


def test_readme_has_a_performance_section() -> None:
    assert "## Performance" in README


@pytest.fixture
async def synced(engine: AsyncEngine, sim_state: sim.SimulatorState, simulator: str) -> None:
    """The test database with two runs of one tenant: an initial load, then churn."""
    tenant = tenant_for(sim_state.tenants["tenant-1"], simulator)
    assert (await sync_tenant(tenant, engine)).status == "succeeded"
    sim_state.churn("tenant-1", 0.02)
    assert (await sync_tenant(tenant, engine)).status == "succeeded"


async def test_readme_documents_every_view_column(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = :schema AND table_name = ANY(:views)"
            ),
            {"schema": schema.SCHEMA, "views": list(schema.REPORTING_VIEWS)},
        )
        columns: dict[str, list[str]] = {}
        for view, column in rows:
            columns.setdefault(view, []).append(column)
    assert sorted(columns) == sorted(schema.REPORTING_VIEWS)
    for view, names in columns.items():
        section = readme_section(f"### `{schema.SCHEMA}.{view}`")
        missing = [name for name in names if f"`{name}`" not in section]
        assert not missing, f"README's {view} section lacks {missing}"


async def test_readme_cookbook_queries_run(engine: AsyncEngine, synced: None) -> None:
    cookbook = readme_section("### Cookbook")
    queries = re.findall(r"```sql\n(.*?)```", cookbook, re.DOTALL)
    assert len(queries) >= 4
    async with engine.connect() as connection:
        answers = [(await connection.execute(sa.text(query))).all() for query in queries]
    links_now, changes, copy_jobs_changed = answers[0], answers[1], answers[2]
    assert links_now[0][0] == "tenant-1" and links_now[0][1] == 300
    assert len(changes) == 300 + 2 * 6  # initial load, then 6 removed and 6 added
    assert copy_jobs_changed, "the churned copy jobs show up"
