"""deploy/: static checks of the image, Compose stack, Kubernetes manifests, dashboard and alerts.

No Docker engine or cluster is needed. What can be checked here is: every file parses; every
metric and label in the dashboard and the alert rules exists in METRIC_DEFS; every
``CLIPGUARD_*`` variable is a WorkerSettings field and every configured value validates;
command lines parse with the real CLI; the image's health check works against the real
metrics server; promtool checks and unit-tests the rules; kustomize builds the manifests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from clipguard.consumer.config import SettingsError, WorkerSettings
from clipguard.consumer.health import HealthState, MetricsServer
from clipguard.consumer.metrics import METRIC_DEFS, PREFIX

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "clipguard.json"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DEPLOY_README = DEPLOY / "README.md"

#: Labels Prometheus attaches to every scraped series (compose and Kubernetes discovery).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
#: Series Prometheus itself writes for every target; the only non-clipguard name allowed.
SYNTHETIC_SERIES = {"up": ()}
PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta",
    "deriv", "floor", "group", "histogram_quantile", "idelta", "increase", "irate",
    "label_join", "label_replace", "last_over_time", "max", "max_over_time", "min",
    "min_over_time", "predict_linear", "quantile", "quantile_over_time", "rate", "resets",
    "round", "scalar", "sort", "sort_desc", "stddev", "stddev_over_time", "stdvar", "sum",
    "sum_over_time", "time", "timestamp", "topk", "vector",
}  # fmt: skip
PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip
REQUIRED_ALERTS = {
    "ClipguardWorkerDown",
    "ClipguardNoReadyWorkers",
    "ClipguardWorkerNotReady",
    "ClipguardConsumerLagHigh",
    "ClipguardDeadLetterRateHigh",
    "ClipguardCommitFailures",
    "ClipguardEndToEndLatencyHigh",
    "ClipguardAiScoreDrift",
    "ClipguardNoVerdicts",
    "ClipguardBackpressureStuck",
}
ENV_NAME = re.compile(r"\bCLIPGUARD_[A-Z0-9_]+\b")


# -- helpers ---------------------------------------------------------------------------------


def exported_series() -> dict[str, set[str]]:
    """Every series name the worker exports -> the labels it may carry."""
    series: dict[str, set[str]] = {}
    for name, (kind, labels) in METRIC_DEFS.items():
        full = PREFIX + name
        if kind == "counter":
            series[full + "_total"] = set(labels)
        elif kind == "histogram":
            series[full + "_bucket"] = {*labels, "le"}
            series[full + "_sum"] = set(labels)
            series[full + "_count"] = set(labels)
        else:
            series[full] = set(labels)
    for name, labels in SYNTHETIC_SERIES.items():
        series[name] = set(labels)
    return series


def promql_problems(expr: str) -> list[str]:
    """Unknown metrics, labels and functions in one PromQL expression."""
    series = exported_series()
    problems: list[str] = []
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    used: set[str] = set()
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}", text):
        name, body = match.group(1), match.group(2)
        if not name or name in PROMQL_KEYWORDS:
            problems.append(f"selector without a metric name: {match.group(0)!r}")
            continue
        for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body):
            if name in series and label not in series[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    grouping: set[str] = set()
    clause = r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for match in re.finditer(clause, text):
        grouping |= {part.strip() for part in match.group(2).split(",") if part.strip()}
    text = re.sub(clause, " ", text)
    text = re.sub(r"(?<![A-Za-z0-9_:])\d[\w.]*", " ", text)
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if word in PROMQL_KEYWORDS:  # `and (...)`, `unless on (...) (...)`
            continue
        if text[match.end() :].lstrip().startswith("("):
            if word not in PROMQL_FUNCTIONS:
                problems.append(f"unknown function {word!r}")
        else:
            used.add(word)
            if word not in series:
                problems.append(f"unknown metric {word!r}")
    allowed = TARGET_LABELS.union(*(series.get(name, set()) for name in used))
    problems += [f"grouping by unknown label {label!r}" for label in grouping - allowed]
    if not used:
        problems.append("no metric referenced")
    return problems


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in walk_panels(dashboard()["panels"]) for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects(folder: Path = K8S / "base") -> dict[str, dict[str, Any]]:
    """kind -> object, from the files the base kustomization lists."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml_docs(folder / resource):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [
        line
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def parse_cli(argv: list[str]) -> Any:
    from clipguard.cli.main import build_parser  # imports the whole CLI: only where needed

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports the bad flag on stderr
        pytest.fail(f"clipguard {' '.join(argv)} does not parse (exit {exc.code})")


