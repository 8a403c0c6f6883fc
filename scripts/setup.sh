#!/usr/bin/env bash
# Installs what breakglass-tui needs on a fresh Debian machine, as root: Debian packages (only
# those missing), a virtual environment in .venv, and the project with the extras asked for.
#   scripts/setup.sh            the app
#   scripts/setup.sh test       the app, the test tools and the real parts the tests start
#   scripts/setup.sh guest      the app, QEMU, bubblewrap and the lab's real devvm (its image built
#                               from Debian packages, cached)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-app}

# python3-venv: Debian's python3 makes no virtual environment without it.
debs=(python3 python3-venv openssh-client)
if [ "$mode" = test ]; then
    # Real parts for the tests: sshd for the forced command, sudo as on the devvm, QEMU for QMP
    # and the real devvm, bubblewrap for the sandbox devvm, Chromium for the page, tmux for the
    # newcomer-in-a-terminal test; and the image test's tools: mmdebstrap makes the Debian base,
    # buildah builds the Containerfile, podman runs it with runc (crun refuses this kind of
    # host's cgroups).
    # promtool (Debian's prometheus) checks and unit-tests the chart's alerting rules; git names
    # the image test's checkout.
    debs+=(openssh-server sudo qemu-system-x86 chromium tmux mmdebstrap buildah podman runc prometheus git)
fi
if [ "$mode" = test ] || [ "$mode" = guest ]; then
    # The lab: QEMU runs the real devvm (qemu-utils makes its disks), e2fsprogs writes them;
    # bubblewrap and OpenSSH's sshd make the sandbox devvm; the sandbox and the devvm's own
    # tools (ps, fuser, lsof) are this machine's in the sandbox.
    debs+=(qemu-system-x86 qemu-utils e2fsprogs bubblewrap openssh-server procps psmisc lsof)
fi
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Other installs may hold the dpkg lock (another checkout's setup): wait for it.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The development tools are dependency groups (pyproject.toml [dependency-groups], PEP 735), which
# pip installs from 25.1 on: the venv's pip is brought there first.
groups=()
[ "$mode" = test ] && groups=(--group test --group browser --group chart)
# Quiet unless it fails; pip's cache makes a second run take seconds.
{ .venv/bin/python -m pip install -q --disable-pip-version-check "pip>=25.1" \
    && .venv/bin/python -m pip install -q --disable-pip-version-check -e . "${groups[@]}"; } \
    >/tmp/breakglass-pip.log 2>&1 \
    || { cat /tmp/breakglass-pip.log >&2; echo "setup: pip install failed (log above)" >&2; exit 1; }

if [ "$mode" = test ] || [ "$mode" = guest ]; then
    # The real devvm's image, built from Debian packages (cached: nothing to do once built). apt
    # resolves and downloads them from fresh package lists; the build says what it does.
    if ! .venv/bin/python -c 'import sys; from breakglass_tui.lab.guest.build import find_image; sys.exit(find_image() is None)'; then
        echo "setup: building the lab's devvm image from Debian packages (cached once built)" >&2
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        .venv/bin/python -m breakglass_tui.lab.guest.build >/dev/null
    fi
fi
if [ "$mode" = test ]; then
    # The states the tests' drills start from: the devvm booted once, and each scenario put in
    # place once (about a minute and a half the first time; cached).
    .venv/bin/python -m breakglass_tui.lab.guest.plan
fi
