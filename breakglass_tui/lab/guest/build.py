"""Build the real-guest lab's devvm image: a Debian kernel and a busybox + dropbear initramfs.

Everything comes from Debian's packages, fetched with the system's own package tools
(``apt-get download``) into a cache, unpacked with ``dpkg-deb``, and packed into a gzip'd newc
cpio written here byte by byte: sorted entries, zero timestamps, root ownership. The same inputs
(the .deb files, the files under ``files/``, the host-key seed) give the same image, byte for
byte; the image's id is a hash of those inputs, so a rebuild with the same inputs is a cache hit.

Nothing is downloaded at run time by the app: ``python -m breakglass_tui.lab.guest.build`` (or
the test set-up) builds it once; the lab then only reads the cache.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FILES = Path(__file__).with_name("files")
BUILDER_VERSION = "1"
KERNEL_META = "linux-image-cloud-amd64"
USERLAND = (
    "busybox-static",
    "dash",
    "dropbear-bin",
    "libc6",
    "libcrypt1",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "zlib1g",
)
# The modules the guest needs; their dependencies are found from each module's .modinfo and
# loaded first (the package ships no modules.dep: depmod runs at install time).
MODULES = ("virtio_pci", "virtio_net", "virtio_blk")
LIBS = (
    "lib64/ld-linux-x86-64.so.2",
    "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "lib/x86_64-linux-gnu/libc.so.6",
    "lib/x86_64-linux-gnu/libcrypt.so.1",
    "lib/x86_64-linux-gnu/libz.so.1",
    "usr/lib/x86_64-linux-gnu/libtomcrypt.so.1",
    "usr/lib/x86_64-linux-gnu/libtommath.so.1",
    "usr/lib/x86_64-linux-gnu/libgmp.so.10",
)
HOST_KEY_SEED = b"breakglass-tui lab guest host key v1"


class GuestBuildError(Exception):
    """The image could not be built; the message says which step and what to do."""


def default_cache() -> Path:
    base = os.environ.get("BREAKGLASS_GUEST_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "breakglass-tui/guest"


@dataclass(frozen=True)
class GuestImage:
    """A built image: kernel, initramfs and the pinned public host key of its dropbear."""

    directory: Path
    image_id: str

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.gz"

    @property
    def host_key_line(self) -> str:
        """``ssh-ed25519 AAAA…`` of the guest's host key."""
        return (self.directory / "host_key.pub").read_text().strip()

    @property
    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise GuestBuildError(
            f"{argv[0]} is missing: this builder needs Debian's apt and dpkg"
        ) from None
    if done.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}."
            " Run 'apt-get update' and retry."
        )
    return done.stdout


