"""Build the breakglass image here, as an operator would, with Debian's tools
(docs/architecture.md §7).

No container registry is reachable from this machine, so the Containerfile's base
(``debian:bookworm-slim`` by digest) cannot be pulled. It is made instead, from Debian's own
packages: ``mmdebstrap --variant=minbase`` of bookworm with the slim image's path excludes and
merged /usr (77 MB, the size of the published slim image), imported into podman's storage, and
passed to the build *by digest* as ``BASE_IMAGE`` — the same build argument a real build pins.
Then ``buildah build --layers --isolation chroot --pull=never``.

Both steps are cached: the base by a key over its recipe (an image tag), the build by buildah's
layer cache (a change to the app rebuilds only its last layers). The machine's CA bundle goes to
the build as the ``ca-bundle`` secret (package traffic here may pass a TLS-inspecting proxy); the
image test checks that none of it ends up in the image.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("mmdebstrap", "podman", "buildah", "runc")
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# debian:*-slim drops documentation, man pages and translations (debuerreotype's slimify list).
SLIM_DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
MMDEBSTRAP_ARGS = (
    "--variant=minbase",
    "--mode=root",
    "--format=tar",
    # Merged /usr as Debian 12 has it, without the usrmerge package (and the perl it pulls in).
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--aptopt=Acquire::Languages none",
    *(f"--dpkgopt={opt}" for opt in SLIM_DPKG_OPTS),
)
BASE_REPOSITORY = "localhost/breakglass-test-base"
APP_IMAGE = "localhost/breakglass-tui:image-test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# One build at a time on this machine (two test runs would race on the tags).
# Figures the image test measured, printed in the run's summary (tests/image/conftest.py).
FIGURES: dict[str, str] = {}
LOCK_FILE = Path(tempfile.gettempdir()) / "breakglass-image-build.lock"


class ImageToolMissing(RuntimeError):
    """A Debian tool the image build needs is not installed."""


@dataclass(frozen=True)
class BuiltImage:
    """The image under test and what its build cost."""

    reference: str
    image_id: str
    size_bytes: int
    base_reference: str
    base_seconds: float  # 0.0 when the base came from the cache
    build_seconds: float
    revision: str


def check_tools() -> None:
    """Raise :class:`ImageToolMissing` naming what to install."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageToolMissing(
            f"the image test needs {', '.join(missing)} (Debian: apt-get install buildah podman"
            " mmdebstrap runc); `bash scripts/setup.sh test` installs them"
        )


def run(argv: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise with the tail of its output, which says why."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if result.returncode != 0:
        tail = (result.stdout[-3000:] + "\n" + result.stderr[-3000:]).strip()
        raise RuntimeError(f"{argv[0]} failed (exit {result.returncode}):\n{tail}")
    return result


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """podman with the runtime that works on this host (crun refuses its cgroups)."""
    return run(["podman", "--runtime", "runc", *args], timeout=timeout)


def image_exists(reference: str) -> bool:
    result = subprocess.run(
        ["podman", "image", "exists", reference], capture_output=True, timeout=30, check=False
    )
    return result.returncode == 0


def base_key() -> str:
    """What the base is made of; a change to the recipe makes a new base."""
    recipe = json.dumps([SUITE, MIRRORS, MMDEBSTRAP_ARGS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def make_base() -> tuple[str, bool]:
    """The local stand-in for debian:bookworm-slim, by digest; (reference, whether it was made
    now rather than found in the cache)."""
    tag = f"{BASE_REPOSITORY}:{SUITE}-{base_key()}"
    made = False
    if not image_exists(tag):
        with tempfile.TemporaryDirectory(prefix="breakglass-base-") as scratch:
            rootfs = Path(scratch) / "rootfs.tar"
            # mmdebstrap's apt runs on this machine and trusts its CA store (no hook needed for
            # the proxy); nothing of the host's trust store is copied into the root filesystem.
            run(["mmdebstrap", *MMDEBSTRAP_ARGS, SUITE, str(rootfs), *MIRRORS], timeout=900)
            podman("import", "--change", 'CMD ["bash"]', str(rootfs), tag, timeout=300)
        made = True
    digest = podman("image", "inspect", "--format", "{{.Digest}}", tag).stdout.strip()
    return f"{BASE_REPOSITORY}@{digest}", made


def git_revision() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if result.returncode == 0:
            return result.stdout.strip()
    return "unknown"


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    with LOCK_FILE.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_image(version: str) -> BuiltImage:
    """Make (or reuse) the base, then build the Containerfile as docs/install.md says."""
    check_tools()
    with build_lock():
        base_started = time.monotonic()
        base, made = make_base()
        base_seconds = time.monotonic() - base_started if made else 0.0
        previous = image_id(APP_IMAGE)
        revision = git_revision()
        argv = [
            "buildah",
            "build",
            "--layers",
            "--isolation",
            "chroot",
            "--pull=never",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--build-arg",
            f"VERSION={version}",
            "--build-arg",
            f"REVISION={revision}",
            # Also as a label of the build itself: buildah's layer cache (Debian's 1.28) reuses
            # the LABEL step built from an older REVISION when no copied file changed (a docs-only
            # commit), and the image would name the wrong commit (docs/install.md says the same).
            "--label",
            f"org.opencontainers.image.revision={revision}",
            "--tag",
            APP_IMAGE,
            "--file",
            str(REPO / "Containerfile"),
        ]
        if CA_BUNDLE.is_file():
            argv += ["--secret", f"id=ca-bundle,src={CA_BUNDLE}"]
        started = time.monotonic()
        run([*argv, str(REPO)], timeout=1200)
        build_seconds = time.monotonic() - started
        current = image_id(APP_IMAGE)
        if previous and previous != current:
            # The last run's image; its layers stay if a newer build still uses them.
            subprocess.run(
                ["podman", "rmi", previous], capture_output=True, timeout=60, check=False
            )
    size = int(podman("image", "inspect", "--format", "{{.Size}}", APP_IMAGE).stdout.strip())
    return BuiltImage(
        reference=APP_IMAGE,
        image_id=current,
        size_bytes=size,
        base_reference=base,
        base_seconds=base_seconds,
        build_seconds=build_seconds,
        revision=revision,
    )


def image_id(reference: str) -> str:
    if not image_exists(reference):
        return ""
    return podman("image", "inspect", "--format", "{{.Id}}", reference).stdout.strip()


def labels(reference: str) -> dict[str, str]:
    out = podman("image", "inspect", "--format", "{{json .Labels}}", reference).stdout
    return json.loads(out) or {}


def exported_files(reference: str) -> Iterator[tuple[str, bytes]]:
    """(path, content) of every regular file in the image, from ``podman export``."""
    import tarfile

    name = f"breakglass-export-{os.getpid()}"
    podman("create", "--name", name, reference)
    try:
        proc = subprocess.Popen(
            ["podman", "export", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        handle = tar.extractfile(member)
                        if handle is not None:
                            yield member.name, handle.read()
        finally:
            proc.stdout.close()
            proc.wait(timeout=60)
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60, check=False)
