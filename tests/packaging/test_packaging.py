"""The package says what it uses and what it is: every third-party import declared, textual-serve
pinned to the version the server's overrides were written against, a license, a version on each
console script, no third-party warning in a tab's stderr, and records in the platform's place."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "breakglass_tui"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module → the files importing it: import statements anywhere in a file (lazy
    ones too) and ``importlib.import_module("…")`` with a literal name."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "breakglass_tui":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def declared() -> dict[str, Requirement]:
    return {
        canonicalize_name(r.name): r for r in map(Requirement, PYPROJECT["project"]["dependencies"])
    }


def test_every_package_the_code_imports_is_declared():
    owners = packages_distributions()
    imports = third_party_imports()
    assert {"asyncssh", "textual", "aiohttp", "jinja2", "requests", "cryptography"} <= set(imports)
    missing = {}
    for module, files in imports.items():
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)}) belongs to no installed package"
        if not dists & set(declared()):
            missing[module] = sorted(files)
    assert missing == {}, f"imported but not in [project] dependencies: {missing}"


def test_textual_serve_is_pinned_exactly_and_the_installed_one_is_the_pin():
    """serve/server.py overrides private methods of textual-serve: another version is read and
    tested before the pin moves."""
    requirement = declared()["textual-serve"]
    [spec] = list(requirement.specifier)
    assert spec.operator == "==", f"textual-serve must be pinned exactly, not {spec}"
    assert version("textual-serve") == spec.version, (
        f"textual-serve {version('textual-serve')} is installed, the pin is {spec.version}:"
        " run scripts/setup.sh"
    )


def test_the_verb_contract_forbids_every_third_party_package_the_project_imports():
    [contract] = [
        c
        for c in PYPROJECT["tool"]["importlinter"]["contracts"]
        if c.get("source_modules") == ["breakglass_tui.verb"]
        and "asyncssh" in c.get("forbidden_modules", ())
    ]
    unforbidden = set(third_party_imports()) - set(contract["forbidden_modules"])
    assert unforbidden == set(), f"add {sorted(unforbidden)} to the verb's contract"


def test_the_build_backend_can_build_the_license_field_and_the_license_is_there():
    assert Requirement(PYPROJECT["build-system"]["requires"][0]).specifier.contains("77")
    assert not Requirement(PYPROJECT["build-system"]["requires"][0]).specifier.contains("76")
    assert PYPROJECT["project"]["license"] == "MIT"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_each_console_script_says_its_version():
    project = PYPROJECT["project"]["version"]
    for script in PYPROJECT["project"]["scripts"]:
        result = subprocess.run(
            [BIN / script, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{script} {project}"), result.stdout


def test_the_verb_carries_the_projects_version_as_a_constant():
    """The verb is copied alone onto the PVE host, where no package metadata is."""
    from breakglass_tui.verb import breakglass_verb

    assert PYPROJECT["project"]["version"] == breakglass_verb.VERSION


def test_no_third_party_warning_reaches_stderr_when_the_app_and_the_lab_load():
    """A tab's stderr becomes the server's "app stderr" log lines: asyncssh's use of DSA and
    TripleDES, which cryptography deprecates, must not print there (nor in a terminal)."""
    code = (
        "import breakglass_tui.cli, breakglass_tui.runtime, breakglass_tui.hosts.session,"
        " breakglass_tui.hosts.keyagent, breakglass_tui.lab.lab, breakglass_tui.lab.guest.lab,"
        " breakglass_tui.serve.server, breakglass_tui.core.agent"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=True,
    )
    assert result.stderr == ""
    # The warning is real without the project's filter (so the check above can fail).
    bare = subprocess.run(
        [sys.executable, "-c", "import asyncssh"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert "CryptographyDeprecationWarning" in bare.stderr


def test_the_records_default_to_the_platforms_state_dir_not_the_current_one(tmp_path):
    code = "from breakglass_tui.config import Settings; print(Settings().state_dir)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BREAKGLASS_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    shown = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert shown == str(tmp_path / "xdg" / "breakglass-tui")
    env["BREAKGLASS_STATE_DIR"] = str(tmp_path / "told")
    told = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert told == str(tmp_path / "told")