def fetch_debs(cache: Path) -> list[Path]:
    """Download the kernel and userland .deb files into ``cache/debs`` (kept between builds)."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    wanted = [KERNEL_META, *USERLAND]
    have = {p.name.split("_")[0]: p for p in debs.glob("*.deb")}
    missing = [name for name in wanted if name not in have]
    if missing:
        _run(["apt-get", "download", *missing], cwd=debs)
        have = {p.name.split("_")[0]: p for p in debs.glob("*.deb")}
    # The meta package names the exact kernel package it stands for.
    depends = _run(["dpkg-deb", "-f", str(have[KERNEL_META]), "Depends"])
    match = re.search(r"(linux-image-[0-9][^\s,(]*-cloud-amd64)", depends)
    if not match:
        raise GuestBuildError(f"cannot find the kernel package in {KERNEL_META}'s Depends")
    kernel_pkg = match.group(1)
    if kernel_pkg not in have:
        _run(["apt-get", "download", kernel_pkg], cwd=debs)
        have = {p.name.split("_")[0]: p for p in debs.glob("*.deb")}
    return sorted(have[name] for name in [kernel_pkg, *USERLAND])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_id_for(debs: list[Path]) -> str:
    # The builder itself is an input: a change to how the image is assembled is a new image.
    h = hashlib.sha256(BUILDER_VERSION.encode() + Path(__file__).read_bytes())
    for deb in debs:
        h.update(deb.name.encode() + b"\0" + _sha256(deb).encode())
    for path in sorted(p for p in FILES.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(FILES)).encode() + b"\0" + path.read_bytes())
    h.update(HOST_KEY_SEED)
    return h.hexdigest()[:16]


def _host_key() -> tuple[bytes, str]:
    """The guest's ed25519 host key, derived from a fixed seed so the image is reproducible:
    (dropbear-format private key, OpenSSH public line). A lab key, pinned by the lab."""
    seed = hashlib.sha256(HOST_KEY_SEED).digest()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(seed)
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sshstr(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    # Dropbear's ed25519 private key file: string "ssh-ed25519", string (seed || public).
    dropbear = sshstr(b"ssh-ed25519") + sshstr(seed + pub)
    import base64

    public = "ssh-ed25519 " + base64.b64encode(sshstr(b"ssh-ed25519") + sshstr(pub)).decode()
    return dropbear, public


class Cpio:
    """A deterministic newc cpio archive builder."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes]] = {}

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | mode, b""))

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.add_dir(name.rsplit("/", 1)[0])
        self.entries[name] = (stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.add_dir(name.rsplit("/", 1)[0])
        self.entries[name] = (stat.S_IFLNK | 0o777, target.encode())

    def bytes(self) -> bytes:
        out = io.BytesIO()
        for ino, name in enumerate([*sorted(self.entries), "TRAILER!!!"], start=1):
            mode, data = self.entries.get(name, (0, b""))
            encoded = name.encode() + b"\0"
            fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
            header = b"070701" + b"".join(b"%08X" % f for f in fields)
            out.write(header + encoded)
            out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
            out.write(data)
            out.write(b"\0" * (-len(data) % 4))
        return out.getvalue()


def _module_depends(path: Path) -> list[str]:
    data = path.read_bytes()
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    end = data.index(b"\0", start + 1)
    value = data[start + len(b"\0depends=") : end].decode()
    return [name for name in value.split(",") if name]


def module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for ``wanted`` and everything they depend on, dependencies first."""
    index = {p.stem: p for p in modules_dir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = index.get(name) or index.get(name.replace("_", "-"))
        if path is None:
            raise GuestBuildError(f"kernel module {name} is not in the kernel package")
        for dep in _module_depends(path):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def assemble(root: Path, kernel_release: str) -> Cpio:
    """The initramfs tree from the unpacked packages and ``files/``."""
    cpio = Cpio()
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "usr/local/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/log",
        "root",
        "data",
    ):
        cpio.add_dir(d)
    cpio.add_file("bin/busybox", (root / "bin/busybox").read_bytes(), 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    # root's login shell. Debian's busybox sh prefers its own applets to $PATH, so its setsid
    # (no -w) would shadow ours; dropbear runs commands with the login shell, which must look
    # commands up in $PATH like the bash or dash of a real devvm.
    cpio.add_file("bin/dash", (root / "bin/dash").read_bytes(), 0o755)
    cpio.add_file("usr/sbin/dropbear", (root / "usr/sbin/dropbear").read_bytes(), 0o755)
    for lib in LIBS:
        src = root / lib
        if src.is_symlink() and lib.startswith("lib64"):
            cpio.add_symlink(lib, "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
            continue
        cpio.add_file(lib, src.resolve().read_bytes(), 0o755)
    order = []
    for path in module_load_order(root / "lib/modules" / kernel_release, MODULES):
        cpio.add_file(f"lib/modules/{path.name}", path.read_bytes())
        order.append(path.name)
    cpio.add_file("etc/modules-order", ("\n".join(order) + "\n").encode())
    cpio.add_file("init", (FILES / "init").read_bytes(), 0o755)
    cpio.add_file("usr/local/sbin/services", (FILES / "services").read_bytes(), 0o755)
    # /usr/bin, not /usr/local/bin: dropbear gives root's sessions
    # PATH=/usr/sbin:/usr/bin:/sbin:/bin, and /usr/bin/setsid must shadow busybox's /bin/setsid
    # (which lacks -w).
    for tool in ("systemctl", "journalctl", "setsid"):
        cpio.add_file(f"usr/bin/{tool}", (FILES / tool).read_bytes(), 0o755)
    for path in sorted((FILES / "services.d").iterdir()):
        mode = 0o755 if "." not in path.name else 0o644
        cpio.add_file(f"etc/services.d/{path.name}", path.read_bytes(), mode)
    cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/dash\n")
    cpio.add_file("etc/group", b"root:x:0:\n")
    cpio.add_file("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    cpio.add_file("etc/shells", b"/bin/sh\n/bin/dash\n")
    cpio.add_file("etc/hostname", b"devvm\n")
    cpio.add_file("etc/os-release", b'PRETTY_NAME="breakglass lab devvm (busybox)"\nID=busybox\n')
    dropbear_key, _ = _host_key()
    cpio.add_file("etc/dropbear/dropbear_ed25519_host_key", dropbear_key, 0o600)
    return cpio


def build(cache: Path | None = None, *, quiet: bool = False) -> GuestImage:
    """Build the image (or find it in the cache) and return it."""
    cache = cache or default_cache()
    debs = fetch_debs(cache)
    image_id = image_id_for(debs)
    target = cache / "images" / image_id
    if (target / "manifest.json").exists():
        return GuestImage(target, image_id)
    with tempfile.TemporaryDirectory(prefix="bg-guest-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise GuestBuildError("the kernel package held no /boot/vmlinuz-*")
        release = kernels[-1].name.removeprefix("vmlinuz-")
        cpio = assemble(root, release)
        staging = Path(tmp) / "out"
        staging.mkdir()
        shutil.copyfile(kernels[-1], staging / "vmlinuz")
        raw = cpio.bytes()
        with (
            (staging / "initrd.gz").open("wb") as f,
            gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=6, filename="") as gz,
        ):
            gz.write(raw)
        (staging / "host_key.pub").write_text(_host_key()[1] + "\n")
        manifest = {
            "image_id": image_id,
            "kernel_release": release,
            "debs": {deb.name: _sha256(deb) for deb in debs},
            "initrd_sha256": _sha256(staging / "initrd.gz"),
            "entries": len(cpio.entries),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target) if staging.stat().st_dev == target.parent.stat().st_dev else (
            shutil.copytree(staging, target)
        )
    if not quiet:
        print(f"built guest image {image_id} in {target}", file=sys.stderr)
    return GuestImage(target, image_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the real-guest lab's devvm image.")
    parser.add_argument("--cache", type=Path, default=None, help="cache directory")
    args = parser.parse_args(argv)
    try:
        image = build(args.cache)
    except GuestBuildError as exc:
        print(f"guest image build failed: {exc}", file=sys.stderr)
        return 1
    print(image.directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