def worker_settings_env_names() -> set[str]:
    return {"CLIPGUARD_" + name.upper() for name in WorkerSettings.model_fields}


def validate_env(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build WorkerSettings from exactly these variables; the checkpoint is replaced by one
    that exists here (the container path only has to be under the mounted folder)."""
    for key in list(os.environ):
        if key.startswith("CLIPGUARD_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        settings = WorkerSettings.load(checkpoint=tmp_path)
    except SettingsError as exc:
        pytest.fail(f"settings do not validate: {exc}")
    for key in env:
        field = key.removeprefix("CLIPGUARD_").lower()
        if field != "checkpoint":
            assert getattr(settings, field) is not None, key


# -- every file parses -------------------------------------------------------------------------


def test_every_yaml_and_json_file_in_deploy_parses() -> None:
    yamls = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(yamls) >= 12, yamls
    for path in yamls:
        assert yaml_docs(path), f"{path} is empty"
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


# -- metrics in the dashboard and the alerts --------------------------------------------------


def test_promql_checker_catches_typos() -> None:
    assert promql_problems("sum(rate(clipguard_events_consumed_total[5m]))") == []
    assert promql_problems("rate(clipguard_events_consumed[5m])")  # counter without _total
    assert promql_problems("clipguard_ready_total")
    assert promql_problems("histogram_quantile(0.9, rate(clipguard_decode_seconds[5m]))")
    assert promql_problems('clipguard_verdicts_total{decison="block"}')
    assert promql_problems("sum by (reason) (clipguard_verdicts_total)")
    assert promql_problems("sum(rated(clipguard_verdicts_total[5m]))")
    assert promql_problems('{__name__="clipguard_ready"}')


def test_dashboard_queries_use_only_exported_metrics_and_labels() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    problems = {expr: promql_problems(expr) for expr in exprs}
    assert not {e: p for e, p in problems.items() if p}
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query["query"]
        match = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)", str(query))
        if variable["type"] == "query":
            assert match, query
            metric, label = match.group(1), match.group(3)
            assert label in exported_series()[metric] | TARGET_LABELS, query


def test_dashboard_shows_what_an_operator_needs() -> None:
    text = "\n".join(dashboard_exprs())
    for needed in (
        "rate(clipguard_events_consumed_total",
        "sum by (decision, label) (rate(clipguard_verdicts_total",
        "sum by (stage, reason) (rate(clipguard_dead_letters_total",
        "clipguard_batch_size_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(clipguard_inference_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(clipguard_decode_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(clipguard_end_to_end_seconds_bucket",
        "max by (partition) (clipguard_consumer_lag",
        "clipguard_inflight_events",
        "clipguard_paused_partitions",
        "clipguard_ready",
        "clipguard_model_info",
        "clipguard_ai_score_bucket",
    ):
        assert needed in text, needed


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "clipguard" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(walk_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for row in range(grid["y"], grid["y"] + grid["h"]):
            for column in range(grid["x"], grid["x"] + grid["w"]):
                assert (row, column) not in cells, f"{panel['title']} overlaps panel {cells}"
                cells[(row, column)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    types = {p["type"] for p in panels}
    assert {"timeseries", "stat", "heatmap", "table"} <= types


def test_alert_rules_use_only_exported_metrics_and_are_documented() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)
    readme = DEPLOY_README.read_text()
    for rule in rules:
        assert promql_problems(rule["expr"]) == [], rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook"] == f"deploy/README.md#{rule['alert'].lower()}"
        assert re.search(rf"^### {rule['alert']}$", readme, re.M), f"no runbook for {rule}"


def test_alert_unit_tests_fire_and_stay_quiet_on_real_metric_names() -> None:
    spec = yaml.safe_load(ALERTS_TEST.read_text())
    assert spec["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    series = exported_series()
    for case in spec["tests"]:
        for item in case["input_series"]:
            name = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", item["series"]).group(0)
            assert name in series, item["series"]
            assert promql_problems(item["series"]) == [], item["series"]
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    both = firing & quiet
    assert len(both) >= 3, both
    assert firing <= {rule["alert"] for rule in alert_rules()}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'); .ci/run installs it")
    return path


def run_promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules_and_the_prometheus_config() -> None:
    run_promtool("check", "rules", "alerts.yml")
    run_promtool("check", "config", "prometheus.yml")


def test_promtool_unit_tests_pass() -> None:
    run_promtool("test", "rules", "alerts_test.yml")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's variables filled in)."""
    promtool()
    substitutions = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    rules = []
    for number, expr in enumerate(dashboard_exprs()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path), cwd=tmp_path)


