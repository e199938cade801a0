"""The files ops use as they are agree with the code: the Grafana dashboard, the alert rules, the Kubernetes manifests.

Each file parses; every metric a panel or an alert names is one accessflow exports (read from
the metrics module's real registries); every command a manifest runs is an ``accessflow``
command with valid options, and every ACCESSFLOW_* variable is a setting.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from infra.cli.main import main
from infra.observability.metrics import exported_names
from infra.observability.server import LIVE_PATH, METRICS_PATH, READY_PATH
from infra.settings import Settings
from messages.routes import QUEUE_ROUTES
from tests.unit.test_compose import SETTINGS_VARIABLES, compose, resolve, restore_logging, worker_services

__all__ = ["restore_logging"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "accessflow.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
K8S = ROOT / "deploy" / "k8s"

#: PromQL words that look like metric names and are not.
PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
)


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects, found with regular expressions.

    Strings, label matchers, range selectors and grouping clauses are removed first; what is
    left that looks like an identifier and is not a function call or a keyword is a metric.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


EXPORTED = exported_names()


class TestTheRegexReadsPromQL:
    def test_it_finds_metrics_and_skips_functions_labels_and_keywords(self) -> None:
        expression = (
            'sum by (queue_name) (rate(a_total{queue=~"x|y", le="+Inf"}[5m])) / on(job) b_seconds_sum'
            " > 0.05 and histogram_quantile(0.95, sum without (pod) (rate(c_bucket[1h]))) or vector(1)"
        )
        assert metric_names(expression) == {"a_total", "b_seconds_sum", "c_bucket"}

    def test_the_exported_names_are_accessflow_s_own(self) -> None:
        assert "accessflow_messages_total" in EXPORTED
        assert "accessflow_request_completion_seconds_bucket" in EXPORTED
        assert "accessflow_dead_letter_messages" in EXPORTED
        assert all(name.startswith("accessflow_") for name in EXPORTED)


# --------------------------------------------------------------------------------------
# The Grafana dashboard


@cache
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


class TestTheDashboard:
    def test_is_a_dashboard_with_a_datasource_variable(self) -> None:
        assert dashboard()["uid"] == "accessflow"
        assert dashboard()["schemaVersion"] >= 36
        variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"

    def test_every_panel_queries_only_exported_series(self) -> None:
        queried: set[str] = set()
        for panel in panels():
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                names = metric_names(target["expr"])
                assert names, f"{panel['title']!r}: no metric in {target['expr']}"
                assert names <= EXPORTED, f"{panel['title']!r} names unknown series {names - EXPORTED}"
                queried |= names
        for variable in dashboard()["templating"]["list"]:
            if variable["type"] == "query":
                found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
                assert found and found[1] in EXPORTED, variable["definition"]
        # each series of the issue is shown somewhere
        wanted = {
            "accessflow_requests",
            "accessflow_request_completion_seconds_bucket",
            "accessflow_pending_review_requests",
            "accessflow_pending_review_oldest_age_seconds",
            "accessflow_outbox_backlog_rows",
            "accessflow_outbox_oldest_age_seconds",
            "accessflow_dead_letter_messages",
            "accessflow_emails",
            "accessflow_credentials_issued_total",
            "accessflow_refused_messages_total",
            "accessflow_messages_total",
            "accessflow_message_errors_total",
            "accessflow_message_retries_total",
            "accessflow_message_duration_seconds_bucket",
            "accessflow_messages_in_progress",
        }
        assert wanted <= queried, wanted - queried

    def test_panels_do_not_overlap(self) -> None:
        taken: set[tuple[int, int]] = set()
        for panel in panels():
            grid = panel["gridPos"]
            cells = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            assert not cells & taken, f"{panel['title']!r} overlaps another panel"
            taken |= cells


# --------------------------------------------------------------------------------------
# The alert rules


@cache
def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


class TestTheAlertRules:
    def test_every_rule_is_complete(self) -> None:
        assert rules()
        for rule in rules():
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert re.fullmatch(r"Accessflow[A-Za-z]+", rule["alert"]), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]

    def test_every_expression_names_only_exported_series(self) -> None:
        for rule in rules():
            names = metric_names(rule["expr"])
            assert names, f"{rule['alert']}: no metric in {rule['expr']}"
            assert names <= EXPORTED, f"{rule['alert']} names unknown series {names - EXPORTED}"

    @pytest.mark.parametrize(
        ("what", "series"),
        [
            ("a stale pending request", "accessflow_pending_review_oldest_age_seconds"),
            ("a growing outbox", "accessflow_outbox_backlog_rows"),
            ("a non-empty dead-letter queue", "accessflow_dead_letter_messages"),
            ("an error rate", "accessflow_message_errors_total"),
            ("no consumers", "accessflow_queue_consumers"),
        ],
    )
    def test_the_issue_s_alerts_exist(self, what: str, series: str) -> None:
        assert any(series in metric_names(rule["expr"]) for rule in rules()), f"no alert on {what}"


# --------------------------------------------------------------------------------------
# The Kubernetes manifests


@cache
def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                found.append((path.name, document))
    return found


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def environment(container: dict[str, Any]) -> dict[str, str]:
    """What a container sees of ours: its ConfigMap and Secret (the example's values), then its env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            document = of_kind("ConfigMap")[source["configMapRef"]["name"]]
        else:
            document = of_kind("Secret")[source["secretRef"]["name"]]
        env.update({k: str(v) for k, v in (document.get("data") or document.get("stringData")).items()})
    env.update({item["name"]: str(item["value"]) for item in container.get("env", []) if "value" in item})
    return env


def queues_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg in ("--queues", "-Q")]


