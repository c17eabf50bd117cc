"""The deployment files, checked without a Docker engine or a Kubernetes cluster.

compose.yaml is validated against the Compose Specification's JSON schema as shipped by the
check-jsonschema package (its vendored `compose-spec.json`), after Compose-style variable
interpolation. The Prometheus, Grafana and Helm files are checked for structure and for
agreement with each other, with the compose file and with natron's own names (the `natron`
argument parser, broker/subjects.py, the metric names the gateway serves). The leaf-node
configurations are run: a real central and a real edge nats-server, with an overflow worker's
traffic crossing the leaf connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import os
import re
import shlex
import subprocess
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from ruamel.yaml import YAML

from broker.auth import seed_path
from broker.server import find_nats_server, free_ports
from broker.subjects import Subjects
from natron.cli import creds
from natron.cli.main import build_parser
from natron.cli.serve import NATS_STOP_TIMEOUT_S, stop_bound_s
from natron.cli.services import CLOSE_RESERVE_S, drain_budget_s
from natron.cli.supervisor import SUPERVISOR_GRACE_S
from natron.settings import (
    GatewaySettings,
    OrchestratorSettings,
    RouterSettings,
    ServeSettings,
    WorkerSettings,
)
from tests.harness import wait_until_async

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "natron"
LEAF = DEPLOY / "leafnode"

# The metric names natron serves (gateway: the fleet; workers: their own), Triton's and natron's.
METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "natron_queue_depth",
    "natron_workers_up",
    "natron_nats_connected",
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
    "nv_energy_consumption",
}
HISTOGRAMS = {"natron_gateway_request_duration_seconds", "natron_batch_size"}
SERIES = METRICS | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


# -- helpers ---------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text())


def load_yaml_all(text: str) -> list[Any]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(text) if doc is not None]


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error} and $$, applied to every string of the document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        found, op, arg = env.get(name), match["op"], match["arg"]
        if op in (":-", "-"):
            return (found if found else arg) if op == ":-" else (arg if found is None else found)
        if op in (":?", "?"):
            if found or (op == "?" and found is not None):
                return found or ""
            raise ValueError(f"required variable {name} is unset: {arg}")
        return found or ""

    return _VARIABLE.sub(substitute, value)


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def validate_compose(document: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = sorted(validator(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = interpolate(load_yaml(ROOT / "compose.yaml"), {})
    return document


def natron_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The natron services (not `creds`, the one-shot writer of the credentials they use)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("natron:") and name != "creds"
    }


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


# -- the compose file ------------------------------------------------------------------------


def test_the_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    validate_compose(compose)


def test_the_compose_file_validates_with_every_variable_set_too() -> None:
    env = {
        "NATRON_MODELS": "/srv/models",
        "NATRON_IMAGE": "registry.example/natron:0.1.0",
        "NATRON_MODEL_CONTROL_MODE": "explicit",
        "NATRON_GPU": "GPU-8b2a3c4d",
        "NATRON_HTTP_PORT": "18000",
    }
    document = interpolate(load_yaml(ROOT / "compose.yaml"), env)
    validate_compose(document)
    assert "/srv/models:/models:ro" in document["services"]["worker"]["volumes"]
    assert option(document["services"]["router"]["command"], "--model-control-mode") == "explicit"


def test_the_leaf_node_override_is_valid_alone_and_merged_with_the_compose_file(
    compose: dict[str, Any],
) -> None:
    override_file = LEAF / "compose.leaf.yaml"
    with pytest.raises(ValueError, match="NATRON_HUB_LEAF_URL"):
        interpolate(load_yaml(override_file), {})
    override = interpolate(load_yaml(override_file), {"NATRON_HUB_LEAF_URL": "nats-leaf://e:p@hub:7422"})
    validate_compose(override)
    # Compose's merge for these keys: command replaced, environment merged, volumes appended.
    merged = json.loads(json.dumps(compose))
    nats_service, extra = merged["services"]["nats"], override["services"]["nats"]
    nats_service["command"] = extra["command"]
    nats_service.setdefault("environment", {}).update(extra["environment"])
    nats_service["volumes"] = nats_service.get("volumes", []) + extra["volumes"]
    validate_compose(merged)
    config_path = option(nats_service["command"], "-c")
    mounted = {v.split(":")[1]: v.split(":")[0] for v in extra["volumes"]}
    assert config_path in mounted and (ROOT / mounted[config_path]).is_file()


def test_docker_compose_up_runs_the_cpu_stack_and_the_gpu_profile_adds_a_gpu_worker(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert {"nats", "router", "gateway", "worker", "prometheus", "grafana"} <= default
    assert set(services) - default == {"worker-gpu"}
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert [d["driver"] for d in devices] == ["nvidia"] and "gpu" in devices[0]["capabilities"]
    assert option(services["worker-gpu"]["command"], "--device") == "gpu:0"
    assert option(services["worker"]["command"], "--device") == "cpu"
    assert "deploy" not in services["worker"]


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_the_health_checks_probe_the_ports_the_services_listen_on(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway = " ".join(services["gateway"]["healthcheck"]["test"])
    assert f"127.0.0.1:{option(services['gateway']['command'], '--http-port')}/v2/health/ready" in gateway
    for name in ("worker", "worker-gpu", "ensemble"):
        port = option(services[name]["command"], "--metrics-port")
        assert f"127.0.0.1:{port}/metrics" in " ".join(services[name]["healthcheck"]["test"]), name
    assert "127.0.0.1:8222/healthz" in " ".join(services["nats"]["healthcheck"]["test"])


def test_the_router_health_check_reads_the_routers_own_metrics(compose: dict[str, Any]) -> None:
    router = compose["services"]["router"]
    check = " ".join(router["healthcheck"]["test"])
    port = option([str(p) for p in router["command"]], "--metrics-port")
    assert port is not None and f"127.0.0.1:{port}/metrics" in check
    assert "natron_nats_connected 1.0" in check
    assert "natron_nats_connected" in (ROOT / "router" / "metrics.py").read_text()


def test_every_natron_command_in_the_compose_file_parses_with_the_natron_command_line(
    compose: dict[str, Any],
) -> None:
    services = natron_services(compose)
    assert {"router", "gateway", "worker", "worker-gpu"} <= set(services)
    assert compose["services"]["creds"]["command"] == ["creds", "/creds"]
    roles = {"router": "router", "gateway": "gateway", "worker": "worker", "worker-gpu": "worker"}
    roles["ensemble"] = "orchestrator"
    for name, service in services.items():
        command = [str(part) for part in service["command"]]
        args = build_parser().parse_args(command)
        assert args.nats_url == "nats://nats:4222", name
        # Each service connects as its own role, from the volume the creds service wrote.
        assert args.nats_creds == f"/creds/{roles[name]}.nk", name
        assert "natron-creds:/creds:ro" in service["volumes"], name


def test_the_broker_admits_only_the_roles_credentials_and_shows_its_monitoring_to_this_host_only(
    compose: dict[str, Any],
) -> None:
    nats_service = compose["services"]["nats"]
    assert nats_service["depends_on"]["creds"]["condition"] == "service_completed_successfully"
    assert "natron-creds:/etc/nats/creds:ro" in nats_service["volumes"]
    assert 'include "creds/auth.conf"' in compose["configs"]["nats-conf"]["content"]
    monitor = [p for p in nats_service["ports"] if p.endswith(":8222")]
    assert monitor and all(p.startswith("127.0.0.1:") for p in monitor)


def test_the_natron_services_are_built_from_the_dockerfiles_in_deploy(compose: dict[str, Any]) -> None:
    for name, service in natron_services(compose).items():
        dockerfile = service["build"]["dockerfile"]
        assert (ROOT / service["build"]["context"] / dockerfile).is_file(), name
        expected = "deploy/Dockerfile.cuda" if name == "worker-gpu" else "deploy/Dockerfile"
        assert dockerfile == expected, name
        assert "/models" in [v.split(":")[1] for v in service["volumes"]], name


def test_the_nats_service_runs_jetstream_with_its_monitoring_port(compose: dict[str, Any]) -> None:
    service = compose["services"]["nats"]
    target = option(service["command"], "-c")
    (config,) = [c for c in service["configs"] if c["target"] == target]
    content = compose["configs"][config["source"]]["content"]
    assert re.search(r"(?m)^http_port: 8222$", content) and "jetstream {" in content
    assert any(port.endswith(":8222") for port in service["ports"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "natron.conf"
        path.write_text(content.replace("store_dir: /data", f"store_dir: {tmp}/js"))
        creds.write(Path(tmp) / "creds", "natron")  # what the creds service writes beside it
        check = subprocess.run([find_nats_server(), "-t", "-c", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr + check.stdout


def test_every_volume_is_declared_and_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


# -- the images ------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def installed_packages() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return {pattern.rstrip("*") for pattern in include}


@pytest.mark.parametrize(
    ("dockerfile", "extra"), [("Dockerfile", "cpu"), ("Dockerfile.cuda", "gpu")], ids=["cpu", "cuda"]
)
def test_each_image_copies_every_package_installs_its_extra_and_builds_the_example_models(
    dockerfile: str, extra: str
) -> None:
    instructions = dockerfile_instructions(DEPLOY / dockerfile)
    copied = set()
    for kind, argument in instructions:
        if kind == "COPY":
            *sources, _ = shlex.split(argument)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                copied.add(source)
    assert installed_packages() <= copied
    runs = " ".join(argument for kind, argument in instructions if kind == "RUN")
    assert f'pip install ".[{extra}]"' in runs
    assert "examples/build_models.py --out /models" in runs
    assert ("ENTRYPOINT", '["natron"]') in instructions
    ignore = (DEPLOY / f"{dockerfile}.dockerignore").read_text().split()
    assert {"**/.venv", "**/.git", "examples/models"} <= set(ignore)


def test_the_cuda_image_starts_from_an_nvidia_cuda_runtime_image() -> None:
    (base,) = [arg for kind, arg in dockerfile_instructions(DEPLOY / "Dockerfile.cuda") if kind == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:12\.[0-9.]+-cudnn-runtime-ubuntu[0-9.]+", base), base


# -- Prometheus and Grafana ------------------------------------------------------------------


def scrape_targets(prometheus: dict[str, Any]) -> dict[str, set[str]]:
    """job name -> 'host:port' targets, DNS service discovery included."""
    jobs: dict[str, set[str]] = {}
    for job in prometheus["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A" and "port" in dns, job["job_name"]
            targets.update(f"{name}:{dns['port']}" for name in dns["names"])
    return jobs


def test_prometheus_scrapes_every_service_that_serves_metrics(compose: dict[str, Any]) -> None:
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    names = [job["job_name"] for job in prometheus["scrape_configs"]]
    assert len(names) == len(set(names))
    targets = set().union(*scrape_targets(prometheus).values())
    services = compose["services"]
    expected = {"localhost:9090", "grafana:3000", "nats-exporter:7777"}
    for name, service in natron_services(compose).items():
        port = option([str(p) for p in service["command"]], "--metrics-port")
        if port is not None:
            expected.add(f"{name}:{port}")
    assert expected <= targets
    scraped = {target.split(":")[0] for target in targets} | {"prometheus"}
    # NATS serves JSON monitoring only: the official exporter beside it is what is scraped.
    assert "-varz" in services["nats-exporter"]["command"]
    assert services["nats-exporter"]["command"][-1] == "http://nats:8222"
    scraped.add("nats")
    # Every service is scraped, the router included (it serves its own metrics); `creds`
    # only writes files and exits.
    assert set(services) - scraped == {"creds"}


def test_the_grafana_datasource_and_dashboards_are_where_compose_mounts_them(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    (datasource,) = load_yaml(next((provisioning / "datasources").glob("*.yml")))["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(next((provisioning / "dashboards").glob("*.yml")))["providers"]
    dashboards_mount = provider["options"]["path"]
    assert (ROOT / mounts[dashboards_mount] / "natron.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_mount}/natron.json"


_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords aside)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match[0].lower() not in _PROMQL_KEYWORDS:
            names.add(match[0])
    return names


def test_promql_metric_extraction_ignores_functions_labels_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(x_bucket{job=~"$job"}[$__rate_interval])))'
        " / on (model) group_left sum without (gpu) (y) > bool 0"
    )
    assert promql_metrics(expr) == {"x_bucket", "y"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "natron.json").read_text())
    return document


def test_the_dashboard_has_the_panels_an_operator_needs(dashboard: dict[str, Any]) -> None:
    titles = [p["title"].lower() for p in dashboard["panels"] if p["type"] != "row"]
    for wanted in (
        "throughput",
        "latency percentiles",
        "queue depth",
        "batch size",
        "gpu utilization",
        "gpu memory",
    ):
        assert any(wanted in title for title in titles), wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "natron"


def test_every_dashboard_query_names_only_metrics_natron_serves(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names = promql_metrics(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= SERIES, f"{panel['title']}: unknown {names - SERIES}"
            used |= names
    for variable in dashboard["templating"]["list"]:
        metric = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?, *\w+\)", variable["definition"])
        assert metric and metric[1] in SERIES, variable["definition"]
    assert "natron_gateway_request_duration_seconds_bucket" in used
    assert {"natron_queue_depth", "natron_batch_size_bucket", "nv_gpu_utilization"} <= used


def test_every_panel_reads_the_provisioned_prometheus_datasource(dashboard: dict[str, Any]) -> None:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"


# -- the Helm chart --------------------------------------------------------------------------

_WHOLE_LINE_ACTION = re.compile(r"^\s*\{\{[^{}]*\}\}\s*$")
_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def chart_templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").glob("*.yaml"))}


def strip_template(text: str) -> str:
    """The YAML shape of a template: lines that are one action (control flow, includes with
    nindent) dropped, inline actions replaced by a placeholder scalar."""
    lines = [line for line in text.splitlines() if not _WHOLE_LINE_ACTION.match(line)]
    return "\n".join(_ACTION.sub("TEMPLATED", line) for line in lines) + "\n"


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(CHART / "values.yaml")
    return document


def test_the_chart_declares_the_official_nats_chart_with_jetstream_enabled(values: dict[str, Any]) -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "natron" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    (nats_chart,) = chart["dependencies"]
    assert nats_chart["name"] == "nats"
    assert nats_chart["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert nats_chart["condition"] == "nats.enabled"
    jetstream = values["nats"]["config"]["jetstream"]
    assert jetstream["enabled"] and jetstream["memoryStore"]["enabled"]  # the work queue is in memory
    assert values["nats"]["config"]["monitor"]["enabled"]  # KEDA reads the consumer's pending count there


def test_the_chart_values_satisfy_the_chart_values_schema(values: dict[str, Any]) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)
    assert schema["properties"]["autoscaling"]["properties"]["mode"]["enum"] == ["none", "keda", "hpa"]
    wrong = json.loads(json.dumps(values))
    wrong["autoscaling"]["mode"] = "keda+hpa"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(wrong)


def test_every_chart_template_is_kubernetes_yaml_once_its_template_actions_are_stripped() -> None:
    kinds = set()
    for name, text in chart_templates().items():
        documents = load_yaml_all(strip_template(text))
        assert documents, name
        for document in documents:
            assert {"apiVersion", "kind", "metadata"} <= set(document), name
            assert document["metadata"].get("name"), name
            kinds.add((document["apiVersion"], document["kind"]))
    assert {
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "ConfigMap"),
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
    } <= kinds


def test_every_value_a_template_reads_is_declared_in_values_yaml(values: dict[str, Any]) -> None:
    texts = [*chart_templates().values(), (CHART / "templates" / "_helpers.tpl").read_text()]
    paths = {match for text in texts for match in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text)}
    assert paths
    for path in sorted(paths):
        node: Any = values
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f".Values.{path} is not in values.yaml"
            node = node[key]


def test_every_helper_a_template_includes_is_defined() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    defined = set(re.findall(r'define "([^"]+)"', helpers))
    texts = [*chart_templates().values(), helpers, (CHART / "templates" / "NOTES.txt").read_text()]
    used = {name for text in texts for name in re.findall(r'(?:include|template) "([^"]+)"', text)}
    assert used and used <= defined, used - defined


def helper_format(name: str) -> str:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = re.search(rf'define "{re.escape(name)}" -}}}}(.*?){{{{- end }}}}', helpers, re.S)
    assert body, name
    fmt = re.search(r'printf "([^"]+)"', body[1])
    assert fmt, name
    return fmt[1]


def test_the_chart_names_the_stream_and_consumers_as_the_broker_does(values: dict[str, Any]) -> None:
    subjects = Subjects(values["prefix"])
    assert helper_format("natron.stream") % values["prefix"].upper() == subjects.stream
    for entry in values["autoscaling"]["models"]:
        model, version = entry["model"], str(entry["version"])
        assert helper_format("natron.consumer") % (model, version) == subjects.consumer(model, version)


def test_the_keda_scaled_object_scales_the_worker_deployment_on_jetstream_consumer_pending() -> None:
    text = chart_templates()["keda-scaledobject.yaml"]
    assert text.startswith('{{- if eq .Values.autoscaling.mode "keda" }}')
    (scaled,) = load_yaml_all(strip_template(text))
    assert scaled["kind"] == "ScaledObject" and scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert re.search(r'name: \{\{ include "natron.fullname" \. \}\}-worker\n', text)
    assert "minReplicaCount" in spec and "maxReplicaCount" in spec
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    metadata = trigger["metadata"]
    assert {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"} <= set(metadata)
    assert 'stream: {{ include "natron.stream" $ | quote }}' in text
    assert 'consumer: {{ include "natron.consumer" . | quote }}' in text
    assert "{{- range .Values.autoscaling.models }}" in text
    worker = chart_templates()["worker.yaml"]
    assert re.search(r'name: \{\{ include "natron.fullname" \. \}\}-worker\n', worker)


def test_the_hpa_alternative_scales_on_the_queue_depth_metric_and_excludes_keda() -> None:
    templates = chart_templates()
    text = templates["hpa.yaml"]
    assert text.startswith('{{- if eq .Values.autoscaling.mode "hpa" }}')
    (hpa,) = load_yaml_all(strip_template(text))
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "natron_queue_depth"
    assert set(metric["external"]["metric"]["selector"]["matchLabels"]) == {"model", "version"}
    assert metric["external"]["target"]["type"] == "AverageValue"
    # One switch picks at most one autoscaler; only without one does the chart set replicas.
    worker = templates["worker.yaml"]
    assert '{{- if eq .Values.autoscaling.mode "none" }}\n  replicas: {{ .Values.worker.replicas }}' in worker


def test_the_gateway_is_probed_on_the_kserve_health_endpoints() -> None:
    documents = load_yaml_all(strip_template(chart_templates()["gateway.yaml"]))
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {p["name"] for p in container["ports"]} == {"http", "grpc", "metrics"}
    (service,) = [d for d in documents if d["kind"] == "Service"]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc", "metrics"}


def test_the_workers_and_router_read_the_model_repository_from_the_same_volume() -> None:
    templates = chart_templates()
    for name in ("router.yaml", "worker.yaml"):
        assert '{{- include "natron.volumes" . | nindent 8 }}' in templates[name], name
        assert '{{- include "natron.volumeMounts" . | nindent 12 }}' in templates[name], name
    (configmap,) = load_yaml_all(strip_template(templates["models-configmap.yaml"]))
    assert configmap["kind"] == "ConfigMap"


def chart_args(text: str, values: dict[str, Any]) -> Iterator[list[str]]:
    """Each container's args, with simple actions evaluated against values.yaml."""

    def evaluate(action: str) -> str:
        head = action.split("|")[0].strip()
        lookup = re.fullmatch(r"\$?\.Values\.([\w.]+)", head)
        if lookup:
            node: Any = values
            for key in lookup[1].split("."):
                node = node[key]
            return str(node)
        ternary = re.fullmatch(r'ternary "([^"]*)" "([^"]*)" \.Values\.([\w.]+)', head)
        if ternary:
            node = values
            for key in ternary[3].split("."):
                node = node[key]
            return ternary[1] if node else ternary[2]
        if head.startswith('include "natron.natsUrl"'):
            return "nats://natron-nats:4222"
        return "1"  # a range variable

    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "args:":
            continue
        indent = len(line) - len(line.lstrip())
        args = []
        for item in lines[i + 1 :]:
            if _WHOLE_LINE_ACTION.match(item):
                continue
            if len(item) - len(item.lstrip()) <= indent or not item.strip().startswith("- "):
                break
            args.append(_ACTION.sub(lambda m: evaluate(m[1]), item.strip()[2:]))
        yield args


