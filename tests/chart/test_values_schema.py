"""values.schema.json refuses what would undo the hardening: a target that is not an IP literal,
an empty-key toleration, a pull policy that needs the registry, an http public URL."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.chart.conftest import CHART_DIR, helm, production_values

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())

REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("devvm by host name", {"targets": {"devvm": {"host": "devvm.home.arpa"}}}),
    ("pve by short name", {"targets": {"pve": {"host": "pve"}}}),
    ("hex-looking host name", {"targets": {"pve": {"host": "cafe"}}}),
    ("out-of-range IPv4", {"targets": {"devvm": {"host": "10.0.0.256"}}}),
    ("address with a port", {"targets": {"devvm": {"host": "10.0.0.5:22"}}}),
    ("empty target", {"targets": {"devvm": {"host": ""}}}),
    (
        "empty-key Exists toleration",
        {"tolerations": [{"key": "", "operator": "Exists", "effect": "NoExecute"}]},
    ),
    (
        "not-ready tolerated forever",
        {
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
            ]
        },
    ),
    ("pull policy Always", {"image": {"pullPolicy": "Always"}}),
    ("plain-http public URL", {"server": {"publicUrl": "http://breakglass.example.org"}}),
    (
        "a Vault token in extraEnv",
        {"server": {"extraEnv": [{"name": "VAULT_TOKEN", "value": "x"}]}},
    ),
    ("a token living an hour+", {"serviceAccount": {"vaultTokenExpirationSeconds": 86400}}),
    ("an unknown key (typo)", {"targets": {"devvm": {"hots": "10.0.0.5"}}}),
]

ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("IPv4 targets", {"targets": {"devvm": {"host": "10.0.0.102"}, "pve": {"host": "10.0.0.2"}}}),
    ("IPv6 targets", {"targets": {"devvm": {"host": "fd00::102"}, "pve": {"host": "2001:db8::2"}}}),
]


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.merge_values(overrides)


@pytest.mark.parametrize(("why", "overrides"), REFUSED, ids=[r[0] for r in REFUSED])
def test_jsonschema_refuses(why: str, overrides: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    assert list(validator.iter_errors(merged(overrides))), f"{why} was accepted"


@pytest.mark.parametrize(("why", "overrides"), REFUSED, ids=[r[0] for r in REFUSED])
def test_helm_refuses_to_render(why: str, overrides: dict[str, Any]) -> None:
    with helm.Chart.load(CHART_DIR) as chart, pytest.raises(helm.HelmValuesError):
        chart.render(overrides, name="breakglass", namespace="claude-breakglass")


def test_a_host_name_target_is_refused_with_the_path_named() -> None:
    with helm.Chart.load(CHART_DIR) as chart, pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(chart.merge_values({"targets": {"devvm": {"host": "devvm.lan"}}}))
    assert "/targets/devvm/host" in str(caught.value)


@pytest.mark.parametrize(("why", "overrides"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_ip_literals_are_accepted(why: str, overrides: dict[str, Any]) -> None:
    jsonschema.validate(
        merged(overrides), SCHEMA, format_checker=jsonschema.FormatChecker()
    )  # raises if refused
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(chart.merge_values(overrides))


def test_defaults_and_production_example_are_valid() -> None:
    checker = jsonschema.FormatChecker()
    jsonschema.validate(merged({}), SCHEMA, format_checker=checker)
    jsonschema.validate(merged(production_values()), SCHEMA, format_checker=checker)


def comment_above(lines: list[str], number: int) -> bool:
    """True if the line right above this key is a comment at the same indent."""
    if number == 0:
        return False
    prev = lines[number - 1]
    indent = len(lines[number]) - len(lines[number].lstrip())
    return prev.strip().startswith("#") and len(prev) - len(prev.lstrip()) == indent


def test_every_value_is_documented_in_values_yaml() -> None:
    """'Documented line by line': every key down to the second level has its own comment right
    above it; deeper keys (selectors, per-volume settings) are covered by their parent's."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= 2 and not comment_above(lines, number):
            undocumented.append(f"line {number + 1}: {stripped}")
    assert not undocumented, "values.yaml keys without a comment:\n" + "\n".join(undocumented)