# -- settings: every CLIPGUARD_* variable is a real setting with a valid value ---------------------


def deploy_text_files() -> Iterator[Path]:
    suffixes = {"", ".yaml", ".yml", ".md", ".json", ".txt", ".dockerignore", ".Dockerfile"}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and (path.suffix in suffixes or path.name == "Dockerfile"):
            yield path


def readme_deploying_section() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Deploying\n" in text, "README.md has no '## Deploying' section"
    return text.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]


def test_every_clipguard_variable_anywhere_in_deploy_is_a_worker_setting() -> None:
    known = worker_settings_env_names()
    seen: dict[str, set[str]] = {}
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in deploy_text_files()}
    sources["README.md#deploying"] = readme_deploying_section()
    for source, text in sources.items():
        for name in ENV_NAME.findall(text):
            seen.setdefault(name, set()).add(source)
    unknown = {name: where for name, where in seen.items() if name not in known}
    assert not unknown, f"not WorkerSettings fields (typo?): {unknown}"
    assert len(seen) >= 15


def test_the_env_checker_catches_a_typo(tmp_path: Path, monkeypatch) -> None:
    assert "CLIPGUARD_MAX_BATCH_SIZE" in worker_settings_env_names()
    assert "CLIPGUARD_MAX_BATCHSIZE" not in worker_settings_env_names()
    with pytest.raises(pytest.fail.Exception, match="max_batch_size"):
        validate_env({"CLIPGUARD_BOOTSTRAP_SERVERS": "k:1", "CLIPGUARD_MAX_BATCH_SIZE": "0"},
                     tmp_path, monkeypatch)  # fmt: skip


def k8s_configmap_data(overlay: str | None = None) -> dict[str, str]:
    data = dict(k8s_objects()["ConfigMap"]["data"])
    if overlay:
        data.update(yaml.safe_load((K8S / overlay / "configmap-gpu.yaml").read_text())["data"])
    return data


@pytest.mark.parametrize("where", ["dockerfile", "compose", "k8s", "k8s-gpu"])
def test_configured_values_validate_as_worker_settings(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("CLIPGUARD_")}
    env = {
        "dockerfile": {**image_env, "CLIPGUARD_BOOTSTRAP_SERVERS": "kafka:9092"},
        "compose": {**image_env, **environment(compose()["services"]["clipguard"])},
        "k8s": {**image_env, **k8s_configmap_data()},
        "k8s-gpu": {**image_env, **k8s_configmap_data("gpu")},
    }[where]
    assert "CLIPGUARD_CHECKPOINT" in env and "CLIPGUARD_BOOTSTRAP_SERVERS" in env
    validate_env(env, tmp_path, monkeypatch)


# -- the image ---------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_multi_stage_image_running_serve() -> None:
    steps = dockerfile()
    instructions = [instruction for instruction, _ in steps]
    global_args = {}
    for instruction, args in steps[: instructions.index("FROM")]:
        if instruction == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], args.split()[0])
        for instruction, args in steps
        if instruction == "FROM"
    ]
    assert bases == ["python:3.11-slim", "python:3.11-slim"]
    args = dict(steps)
    text = "\n".join(f"{i} {a}" for i, a in steps)
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}"' in text and "pip install ." in text
    assert "COPY --from=build /opt/venv /opt/venv" in text
    user = args["USER"].split(":")[0]
    assert user not in {"root", "0"}, "the image must not run as root"
    default_port = WorkerSettings.model_fields["metrics_port"].default
    assert args["EXPOSE"] == str(default_port) == dockerfile_env()["CLIPGUARD_METRICS_PORT"]
    assert json.loads(args["ENTRYPOINT"]) == ["clipguard"]
    parse_cli(json.loads(args["CMD"]))
    assert json.loads(args["CMD"])[0] == "serve"
    health = args["HEALTHCHECK"]
    assert "/livez" in health and "urllib" in health and "curl" not in health
    # Every COPY source exists and is let through by the Dockerfile-specific ignore file.
    allowed = {
        line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }  # fmt: skip
    for instruction, copy_args in steps:
        if instruction == "COPY" and not copy_args.startswith("--from"):
            for source in copy_args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source in allowed, f"{source} is excluded from the build context"
    # `pip install .` needs every package folder pyproject.toml maps: all copied, all let in.
    try:
        import tomllib
    except ImportError:  # Python 3.10: pydantic-settings brings tomli
        import tomli as tomllib

    folders = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    )
    copied = {
        source
        for instruction, copy_args in steps
        if instruction == "COPY" and not copy_args.startswith("--from")
        for source in copy_args.split()[:-1]
    }
    assert folders <= copied, f"not copied into the image: {sorted(folders - copied)}"