def test_every_natron_command_in_the_chart_parses_with_the_natron_command_line(
    values: dict[str, Any],
) -> None:
    commands = set()
    for name, text in chart_templates().items():
        for args in chart_args(text, values):
            parsed = build_parser().parse_args(args)
            commands.add(parsed.command)
            assert parsed.prefix == values["prefix"], name
            assert parsed.nats_url == "nats://natron-nats:4222", name
    assert commands == {"router", "gateway", "worker", "ensemble"}


# -- one shutdown budget ---------------------------------------------------------------------


def seconds(text: Any) -> float:
    """A compose duration ("35s", "1m30s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(text))
    assert parts and any(parts.groups()), text
    return int(parts[1] or 0) * 60 + float(parts[2] or 0)


def test_the_shutdown_budgets_of_serve_compose_and_helm_fit_inside_each_other(
    compose: dict[str, Any], values: dict[str, Any]
) -> None:
    """Inside out: a worker's drain and the close that follows it fit in a service's budget; a
    supervisor (natron serve) waits a little longer than its children's budget; compose's
    stop_grace_period and Helm's terminationGracePeriodSeconds are longer still, so nobody
    kills a process that keeps its budget."""
    budget_s = WorkerSettings.model_fields["shutdown_timeout_s"].default
    for role in (GatewaySettings, RouterSettings, WorkerSettings, OrchestratorSettings, ServeSettings):
        assert role.model_fields["shutdown_timeout_s"].default == budget_s, role
    drain_s = WorkerSettings.model_fields["drain_timeout_s"].default
    assert drain_s + CLOSE_RESERVE_S <= budget_s
    assert drain_budget_s(budget_s) + CLOSE_RESERVE_S <= budget_s  # the gateway's drain
    assert stop_bound_s(budget_s) >= budget_s + SUPERVISOR_GRACE_S + NATS_STOP_TIMEOUT_S

    for name, service in natron_services(compose).items():
        command = [str(part) for part in service["command"]]
        service_budget_s = float(
            option(command, "--shutdown-timeout-s")
            or service.get("environment", {}).get("NATRON_SHUTDOWN_TIMEOUT_S")
            or budget_s
        )
        assert float(option(command, "--drain-timeout-s") or drain_s) + CLOSE_RESERVE_S <= service_budget_s, (
            name
        )
        assert seconds(service["stop_grace_period"]) > service_budget_s + SUPERVISOR_GRACE_S, name

    chart_budget_s = float(values["shutdownTimeoutS"])
    assert float(values["worker"]["drainTimeoutS"]) + CLOSE_RESERVE_S <= chart_budget_s
    for name in ("gateway.yaml", "router.yaml", "worker.yaml", "ensemble.yaml"):
        text = chart_templates()[name]
        (args,) = list(chart_args(text, values))
        assert float(option(args, "--shutdown-timeout-s") or 0) == chart_budget_s, name
        if "--drain-timeout-s" in args:
            assert float(option(args, "--drain-timeout-s") or 0) + CLOSE_RESERVE_S <= chart_budget_s, name
        grace = re.search(
            r"terminationGracePeriodSeconds: \{\{ add \.Values\.shutdownTimeoutS (\d+) \}\}", text
        )
        assert grace, f"{name}: terminationGracePeriodSeconds is not derived from shutdownTimeoutS"
        assert int(grace[1]) > SUPERVISOR_GRACE_S, name


# -- the edge as a leaf node -----------------------------------------------------------------

LEAF_ENV = {
    "NATRON_HUB_PASSWORD": "hub-secret",
    "NATRON_EDGE1_LEAF_PASSWORD": "leaf-secret",
    "NATRON_EDGE1_OVERFLOW_PASSWORD": "overflow-secret",
    "NATRON_SYS_PASSWORD": "sys-secret",
}


def leaf_config(name: str, ports: dict[int, int], store: Path, target: Path) -> Path:
    """One of deploy/leafnode's configs with its ports and store moved for this test."""
    text = (LEAF / name).read_text()
    for old, new in ports.items():
        text, count = re.subn(rf"(?m)^(\s*)(port|http_port): {old}$", rf"\g<1>\g<2>: {new}", text)
        assert count == 1, (name, old)
    text, count = re.subn(r"(?m)^(\s*)store_dir: /data$", rf"\g<1>store_dir: {store}", text)
    assert count == 1
    path = target / name
    path.write_text(text)
    return path


