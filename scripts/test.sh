#!/usr/bin/env bash
# Sets up everything the tests need (scripts/setup.sh test) and runs the checks and the tests.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/verb -x
# Two pytest workers (pytest-xdist), each test file on one of them (--dist loadfile: a file's
# module-scoped real parts are started once); TEST_WORKERS=0 runs them in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
echo "== ruff" && .venv/bin/ruff check .
echo "== import contracts" && .venv/bin/lint-imports --no-cache
echo "== types" && .venv/bin/mypy --strict breakglass_tui/core breakglass_tui/hosts breakglass_tui/verb
echo "== pytest"
set +e
.venv/bin/pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
case $rc in
    0) ;;
    5) echo "pytest collected no test: that is a failure here, not a pass" >&2; rc=1 ;;
    *) echo "pytest failed with exit code $rc" >&2 ;;
esac
exit $rc
