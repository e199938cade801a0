"""docker-compose.yml and the Dockerfile agree with the code they run.

The stack itself needs a Docker engine; what can be checked without one is checked here: the
services and their health checks, one worker pool per queue, start-up order, that every
ACCESSFLOW_* variable is a real setting, and that every command the image is given is a real
``accessflow`` command with valid option values.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import structlog
import yaml
from click.testing import CliRunner

from infra.cli.main import main
from infra.credentials.sealing import generate_seal_key
from infra.settings import Settings
from messages.routes import QUEUE_ROUTES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

INFRASTRUCTURE = ("rabbitmq", "postgres", "mailpit")
SETTINGS_VARIABLES = frozenset(f"ACCESSFLOW_{name.upper()}" for name in Settings.model_fields)
#: What `docker compose` would be given from the shell; every other variable takes its default.
SHELL = {"ACCESSFLOW_SEAL_KEY": generate_seal_key()}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, $NAME, $$
VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


@cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), "docker-compose.yml is not a mapping"
    return loaded


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def built_services() -> dict[str, dict[str, Any]]:
    """The services that run the image built from ./Dockerfile."""
    return {name: service for name, service in services().items() if "build" in service}


def worker_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in built_services().items()
        if service.get("command") and service["command"][0] == "workers"
    }


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_exec_form(keyword: str) -> list[str]:
    found = [arguments for instruction, arguments in dockerfile_instructions() if instruction == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    value = json.loads(found[-1])  # the last one counts
    assert isinstance(value, list), f"{keyword} is not in exec form: {found[-1]}"
    return value


def interpolate(value: str, shell: Mapping[str, str]) -> str:
    """Compose's variable interpolation, enough for this file."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg, current = match["op"], match["arg"] or "", shell.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?") and (current is None or (op == ":?" and not current)):
            raise AssertionError(f"docker compose would stop: {name}: {arg}")
        if op == ":+":
            return arg if current else ""
        if op == "+":
            return "" if current is None else arg
        return current or ""

    return VARIABLE.sub(replace, value)


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """The service's environment as its container would see it."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: interpolate(str(value), SHELL) for key, value in environment.items()}


def walk(node: Any) -> Iterator[tuple[Any, Any]]:
    """Every (key, value) of every mapping in the document, however deep."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def queues_of(command: list[str]) -> list[str]:
    queues = []
    for index, arg in enumerate(command):
        if arg in ("--queues", "-Q"):
            queues.append(command[index + 1])
        elif arg.startswith("--queues="):
            queues.append(arg.split("=", 1)[1])
    return queues


def resolve(args: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The accessflow command ARGS names, its command path, and the arguments left for it."""
    command: click.Command = main
    path, rest = ["accessflow"], list(args)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        name = rest.pop(0)
        command = command.commands[name]
        path.append(name)
    return command, path, rest


def commands_to_check() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, args, environment) of every command the image is given, the Dockerfile's CMD too."""
    shared = environment_of({"environment": compose()["x-accessflow-env"]})
    found = [("Dockerfile CMD", dockerfile_exec_form("CMD"), shared)]
    for name, service in built_services().items():
        command = service.get("command")
        if command is not None:
            assert isinstance(command, list), f"{name}: give command in exec form, a list"
            found.append((name, [str(arg) for arg in command], environment_of(service)))
    return found


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures logging for the process; put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("pika", "alembic.runtime.plugins")}
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)
    structlog.reset_defaults()
    structlog.configure(**config)


def test_is_a_compose_spec_file_without_version() -> None:
    assert "version" not in compose(), "the compose spec has no top-level version"
    assert set(INFRASTRUCTURE) | {"migrate"} <= set(services())


@pytest.mark.parametrize("name", INFRASTRUCTURE)
def test_infrastructure_services_have_healthchecks(name: str) -> None:
    healthcheck = services()[name].get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable", False)
    assert healthcheck["test"] and healthcheck["test"][0] in ("CMD", "CMD-SHELL"), healthcheck