def test_the_edge_and_central_nats_configurations_are_accepted_by_nats_server(tmp_path: Path) -> None:
    env = {**os.environ, **LEAF_ENV, "NATRON_HUB_LEAF_URL": "nats-leaf://edge1:leaf-secret@hub:7422"}
    # The edge includes the roles' authorization from beside it, as compose mounts it.
    creds.write(tmp_path / "creds", "natron")
    edge = leaf_config("edge-nats.conf", {}, tmp_path / "js", tmp_path)
    for conf in (LEAF / "central-nats.conf", edge):
        check = subprocess.run(
            [find_nats_server(), "-t", "-c", str(conf)], capture_output=True, text=True, env=env
        )
        assert check.returncode == 0, check.stderr + check.stdout
    # A secret left unset stops the server instead of starting it open.
    check = subprocess.run(
        [find_nats_server(), "-t", "-c", str(edge)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "NATRON_HUB_LEAF_URL"},
    )
    assert check.returncode != 0 and "NATRON_HUB_LEAF_URL" in check.stderr + check.stdout


@contextlib.contextmanager
def hub_and_edge(tmp: Path) -> Iterator[dict[str, int]]:
    names = ("hub", "hub_monitor", "hub_leaf", "edge", "edge_monitor")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    env = {
        **os.environ,
        **LEAF_ENV,
        "NATRON_HUB_LEAF_URL": f"nats-leaf://edge1:leaf-secret@127.0.0.1:{ports['hub_leaf']}",
    }
    hub_conf = leaf_config(
        "central-nats.conf",
        {4222: ports["hub"], 8222: ports["hub_monitor"], 7422: ports["hub_leaf"]},
        tmp / "hub-js",
        tmp,
    )
    edge_conf = leaf_config(
        "edge-nats.conf", {4222: ports["edge"], 8222: ports["edge_monitor"]}, tmp / "edge-js", tmp
    )
    creds.write(tmp / "creds", "natron")
    processes = []
    try:
        for name, conf in (("hub", hub_conf), ("edge", edge_conf)):
            log = (tmp / f"{name}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [find_nats_server(), "-c", str(conf)], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_for_leaf(monitor_port: int, timeout_s: float = 15.0) -> None:
    url = f"http://127.0.0.1:{monitor_port}/leafz"

    async def connected() -> bool:
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=1).read())
        return bool(json.loads(body).get("leafnodes"))

    await wait_until_async(connected, timeout_s, "the edge connected to the hub as a leaf node")