def healthcheck_command() -> list[str]:
    health = dict(dockerfile())["HEALTHCHECK"]
    return json.loads(health[health.index("CMD") + 3 :].strip())


def test_dockerfile_healthcheck_against_the_real_metrics_server() -> None:
    """The HEALTHCHECK command exits 0 while /livez is live and non-zero once it is stale."""
    now = [0.0]
    health = HealthState(stale_after_s=5.0, clock=lambda: now[0])
    server = MetricsServer(CollectorRegistry(), health, "127.0.0.1", 0).start()
    try:
        command = healthcheck_command()
        assert command[0] == "python"
        env = {**os.environ, "CLIPGUARD_METRICS_PORT": str(server.port)}
        run = [sys.executable, *command[1:]]
        assert subprocess.run(run, env=env, capture_output=True, timeout=20).returncode == 0
        now[0] = 60.0  # no heartbeat for a minute: the loop is stuck
        assert subprocess.run(run, env=env, capture_output=True, timeout=20).returncode != 0
    finally:
        server.stop()


# -- the Compose stack -------------------------------------------------------------------------


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_compose_stack_is_consistent() -> None:
    spec = compose()
    services = spec["services"]
    assert {"kafka", "topics", "clipguard", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in environment(services["kafka"])["KAFKA_PROCESS_ROLES"]
    worker = services["clipguard"]
    env = environment(worker)
    assert worker["deploy"]["replicas"] == 2
    assert worker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (COMPOSE.parent / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert "./models:/models:ro" in worker["volumes"]
    assert env["CLIPGUARD_CHECKPOINT"].startswith("/models/")
    assert env["CLIPGUARD_BOOTSTRAP_SERVERS"] == "kafka:9092"
    drain = float(env.get("CLIPGUARD_DRAIN_TIMEOUT_S", 30))
    assert seconds(worker["stop_grace_period"]) > drain
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    parse_cli(worker["command"])
    produce = services["produce"]
    assert produce["entrypoint"][0] == "clipguard"
    parse_cli(produce["entrypoint"][1:] + produce["command"])

    # The topic job creates exactly the topics the workers use; enough input partitions.
    script = "\n".join(services["topics"]["command"])
    created = dict(re.findall(r"--topic (\S+) --partitions (\d+)", script))
    wanted = [env[f"CLIPGUARD_{key}_TOPIC"] for key in ("INPUT", "OUTPUT", "DLQ")]
    assert sorted(created) == sorted(wanted)
    assert int(created[env["CLIPGUARD_INPUT_TOPIC"]]) >= worker["deploy"]["replicas"]

    # Prometheus scrapes the workers on their metrics port and loads the rules.
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["alerts.yml"]
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "clipguard")
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["clipguard"] and str(sd["port"]) == env["CLIPGUARD_METRICS_PORT"]
    assert 'up{job="clipguard"}' in ALERTS.read_text()

    # Grafana: provisioning and dashboards come from folders that exist, at the paths the
    # provisioning files name.
    grafana = services["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if "./" in v)
    for source in mounts:
        assert (COMPOSE.parent / source).is_dir(), source
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/clipguard.yaml").read_text()
    )["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"


# -- Kubernetes --------------------------------------------------------------------------------


def compose_input_partitions() -> int:
    script = "\n".join(compose()["services"]["topics"]["command"])
    return int(re.search(r"--topic uploads --partitions (\d+)", script).group(1))


def test_k8s_deployment_probes_security_and_shutdown() -> None:
    objects = k8s_objects()
    config = objects["ConfigMap"]["data"]
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    parse_cli(container["args"])
    port = container["ports"][0]
    assert port["name"] == "metrics"
    assert str(port["containerPort"]) == config["CLIPGUARD_METRICS_PORT"]

    probes = {kind: container[kind]["httpGet"] for kind in
              ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip
    # Any other path answers 200 with the metrics page: a typo would make the probe useless.
    assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert all(p["port"] in ("metrics", port["containerPort"]) for p in probes.values())
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load time"

    drain = float(config.get("CLIPGUARD_DRAIN_TIMEOUT_S", 30))
    assert pod["terminationGracePeriodSeconds"] > drain
    assert "lifecycle" not in container, "SIGTERM drains: no preStop hook"
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxSurge"] == 0

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "writable /tmp"
    checkpoint_mount = mounts["/models"]
    assert checkpoint_mount["readOnly"] is True
    assert config["CLIPGUARD_CHECKPOINT"].startswith("/models/")
    (init,) = pod["initContainers"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/models"}
    assert "memory" in container["resources"]["limits"]
    assert container["resources"]["requests"]["cpu"] == config["CLIPGUARD_DECODE_WORKERS"]

    env_from = {ref["configMapRef"]["name"] for ref in container["envFrom"]}
    assert env_from == {objects["ConfigMap"]["metadata"]["name"]}
    env_names = {item["name"] for item in container["env"]}
    assert env_names <= worker_settings_env_names()
    for item in container["env"]:
        secret = item.get("valueFrom", {}).get("secretKeyRef")
        if secret:
            assert secret["optional"] is True, "clusters without SASL need no Secret"

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_service_pdb_podmonitor_and_keda_match_the_deployment() -> None:
    objects = k8s_objects()
    config = objects["ConfigMap"]["data"]
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1

    (monitor,) = yaml_docs(K8S / "base" / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[monitor["spec"]["jobLabel"]] == "clipguard", "alerts use up{job='clipguard'}"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"

    scaled = objects["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= compose_input_partitions()
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert int(metadata["lagThreshold"]) > 0
    assert metadata["allowIdleConsumers"] == "false"
    assert metadata["offsetResetPolicy"] == WorkerSettings.model_fields["auto_offset_reset"].default

    # The Kafka coordinates come from the ConfigMap through kustomize replacements.
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    copied = {
        r["source"]["fieldPath"].removeprefix("data."): r["targets"][0]["fieldPaths"][0]
        for r in kustomization["replacements"]
    }
    assert copied == {
        "CLIPGUARD_BOOTSTRAP_SERVERS": "spec.triggers.0.metadata.bootstrapServers",
        "CLIPGUARD_GROUP_ID": "spec.triggers.0.metadata.consumerGroup",
        "CLIPGUARD_INPUT_TOPIC": "spec.triggers.0.metadata.topic",
    }
    assert set(copied) <= set(config)

    (secret,) = yaml_docs(K8S / "base" / "secret.example.yaml")
    keys = {item["valueFrom"]["secretKeyRef"]["key"]
            for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            if "secretKeyRef" in item.get("valueFrom", {})}  # fmt: skip
    assert keys <= set(secret["stringData"])


def kustomize(folder: Path) -> dict[str, dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: kustomize builds not checked")
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout) if doc}


def test_kustomize_builds_cpu_and_gpu_variants() -> None:
    cpu = kustomize(K8S)
    assert set(cpu) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject"}
    config = cpu["ConfigMap"]["data"]
    metadata = cpu["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    assert metadata["bootstrapServers"] == config["CLIPGUARD_BOOTSTRAP_SERVERS"]
    assert metadata["consumerGroup"] == config["CLIPGUARD_GROUP_ID"]
    assert metadata["topic"] == config["CLIPGUARD_INPUT_TOPIC"]

    gpu = kustomize(K8S / "gpu")
    (container,) = gpu["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    assert gpu["ConfigMap"]["data"]["CLIPGUARD_DEVICE"] == "cuda"
    assert gpu["ConfigMap"]["data"] == k8s_configmap_data("gpu")
    gpu_metadata = gpu["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    assert gpu_metadata["bootstrapServers"] == config["CLIPGUARD_BOOTSTRAP_SERVERS"]
