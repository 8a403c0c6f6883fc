"""The self-check's monitoring objects: off by default, rendered when asked; the ServiceMonitor
and PrometheusRule checked for the structure their CRDs define (the offline schema validation does
not know custom resources) and for metric names the server really exports; the rules checked and
unit-tested by the real ``promtool`` (Debian's prometheus package)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from breakglass_tui.serve.metrics import Metrics
from tests.chart.conftest import CHART_DIR, NAMESPACE, Rendered, helm, render

VENV_BIN = Path(sys.executable).parent
ON = {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}

DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    "(([0-9]+)ms)?)$",
}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
META = {
    "type": "object",
    "required": ["name", "namespace", "labels"],
    "properties": {"name": {"type": "string"}, "namespace": {"const": NAMESPACE}, "labels": LABELS},
}
# The parts of the prometheus-operator CRDs (monitoring.coreos.com/v1) these objects use, with the
# CRDs' own field names, types and patterns; anything else is refused, as a typo would be ignored
# by the operator.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": LABELS},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": DURATION,
                                        "labels": LABELS,
                                        "annotations": LABELS,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


@pytest.fixture(scope="module")
def monitored() -> Rendered:
    return render(ON)


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is missing: apt-get install prometheus (scripts/setup.sh test)")
    return found


def test_off_by_default(default_render: Rendered, production_render: Rendered) -> None:
    for rendered in (default_render, production_render):
        assert rendered.all("ServiceMonitor") == [] and rendered.all("PrometheusRule") == []


def test_the_objects_have_their_crds_structure(monitored: Rendered) -> None:
    monitor, rule = monitored.one("ServiceMonitor"), monitored.one("PrometheusRule")
    jsonschema.validate(monitor, SERVICE_MONITOR)
    jsonschema.validate(rule, PROMETHEUS_RULE)
    # The monitor finds the Service, on its plain health port.
    service = monitored.one("Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert selector.items() <= service["spec"]["selector"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert endpoint["port"] == "health" and endpoint["path"] == "/metrics"
    assert ports["health"]["port"] == monitored.values["server"]["healthPort"]
    assert endpoint["scheme"] == "http"  # the health port is plain HTTP; the console's is TLS


def test_selector_labels_reach_the_objects() -> None:
    rendered = render(
        {
            "monitoring": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                "prometheusRule": {
                    "enabled": True,
                    "labels": {"release": "kps"},
                    "extraAlertLabels": {"team": "owner"},
                    "brokenFor": "45m",
                },
            }
        }
    )
    assert rendered.one("ServiceMonitor")["metadata"]["labels"]["release"] == "kps"
    rule = rendered.one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert all(r["labels"]["team"] == "owner" for r in alerts.values())
    assert alerts["BreakglassRescuePathBroken"]["for"] == "45m"


def test_the_rules_use_metrics_the_server_exports(monitored: Rendered) -> None:
    metrics = Metrics(lambda: 1)
    metrics.update_links(
        {
            "checked_at": 1.0,
            "links": [{"link": "pve", "status": "ok", "latency_s": 0.1, "last_success": 1.0}],
        }
    )
    exported = set(re.findall(r"^# TYPE (\S+) ", metrics.render().decode(), flags=re.M))
    rule = monitored.one("PrometheusRule")
    used = {
        name
        for r in rule["spec"]["groups"][0]["rules"]
        for name in re.findall(r"\b(breakglass_[a-z_]+)", r["expr"])
    }
    assert used == {"breakglass_link_up", "breakglass_selfcheck_last_run_timestamp_seconds"}
    assert used <= exported, exported


def rules_file(rendered: Rendered, tmp_path: Path) -> Path:
    path = tmp_path / "breakglass-rules.yml"
    path.write_text(yaml.safe_dump({"groups": rendered.one("PrometheusRule")["spec"]["groups"]}))
    return path


def test_promtool_checks_the_rules(monitored: Rendered, tmp_path: Path) -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules_file(monitored, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def alert(rule: dict[str, Any], name: str, link: str, severity: str) -> dict[str, Any]:
    """An expected alert: its labels, and its annotations with the link filled in."""
    labels = {"alertname": name, "severity": severity, "link": link}
    labels.update(namespace=NAMESPACE, job="breakglass")
    [spec] = [r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == name]
    annotations = {
        key: value.replace("{{ $labels.link }}", link) for key, value in spec["annotations"].items()
    }
    return {"exp_labels": labels, "exp_annotations": annotations}


def no_alert(at: str, name: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": []}


def silent_annotations(rule: dict[str, Any]) -> dict[str, str]:
    [spec] = [r for r in rule["spec"]["groups"][0]["rules"] if r["alert"].endswith("Silent")]
    return spec["annotations"]


def test_promtool_unit_tests_the_alerts(monitored: Rendered, tmp_path: Path) -> None:
    """A PVE host broken from minute 5, the devvm from minute 20 (the scrape each minute): the
    PVE alert only after 30 min, the devvm's after 10, never the generic one for the devvm; and
    the silence alert when no result is scraped."""
    rule = monitored.one("PrometheusRule")
    up = f'breakglass_link_up{{namespace="{NAMESPACE}",job="breakglass",link="%s"}}'
    last_run = f'breakglass_selfcheck_last_run_timestamp_seconds{{namespace="{NAMESPACE}"}}'
    tests = {
        "rule_files": [rules_file(monitored, tmp_path).name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": up % "pve", "values": "1x4 0x60"},
                    {"series": up % "devvm", "values": "1x19 0x45"},
                    {"series": up % "vault", "values": "1x64"},
                    {"series": last_run, "values": "0+60x64"},
                ],
                "alert_rule_test": [
                    no_alert("30m", "BreakglassRescuePathBroken"),
                    {
                        "eval_time": "36m",
                        "alertname": "BreakglassRescuePathBroken",
                        "exp_alerts": [alert(rule, "BreakglassRescuePathBroken", "pve", "warning")],
                    },
                    no_alert("28m", "BreakglassDevvmUnreachable"),
                    {
                        "eval_time": "31m",
                        "alertname": "BreakglassDevvmUnreachable",
                        "exp_alerts": [
                            alert(rule, "BreakglassDevvmUnreachable", "devvm", "critical")
                        ],
                    },
                    {
                        "eval_time": "60m",
                        "alertname": "BreakglassRescuePathBroken",
                        "exp_alerts": [alert(rule, "BreakglassRescuePathBroken", "pve", "warning")],
                    },
                    no_alert("60m", "BreakglassSelfCheckSilent"),
                ],
            },
            {
                "interval": "1m",
                "input_series": [],
                "alert_rule_test": [
                    no_alert("20m", "BreakglassSelfCheckSilent"),
                    {
                        "eval_time": "31m",
                        "alertname": "BreakglassSelfCheckSilent",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "alertname": "BreakglassSelfCheckSilent",
                                    "severity": "warning",
                                    "namespace": NAMESPACE,
                                },
                                "exp_annotations": silent_annotations(rule),
                            }
                        ],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "breakglass-rules.test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool(), "test", "rules", test_file.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_helm_lint_strict_and_the_schemas_pass_with_monitoring_on(tmp_path: Path) -> None:
    report = helm.lint(CHART_DIR, ON, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    manifest = tmp_path / "breakglass.yaml"
    manifest.write_text(render(ON).manifests_text())
    result = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", "1.34.0", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The custom resources are the ones it cannot know (checked above instead).
    assert "kind PrometheusRule" in result.stdout + result.stderr
    assert "passed for resource deployment/breakglass" in result.stdout
