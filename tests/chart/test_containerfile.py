"""The Containerfile: what it says, and — since no base image can be pulled here (the machine
reaches PyPI, Debian and npm only, not a container registry) — the steps it runs, replayed in a
clean environment: wheels built from exactly the build context, installed with --no-index into a
fresh virtual environment, then run as the non-root user 10001 on a tree it cannot write."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart.conftest import REPO

CONTAINERFILE = (REPO / "Containerfile").read_text()
UID = 10001


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE)
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def console_scripts() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"].get("scripts", {})


def test_two_stages_on_python_311_slim() -> None:
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) == 2
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in CONTAINERFILE
    assert froms[0] == "${PYTHON_IMAGE} AS builder"
    assert froms[1] == "${PYTHON_IMAGE}"


def test_builder_makes_wheels_and_final_installs_only_them() -> None:
    runs = [args for word, args in instructions() if word == "RUN"]
    assert any("pip wheel --wheel-dir /wheels ." in r for r in runs)
    install = next(r for r in runs if "pip install" in r)
    assert "--no-index --find-links /wheels breakglass-tui" in install


def test_openssh_client_and_no_caches() -> None:
    apt = next(args for word, args in instructions() if word == "RUN" and "apt-get" in args)
    assert "openssh-client" in apt
    assert "--no-install-recommends" in apt
    assert "rm -rf /var/lib/apt/lists/*" in apt
    assert "PIP_NO_CACHE_DIR=1" in CONTAINERFILE


def test_numeric_non_root_user_and_read_only_root_friendly() -> None:
    [user] = [args for word, args in instructions() if word == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) == UID and int(gid) == UID, "numeric, so runAsNonRoot can check it"
    assert "PYTHONDONTWRITEBYTECODE=1" in CONTAINERFILE
    assert "HOME=/home/breakglass" in CONTAINERFILE


def test_entrypoint_is_breakglass_serve_and_the_chart_agrees() -> None:
    [entrypoint] = [args for word, args in instructions() if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["breakglass-serve"]
    values = (REPO / "helm" / "breakglass" / "values.yaml").read_text()
    assert f"runAsUser: {UID}" in values
    assert "port: 8080" in values and "EXPOSE 8080" in CONTAINERFILE


def build_context(destination: Path) -> None:
    """Copy what .containerignore lets into the build context (as buildah/docker would)."""
    rules = [
        line.strip()
        for line in (REPO / ".containerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO).as_posix()
        if path.is_dir() or relative.startswith((".venv/", ".git/")):
            continue
        included = False
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            hit = fnmatch.fnmatch(relative, pattern) or relative.startswith(pattern + "/")
            if pattern.startswith("**/"):
                hit = (
                    hit
                    or fnmatch.fnmatch(relative, pattern[3:])
                    or f"/{pattern[3:]}/" in (f"/{relative}/")
                )
            if hit:
                included = negate
        if included:
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


@pytest.fixture(scope="module")
def installed_image_tree() -> Iterator[Path]:
    """The Containerfile's steps outside a container: builder (pip wheel of the context), final
    (fresh venv, pip install --no-index from those wheels), the tree then owned by root and
    read-only to everyone else, like the image's root filesystem."""
    root = Path(tempfile.mkdtemp(prefix="breakglass-image-"))
    try:
        # Traversable by the app's user, writable only by root: the image's root filesystem.
        os.chmod(root, 0o755)  # noqa: S103
        context = root / "src"
        build_context(context)
        assert (context / "pyproject.toml").exists()
        assert not (context / "tests").exists(), ".containerignore must keep tests out"
        # pip's own cache is allowed here (the image forbids it): only the test gets faster.
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(root / "wheels"), "."],
            cwd=context,
            env=env,
            check=True,
            timeout=240,
        )
        venv = root / "venv"
        # A fresh venv; the test's own pip installs into it (--python), which spares ensurepip.
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
        )
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")),
                *("install", "-q", "--no-index", "--find-links", str(root / "wheels")),
                "breakglass-tui",
            ],
            env=env,
            check=True,
            timeout=240,
        )
        shutil.rmtree(context)
        shutil.rmtree(root / "wheels")
        # The image's root filesystem: nothing below it writable by the app's user.
        subprocess.run(["chmod", "-R", "go-w,a+rX", str(root)], check=True)
        yield venv
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_app_user(argv: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run argv as uid/gid 10001 with HOME and TMPDIR on a scratch dir (the pod's emptyDirs)."""
    clean_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONDONTWRITEBYTECODE": "1",
        **env,
    }
    return subprocess.run(
        ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=60,
        check=False,
    )


@pytest.fixture
def scratch_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="breakglass-home-"))
    try:
        os.chown(home, UID, UID)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_the_installed_app_imports_as_the_non_root_user(
    installed_image_tree: Path, scratch_home: Path
) -> None:
    python = str(installed_image_tree / "bin" / "python")
    # The tree is read-only to the app's user, as the image's root filesystem will be.
    denied = as_app_user(["touch", str(installed_image_tree / "probe")], scratch_home)
    assert denied.returncode != 0
    result = as_app_user(
        [python, "-c", "import breakglass_tui, breakglass_tui.config; print('ok')"], scratch_home
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.slow
def test_the_installed_verb_refuses_hostile_input_with_its_json(
    installed_image_tree: Path, scratch_home: Path
) -> None:
    verb = str(installed_image_tree / "bin" / "breakglass-verb")
    result = as_app_user(
        [verb],
        scratch_home,
        SSH_ORIGINAL_COMMAND="status; rm -rf /",
        BREAKGLASS_VERB_CONFIG=str(scratch_home / "absent.toml"),
    )
    # Bad input is refused before the config is even needed: exit 2, one JSON document.
    assert result.returncode == 2, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["refused"] == "bad_input"


@pytest.mark.slow
def test_the_entrypoint_is_installed_and_starts(
    installed_image_tree: Path, scratch_home: Path
) -> None:
    assert "breakglass-serve" in console_scripts(), "pyproject.toml lost breakglass-serve"
    serve = str(installed_image_tree / "bin" / "breakglass-serve")
    result = as_app_user([serve, "--help"], scratch_home)
    assert result.returncode == 0, result.stderr
    assert "--public-url" in result.stdout


def test_docker_and_buildah_see_the_same_build_context() -> None:
    assert (REPO / ".dockerignore").read_text() == (REPO / ".containerignore").read_text()
