#!/usr/bin/env bash
# Installs what the lab needs on a fresh Debian machine, as root (scripts/setup.sh guest: QEMU,
# bubblewrap, the app, and the real devvm's image built from Debian packages, cached), then runs
# the console against it:
#   breakglass-tui --lab [--scenario NAME] [--sandbox]
# The first run also saves the devvm's booted state (about half a minute, shown as it goes);
# later runs restore it in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh guest
exec .venv/bin/breakglass-tui --lab "$@"
