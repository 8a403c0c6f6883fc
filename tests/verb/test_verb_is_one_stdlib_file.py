"""breakglass-verb is copied to the PVE host as one file: it may import the standard library only
(no project module, no third-party package), and it must run from a copy outside the project."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import breakglass_tui.verb.breakglass_verb as verb

VERB_FILE = Path(verb.__file__)


def test_every_import_is_from_the_standard_library() -> None:
    tree = ast.parse(VERB_FILE.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would tie the verb to the package"
            modules.add((node.module or "").split(".")[0])
    assert modules, "the parser found no import at all"
    foreign = sorted(m for m in modules if m not in sys.stdlib_module_names and m != "__future__")
    assert foreign == [], f"breakglass-verb imports non-stdlib modules: {foreign}"


def test_a_lone_copy_runs_with_an_isolated_interpreter(tmp_path: Path) -> None:
    # As installed on the PVE host: one file, no site-packages, no project on the path.
    copy = tmp_path / "breakglass-verb"
    shutil.copyfile(VERB_FILE, copy)
    env = {"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": "status; reboot"}
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(copy)], env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout)["refused"] == "bad_input"