def workloads() -> dict[str, dict[str, Any]]:
    return {**of_kind("Deployment"), **of_kind("Job")}


def workers() -> dict[str, dict[str, Any]]:
    return {name: d for name, d in of_kind("Deployment").items() if containers(d)[0]["args"][0] == "workers"}


class TestTheKubernetesManifests:
    def test_every_file_parses_and_kustomize_lists_the_rest(self) -> None:
        assert manifests()
        for name, document in manifests():
            assert {"apiVersion", "kind"} <= set(document), name
        kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
        listed = set(kustomization["resources"])
        on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
        assert listed == on_disk

    def test_one_deployment_per_queue_without_accessflow_s_supervisor(self) -> None:
        consumed = {name: queues_of(containers(d)[0]["args"]) for name, d in workers().items()}
        assert sorted(q for queues in consumed.values() for q in queues) == sorted(
            r.queue for r in QUEUE_ROUTES
        )
        for name, queues in consumed.items():
            assert len(queues) == 1, name
            assert "--no-supervise" in containers(workers()[name])[0]["args"], name

    def test_the_relay_the_collector_and_the_migration_run(self) -> None:
        deployments = of_kind("Deployment")
        assert containers(deployments["accessflow-relay"])[0]["args"] == ["relay"]
        assert containers(deployments["accessflow-metrics"])[0]["args"] == ["metrics"]
        assert deployments["accessflow-metrics"]["spec"]["replicas"] == 1, "one collector reads the tables"
        job = of_kind("Job")["accessflow-migrate"]
        assert containers(job)[0]["args"] == ["db", "upgrade"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")

    def test_pools_and_the_collector_have_probes_on_their_metrics_port(self) -> None:
        served = {**workers(), "accessflow-metrics": of_kind("Deployment")["accessflow-metrics"]}
        for name, deployment in served.items():
            container = containers(deployment)[0]
            port = int(environment(container)["ACCESSFLOW_METRICS_PORT"])
            assert environment(container)["ACCESSFLOW_METRICS_HOST"] == "0.0.0.0", name  # noqa: S104
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert named["metrics"] == port, name
            assert container["livenessProbe"]["httpGet"] == {"path": LIVE_PATH, "port": "metrics"}, name
            assert container["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "metrics"}, name
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert (
                annotations["prometheus.io/port"] == str(port)
                and annotations["prometheus.io/path"] == METRICS_PATH
            )

    def test_every_workload_has_resources_and_pools_outlast_their_shutdown(self) -> None:
        for name, workload in workloads().items():
            for container in containers(workload):
                assert container["resources"]["requests"]["cpu"], name
                assert container["resources"]["limits"]["memory"], name
        for name, deployment in workers().items():
            container = containers(deployment)[0]
            timeout = int(environment(container).get("ACCESSFLOW_SHUTDOWN_TIMEOUT_SECONDS", "60"))
            assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout, name
            settings_dir = environment(container)["ACCESSFLOW_METRICS_DIR"]
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            assert settings_dir in mounts, f"{name}: the metrics directory is no volume of the pod"

    def test_a_keda_scaled_object_scales_each_pool_on_its_queue_length(self) -> None:
        scaled = of_kind("ScaledObject")
        prefix = environment(containers(next(iter(workers().values())))[0])["ACCESSFLOW_QUEUE_PREFIX"]
        by_target = {obj["spec"]["scaleTargetRef"]["name"]: obj for obj in scaled.values()}
        assert set(by_target) == set(workers())
        authentications = of_kind("TriggerAuthentication")
        for name, deployment in workers().items():
            (queue,) = queues_of(containers(deployment)[0]["args"])
            (trigger,) = by_target[name]["spec"]["triggers"]
            assert trigger["type"] == "rabbitmq"
            assert trigger["metadata"]["queueName"] == f"{prefix}.{queue}"
            assert trigger["metadata"]["mode"] == "QueueLength"
            assert int(trigger["metadata"]["value"]) > 0
            assert trigger["authenticationRef"]["name"] in authentications
        for authentication in authentications.values():
            for ref in authentication["spec"]["secretTargetRef"]:
                assert ref["key"] in SETTINGS_VARIABLES and ref["name"] in of_kind("Secret")

    def test_the_console_is_served_with_its_own_secret_and_nothing_of_the_workers(self) -> None:
        deployment = of_kind("Deployment")["accessflow-console"]
        (container,) = containers(deployment)
        assert container["args"] == ["console"]
        # Not the Secret "accessflow": no runtime role, no workers' AMQP user, no seal key
        assert "envFrom" not in container
        from_secrets = {
            item["name"]: item["valueFrom"]["secretKeyRef"]
            for item in container["env"]
            if "secretKeyRef" in item.get("valueFrom", {})
        }
        assert {ref["name"] for ref in from_secrets.values()} == {"accessflow-console"}
        assert set(from_secrets) == {
            "ACCESSFLOW_READONLY_DATABASE_URL",
            "ACCESSFLOW_BROKER_URL",
            "ACCESSFLOW_CONSOLE_SESSION_SECRET",
        }
        env = environment(container)
        port = int(env["ACCESSFLOW_CONSOLE_PORT"])
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/login", "port": "http"}
        # its admins file is on the Secret's volume, readable by its group only
        mount = next(
            m
            for m in container["volumeMounts"]
            if env["ACCESSFLOW_CONSOLE_ADMINS_FILE"].startswith(m["mountPath"])
        )
        (volume,) = [
            v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
        ]
        assert (
            volume["secret"]["secretName"] == "accessflow-console"
            and volume["secret"]["defaultMode"] == 0o440
        )
        assert deployment["spec"]["replicas"] == 1, "failed logins are counted per process"
        service = of_kind("Service")["accessflow-console"]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    def test_every_accessflow_variable_is_a_setting(self) -> None:
        text = "\n".join(path.read_text() for path in K8S.glob("*.yaml"))
        named = set(re.findall(r"\bACCESSFLOW_[A-Z0-9_]+", text))
        assert named, "no ACCESSFLOW_* variable at all"
        assert named <= SETTINGS_VARIABLES, named - SETTINGS_VARIABLES
        for _, container in [(n, c) for n, w in workloads().items() for c in containers(w)]:
            Settings(**{k.removeprefix("ACCESSFLOW_").lower(): v for k, v in environment(container).items()})

    @pytest.mark.usefixtures("restore_logging")
    def test_every_command_is_an_accessflow_command(self) -> None:
        for name, workload in workloads().items():
            for container in containers(workload):
                args = [str(arg) for arg in container["args"]]
                command, path, rest = resolve(args)
                with command.make_context(" ".join(path), list(rest)):
                    pass  # converts and checks every option value
                env: dict[str, str | None] = {
                    key: None for key in os.environ if key.startswith("ACCESSFLOW_")
                }
                env.update(environment(container))
                result = CliRunner().invoke(main, [*args, "--help"], prog_name="accessflow", env=env)
                assert result.exit_code == 0, f"{name}: {args}\n{result.output}{result.exception or ''}"
                assert result.output.startswith(f"Usage: {' '.join(path)} "), result.output


# --------------------------------------------------------------------------------------
# docker-compose.yml uses the same endpoint


def test_compose_pools_and_collector_check_readiness_on_their_metrics_port() -> None:
    port = compose()["x-accessflow-env"]["ACCESSFLOW_METRICS_PORT"]
    checked = {**worker_services(), "metrics": compose()["services"]["metrics"]}
    for name, service in checked.items():
        test = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}{READY_PATH}" in test, name
