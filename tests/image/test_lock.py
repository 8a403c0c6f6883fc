"""The image's hash-locked dependency sets agree with pyproject.toml (offline: nothing is fetched).

requirements/image.txt and requirements/build.txt are made by scripts/lock.sh with pip-compile;
the image build installs them with --require-hashes, which also refuses any dependency the lock
lacks (tests/image/test_image.py proves that by building). This test catches the drift a build
would only show later: a dependency added to or dropped from pyproject.toml, a pin outside its
range, a requirement without a hash.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE_LOCK = REPO / "requirements" / "image.txt"
BUILD_LOCK = REPO / "requirements" / "build.txt"
BUILD_IN = REPO / "requirements" / "build.in"
RELOCK = "run `bash scripts/lock.sh` and commit requirements/"


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    hashes: tuple[str, ...]
    via: tuple[str, ...]


def parse_lock(path: Path) -> dict[str, Pin]:
    """pip-compile's output: ``name==version \\`` then ``--hash=sha256:…`` lines, then ``# via``."""
    pins: dict[str, Pin] = {}
    text = path.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", "\n" + text.split("\n", 1)[1] if text else "")
    for block in blocks:
        head = block.strip().split("\n", 1)[0]
        if not head or head.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s\\;]+)\s*\\?", head.strip())
        assert match, f"{path.name}: not an exact pin: {head!r} ({RELOCK})"
        name = canonicalize_name(match.group(1))
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        via: tuple[str, ...] = ()
        if "# via" in block:
            after = block.split("# via", 1)[1]
            via = tuple(
                entry for line in after.splitlines() if (entry := line.strip().lstrip("#").strip())
            )
        pins[name] = Pin(name, Version(match.group(2)), hashes, via)
    return pins


@pytest.fixture(scope="module")
def image_pins() -> dict[str, Pin]:
    return parse_lock(IMAGE_LOCK)


def test_every_pin_is_exact_and_hashed(image_pins: dict[str, Pin]) -> None:
    for path, pins in ((IMAGE_LOCK, image_pins), (BUILD_LOCK, parse_lock(BUILD_LOCK))):
        assert pins, f"{path.name} pins nothing"
        unhashed = [pin.name for pin in pins.values() if not pin.hashes]
        assert unhashed == [], f"{path.name}: no hash for {unhashed} ({RELOCK})"


def test_the_lock_names_no_index_or_local_source() -> None:
    """Resolved from PyPI itself: no index URL, find-links or local path baked into the build."""
    for path in (IMAGE_LOCK, BUILD_LOCK):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("-i", "--index", "--extra-index", "-f", "--find")), line
            assert not stripped.startswith(("-e", "file:", "/", ".")), line


def test_every_runtime_dependency_of_pyproject_is_pinned_within_its_range(
    image_pins: dict[str, Pin],
) -> None:
    for spec in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in image_pins, f"{name} is in pyproject.toml but not in the lock ({RELOCK})"
        pinned = image_pins[name].version
        assert requirement.specifier.contains(pinned, prereleases=True), (
            f"{name}=={pinned} is outside pyproject.toml's {requirement.specifier} ({RELOCK})"
        )


def test_the_lock_has_no_direct_dependency_pyproject_lost(image_pins: dict[str, Pin]) -> None:
    """pip-compile marks the direct dependencies "via breakglass-tui (pyproject.toml)"."""
    direct = {
        pin.name for pin in image_pins.values() if any("pyproject.toml" in v for v in pin.via)
    }
    declared = {
        canonicalize_name(Requirement(s).name) for s in PYPROJECT["project"]["dependencies"]
    }
    assert direct == declared, f"lock and pyproject.toml disagree on {direct ^ declared} ({RELOCK})"
    project = canonicalize_name(PYPROJECT["project"]["name"])
    assert project not in image_pins, "the project itself is built from source, not locked"


def test_the_build_lock_satisfies_the_build_system() -> None:
    build_pins = parse_lock(BUILD_LOCK)
    declared = [line.strip() for line in BUILD_IN.read_text().splitlines()]
    for spec in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(spec)
        assert spec in declared, f"requirements/build.in lacks {spec} ({RELOCK})"
        pin = build_pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pin.version, prereleases=True)


def test_the_lock_was_resolved_for_the_images_python() -> None:
    """Debian bookworm's python3 is 3.11: the lock must be resolved for that interpreter."""
    containerfile = (REPO / "Containerfile").read_text()
    assert "debian:bookworm-slim@sha256:" in containerfile
    for path in (IMAGE_LOCK, BUILD_LOCK):
        assert "autogenerated by pip-compile with Python 3.11" in path.read_text(), path.name
