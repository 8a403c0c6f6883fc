#!/usr/bin/env bash
# Regenerates the image's hash-locked dependency sets from pyproject.toml (run after changing its
# dependencies or build-system; tests/image/test_lock.py says when it is due):
#   requirements/image.txt   the runtime dependencies, every version pinned, every file hashed
#   requirements/build.txt   what builds the project's own wheel (setuptools), likewise
# Resolved for the image's Python (Debian bookworm's python3, 3.11) on linux; the hashes cover
# every published file of each pinned version, so an arm64 build verifies as well.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
# PyPI itself, not this machine's pip configuration (local wheel mirrors would leak into the lock).
export PIP_CONFIG_FILE=/dev/null
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check 'pip-tools>=7.4,<8'
compile=("$tools/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras
    --no-emit-index-url --no-emit-find-links --index-url https://pypi.org/simple
)
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"
"${compile[@]}" --output-file requirements/image.txt pyproject.toml
"${compile[@]}" --output-file requirements/build.txt requirements/build.in
