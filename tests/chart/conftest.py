"""Render the breakglass chart once per session, offline, with helm-python-sdk (no helm binary)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "breakglass"
PRODUCTION_VALUES = CHART_DIR / "values-production.yaml"
NAMESPACE = "claude-breakglass"
# Stands in for the digest an operator fills into the production example (its placeholder of
# zeros makes the render fail on purpose: test_production_placeholder_digest_is_refused).
TEST_DIGEST = "sha256:" + "4f61d2f4" * 8
RELEASE = "breakglass"

helm = pytest.importorskip(
    "helm_python", reason="the chart extra (helm-python-sdk) is not installed"
)


@dataclass(frozen=True)
class Rendered:
    """One render of the chart: the text per template and the parsed Kubernetes objects."""

    values: dict[str, Any]
    files: dict[str, str]
    objects: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        """The single object of this kind (fails the test if there are none or several)."""
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[dict[str, Any]]:
        """Every object of this kind."""
        return [o for o in self.objects if o["kind"] == kind]

    @property
    def notes(self) -> str:
        """The rendered NOTES.txt."""
        return next(text for path, text in self.files.items() if path.endswith("NOTES.txt"))

    def manifests_text(self) -> str:
        """All manifests as one multi-document YAML stream (NOTES.txt excluded)."""
        return "\n---\n".join(
            text for path, text in sorted(self.files.items()) if not path.endswith("NOTES.txt")
        )


def render(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> Rendered:
    """Render the chart with ``values`` over its defaults, as ``helm template`` would."""
    with helm.Chart.load(CHART_DIR) as chart:
        files = chart.render(values or {}, name=RELEASE, namespace=namespace)
        merged = chart.merge_values(values or {})
    objects = [
        doc
        for path, text in files.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return Rendered(values=merged, files=files, objects=objects)


def production_values(*, digest: str | None = TEST_DIGEST) -> dict[str, Any]:
    """The production values example, as an operator would pass it with ``-f`` once filled in
    (``digest=None``: exactly as shipped, with its placeholder digest)."""
    values = yaml.safe_load(PRODUCTION_VALUES.read_text())
    if digest is not None:
        values["image"]["digest"] = digest
    return values


@pytest.fixture(scope="session")
def default_render() -> Rendered:
    """The chart with its default values."""
    return render()


@pytest.fixture(scope="session")
def production_render() -> Rendered:
    """The chart with the production values example."""
    return render(production_values())


@pytest.fixture(scope="session", params=["default", "production"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """Each of the two renders in turn: every hardening property must hold for both."""
    return request.getfixturevalue(f"{request.param}_render")


@pytest.fixture(scope="session")
def manifest_dir(
    tmp_path_factory: pytest.TempPathFactory, default_render: Rendered, production_render: Rendered
) -> Iterator[dict[str, Path]]:
    """Both renders written out as one YAML file each, for the command-line validators."""
    root = tmp_path_factory.mktemp("manifests")
    paths = {}
    for name, rendered_chart in (("default", default_render), ("production", production_render)):
        directory = root / name
        directory.mkdir()
        path = directory / "breakglass.yaml"
        path.write_text(rendered_chart.manifests_text())
        paths[name] = path
    yield paths
