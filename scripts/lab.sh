#!/usr/bin/env bash
# Installs what the app needs (scripts/setup.sh) and runs the console against its embedded lab:
#   breakglass-tui --lab [--scenario healthy|disk-full|oom|stuck-service|wedged|io-stall]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/breakglass-tui --lab "$@"