async def test_a_central_worker_serves_an_edge_request_across_the_leaf_connection(tmp_path: Path) -> None:
    subjects = Subjects()
    with hub_and_edge(tmp_path) as ports:
        await wait_for_leaf(ports["edge_monitor"])
        # The edge's own services, all in one connection here: the operator's role.
        edge = await nats.connect(
            f"nats://127.0.0.1:{ports['edge']}", nkeys_seed=str(seed_path(tmp_path / "creds", "admin"))
        )
        central = await nats.connect(f"nats://natron:hub-secret@127.0.0.1:{ports['hub']}")
        overflow = await nats.connect(f"nats://edge1-overflow:overflow-secret@127.0.0.1:{ports['hub']}")
        try:
            # The edge's own mesh, on its own JetStream (domain edge1), through the plain API.
            edge_js = edge.jetstream()
            await edge_js.add_stream(
                StreamConfig(
                    name=subjects.stream,
                    subjects=[subjects.infer_all],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.MEMORY,
                )
            )
            consumer = subjects.consumer("tiny", "1")
            await edge_js.add_consumer(
                subjects.stream,
                ConsumerConfig(
                    durable_name=consumer,
                    filter_subject=subjects.infer("tiny", "1"),
                    ack_policy=AckPolicy.EXPLICIT,
                ),
            )
            workers_kv = await edge_js.create_key_value(bucket=subjects.workers_bucket)
            assert json.loads((await edge.request("$JS.API.INFO", b"", timeout=5)).data)["domain"] == "edge1"

            # The central fleet keeps its own queue of the same name, which edge requests never reach.
            central_js = central.jetstream()
            await central_js.add_stream(
                StreamConfig(
                    name=subjects.stream,
                    subjects=[subjects.infer_all],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.MEMORY,
                )
            )
            assert json.loads((await central.request("$JS.API.INFO", b"", timeout=5)).data)["domain"] == "hub"

            # An unchanged client in the hub's EDGE1 account talks to the edge's JetStream.
            info = json.loads((await overflow.request("$JS.API.INFO", b"", timeout=5)).data)
            assert info["domain"] == "edge1"

            # The edge's gateway waits on its inbox; a request enters the edge's queue.
            answers: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_answer(msg: Any) -> None:
                await answers.put(msg.data)

            await edge.subscribe(subjects.inbox("gw") + ".>", cb=on_answer)
            await edge.flush()
            reply_to = subjects.inbox("gw") + ".1"
            ack = await edge_js.publish(
                subjects.infer("tiny", "1"), b"request", headers={"Natron-Reply-To": reply_to}
            )
            assert ack.domain == "edge1"
            assert (await central_js.stream_info(subjects.stream)).state.messages == 0

            # The central worker pulls it as the capacity puller does, answers, then acks.
            inbox = overflow.new_inbox()
            delivered: asyncio.Queue[Any] = asyncio.Queue()

            async def on_message(msg: Any) -> None:
                await delivered.put(msg)

            await overflow.subscribe(inbox, cb=on_message)
            await overflow.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{subjects.stream}.{consumer}",
                json.dumps({"batch": 1, "expires": 5_000_000_000}).encode(),
                reply=inbox,
            )
            message = await asyncio.wait_for(delivered.get(), 10)
            assert message.data == b"request"
            await overflow.publish(message.headers["Natron-Reply-To"], b"answer")
            await overflow.publish(message.reply, b"+ACK")
            await overflow.flush()
            assert await asyncio.wait_for(answers.get(), 10) == b"answer"

            # It registers in the edge's worker bucket like any worker of that box.
            overflow_kv = await overflow.jetstream().key_value(subjects.workers_bucket)
            await overflow_kv.put("central-gpu-0", b"heartbeat")
            assert (await workers_kv.get("central-gpu-0")).value == b"heartbeat"

            async def settled() -> bool:
                state = await edge_js.consumer_info(subjects.stream, consumer)
                return state.num_pending == 0 and state.num_ack_pending == 0

            await wait_until_async(settled, 5, "the edge's consumer acknowledged and empty")
        finally:
            for client in (edge, central, overflow):
                await client.close()