def test_migrate_is_a_one_shot_of_the_image() -> None:
    migrate = services()["migrate"]
    assert "migrate" in built_services()
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["restart"] == "no"  # quoted: a bare `no` is YAML's false
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_built_services_use_the_dockerfile() -> None:
    for name, service in built_services().items():
        build = service["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context).resolve() == ROOT, f"{name} builds from {context}"
        assert (ROOT / context / dockerfile).resolve() == DOCKERFILE, f"{name} builds {dockerfile}"


@pytest.mark.parametrize("route", QUEUE_ROUTES, ids=lambda route: route.queue)
def test_one_worker_per_route_consumes_its_queue(route: Any) -> None:
    name = f"worker-{route.queue}"
    assert name in worker_services(), f"no worker service {name} for queue {route.queue}"
    assert queues_of(worker_services()[name]["command"]) == [route.queue]


def test_every_worker_consumes_exactly_one_queue_and_each_queue_has_one_worker() -> None:
    consumed = {name: queues_of(service["command"]) for name, service in worker_services().items()}
    assert all(len(queues) == 1 for queues in consumed.values()), consumed  # none left to consume all
    every_queue = sorted(queue for queues in consumed.values() for queue in queues)
    assert every_queue == sorted(route.queue for route in QUEUE_ROUTES)


def test_workers_restart_and_stop_gracefully() -> None:
    for name, service in worker_services().items():
        restart = service.get("restart", "no")
        restarts = restart in ("always", "unless-stopped") or restart.startswith("on-failure")
        assert restarts, f"{name}: restart {restart}"
        assert service.get("stop_grace_period"), f"{name} has no stop_grace_period"


def test_the_outbox_relay_runs_on_its_own_restarts_and_waits_for_its_services() -> None:
    # So that rows a crash left are published while every worker pool is scaled to zero.
    relay = services()["relay"]
    assert "relay" in built_services()
    assert relay["command"] == ["relay"]
    assert relay.get("restart") == "unless-stopped"
    assert relay.get("stop_grace_period"), "the relay has no stop_grace_period"
    assert "profiles" not in relay, "the relay must start with the stack"
    depends_on = relay["depends_on"]
    assert {"rabbitmq", "postgres", "migrate"} <= set(depends_on)
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_notifications_worker_waits_for_mailpit() -> None:
    assert "mailpit" in services()["worker-notifications"]["depends_on"]


def test_every_depends_on_has_the_fitting_condition() -> None:
    all_services = services()
    checked = 0
    for name, service in all_services.items():
        depends_on = service.get("depends_on")
        if depends_on is None:
            continue
        assert isinstance(depends_on, dict), f"{name}: the list form of depends_on has no conditions"
        for dependency, options in depends_on.items():
            assert dependency in all_services, f"{name} depends on unknown service {dependency}"
            condition = (options or {}).get("condition")
            target = all_services[dependency]
            if target.get("healthcheck") and not target["healthcheck"].get("disable", False):
                expected = "service_healthy"
            elif target.get("restart") == "no" and dependency == "migrate":
                expected = "service_completed_successfully"
            else:
                pytest.fail(f"{name} depends on {dependency}, which has neither a healthcheck nor runs once")
            assert condition == expected, f"{name} -> {dependency}: {condition}, want {expected}"
            checked += 1
    assert checked, "no depends_on at all"


def test_workers_wait_for_broker_database_and_migrations() -> None:
    for name, service in worker_services().items():
        depends_on = service["depends_on"]
        assert {"rabbitmq", "postgres", "migrate"} <= set(depends_on), name
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_every_accessflow_variable_is_a_setting() -> None:
    keys = set()
    for key, value in walk(compose()):
        if key == "environment":
            keys |= set(value) if isinstance(value, dict) else {item.split("=", 1)[0] for item in value}
    accessflow_keys = {key for key in keys if key.startswith("ACCESSFLOW_")}
    assert accessflow_keys, "no ACCESSFLOW_* environment at all"
    assert accessflow_keys <= SETTINGS_VARIABLES, accessflow_keys - SETTINGS_VARIABLES
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    interpolated = {match["name"] or match["bare"] for match in VARIABLE.finditer(text)}
    unknown = {name for name in interpolated if name and name.startswith("ACCESSFLOW_")} - SETTINGS_VARIABLES
    assert not unknown, f"${{...}} of variables that are no setting: {unknown}"


def test_app_environment_points_at_the_compose_services() -> None:
    environment = environment_of({"environment": compose()["x-accessflow-env"]})
    assert environment["ACCESSFLOW_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/accessflow" in environment["ACCESSFLOW_DATABASE_URL"]
    assert re.fullmatch(r"amqp://[^@]+@rabbitmq:5672/%2F", environment["ACCESSFLOW_BROKER_URL"])
    assert environment["ACCESSFLOW_SMTP_HOST"] == "mailpit"
    assert environment["ACCESSFLOW_SMTP_PORT"] == "1025"
    assert environment["ACCESSFLOW_SEAL_KEY"] == SHELL["ACCESSFLOW_SEAL_KEY"]
    assert environment["ACCESSFLOW_LOG_FORMAT"] == "json"
    with pytest.raises(AssertionError, match="ACCESSFLOW_SEAL_KEY"):
        interpolate(compose()["x-accessflow-env"]["ACCESSFLOW_SEAL_KEY"], {})
    for name, service in built_services().items():
        own = environment_of(service)
        if name == "migrate":
            # Only the migration connects as the database's superuser: it creates the roles.
            migration_url = own.pop("ACCESSFLOW_MIGRATION_DATABASE_URL")
            assert migration_url.startswith("postgresql+psycopg://accessflow:")
            assert "@postgres:5432/accessflow" in migration_url
        if name == "console":
            # The console adds its own settings, and only those.
            console = {key: own.pop(key) for key in list(own) if key.startswith("ACCESSFLOW_CONSOLE_")}
            assert console == {
                "ACCESSFLOW_CONSOLE_HOST": "0.0.0.0",  # noqa: S104 - in its container, published on loopback
                "ACCESSFLOW_CONSOLE_PORT": "8080",
                "ACCESSFLOW_CONSOLE_ADMINS_FILE": "/run/console/admins.json",
                "ACCESSFLOW_CONSOLE_SESSION_SECRET": "",
            }
            # and publishes its decisions as the admin tool, a user of its own where one is set up
            assert re.fullmatch(r"amqp://[^@]+@rabbitmq:5672/%2F", own.pop("ACCESSFLOW_BROKER_URL"))
            own["ACCESSFLOW_BROKER_URL"] = environment["ACCESSFLOW_BROKER_URL"]
        assert own == environment, f"{name} does not use the shared environment"


def test_the_services_connect_to_the_database_as_the_runtime_role() -> None:
    environment = environment_of({"environment": compose()["x-accessflow-env"]})
    assert environment["ACCESSFLOW_DATABASE_URL"].startswith("postgresql+psycopg://accessflow_runtime:")
    # and read, where only reading is needed, as the read-only role (migrate sets its password)
    assert environment["ACCESSFLOW_READONLY_DATABASE_URL"].startswith(
        "postgresql+psycopg://accessflow_readonly:"
    )
    assert "@postgres:5432/accessflow" in environment["ACCESSFLOW_READONLY_DATABASE_URL"]
    assert "ACCESSFLOW_MIGRATION_DATABASE_URL" not in environment


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("where", "args", "environment"), commands_to_check(), ids=[where for where, _, _ in commands_to_check()]
)
def test_every_command_is_a_cli_command(where: str, args: list[str], environment: dict[str, str]) -> None:
    command, path, rest = resolve(args)
    if rest not in (["--help"], ["-h"]):
        # A group runs only if it is a command too (accessflow console), else it prints its usage.
        runs = not isinstance(command, click.Group) or command.invoke_without_command
        assert runs, f"{where}: {args} names a group, not a command"
        # --help is eager and would skip them: convert and check every option value here.
        try:
            with command.make_context(" ".join(path), list(rest)):
                pass
        except click.UsageError as error:
            pytest.fail(f"{where}: {args}: {error.format_message()}")
    # The container sees the compose environment and nothing else of ours: the group's callback
    # validates it as Settings before the subcommand prints its help.
    env: dict[str, str | None] = {key: None for key in os.environ if key.startswith("ACCESSFLOW_")}
    env.update(environment)
    result = CliRunner().invoke(main, [*args, "--help"], prog_name="accessflow", env=env)
    assert result.exit_code == 0, f"{where}: {args}\n{result.output}{result.exception or ''}"
    assert result.output.startswith(f"Usage: {' '.join(path)} "), result.output


def test_no_container_names() -> None:
    assert not [value for key, value in walk(compose()) if key == "container_name"]


def test_cli_service_is_a_tool_with_the_examples() -> None:
    cli = services()["cli"]
    assert "tools" in cli["profiles"]
    assert "./examples:/app/examples:ro" in cli["volumes"]


def test_dockerfile_entrypoint_is_accessflow() -> None:
    assert dockerfile_exec_form("ENTRYPOINT") == ["accessflow"]
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", "var", ".git"} <= set(ignored)


def _compose_plugin() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    return docker if probe.returncode == 0 else None


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` validates the file without an engine; skipped without the plugin."""
    docker = _compose_plugin()
    if docker is None:
        pytest.skip("the docker CLI with its compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        env={**os.environ, **SHELL},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_console_is_opt_in_published_on_loopback_and_reads_its_admins_from_a_mount() -> None:
    console = services()["console"]
    assert console["profiles"] == ["console"]  # `docker compose up` alone does not start it
    assert console["command"] == ["console"]
    assert console["ports"] == ["127.0.0.1:8080:8080"]
    assert "./console:/run/console:ro" in console["volumes"]
    assert "/login" in " ".join(console["healthcheck"]["test"])
