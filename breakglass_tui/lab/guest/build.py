"""Build the real-guest lab's devvm image: a Debian kernel, a small initramfs, and an ext4 root
disk holding a Debian userland (OpenSSH, sudo, procps, psmisc, lsof, util-linux, sysstat, …).

Everything comes from Debian's packages, resolved and fetched with the system's own apt (``apt-get
install --simulate`` against an empty system for the package set, ``apt-get download`` into a
cache), unpacked here from ``dpkg-deb --fsys-tarfile`` (merged ``/usr``, as Debian 12 installs
it), configured by the files under ``files/rootfs`` (the lab's init, service manager, ``systemctl``
and ``journalctl`` front ends, sshd and sudo settings, users), and written to ext4 file systems
with ``mke2fs -d``, then to qcow2 with ``qemu-img convert``. Maintainer scripts are not run: what
they would have made (users, alternatives, the dpkg database, host keys) is written here.

The image is reproducible: the same .deb files and the same files here give the same bytes
(fixed file system UUIDs and hash seeds, ``E2FSPROGS_FAKE_TIME``, every inode's times set from
its package's mtime, a host key derived from a fixed seed, a gzip'd cpio written byte by byte).
Its id is a hash of those inputs, so a rebuild with the same inputs is a cache hit.

Nothing is downloaded at run time by the app: ``python -m breakglass_tui.lab.guest.build`` (or
``scripts/setup.sh guest``, or the lab's first run) builds it; the lab then only reads the cache.
Building needs root (the files must be owned by root on the image, setuid sudo included).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
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
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FILES = Path(__file__).with_name("files")
BUILDER_VERSION = "2"
KERNEL_META = "linux-image-cloud-amd64"
# What the devvm has, beyond the kernel: what a model and the runbook reach for on a wedged
# Debian machine. apt adds their dependencies.
PACKAGES = (
    "usr-is-merged",  # Debian 12's merged /usr, without the usrmerge converter (and its perl)
    "base-files",
    "bash",
    "dash",
    "coreutils",
    "util-linux",
    "mount",
    "procps",
    "psmisc",
    "lsof",
    "sysstat",
    "findutils",
    "grep",
    "sed",
    "gawk",
    "diffutils",
    "tar",
    "gzip",
    "less",
    "hostname",
    "login",
    "passwd",
    "ncurses-bin",
    "ncurses-base",  # terminfo: top and less need it, even in batch mode
    "e2fsprogs",
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "curl",
    "kmod",
    "openssh-server",
    "sudo",
    "libpam-modules",
    "libpam-runtime",
    "dpkg",
    "busybox-static",  # syslogd, klogd, httpd, reboot; and the initramfs
)
# Files no one reads on a rescue (Debian's own minimal images drop them too); each package's
# copyright file stays.
EXCLUDED = ("usr/share/man/", "usr/share/info/", "usr/share/locale/", "usr/share/lintian/")
# What update-alternatives would have linked (from the packages' postinst scripts).
ALTERNATIVES = {
    "awk": "/usr/bin/gawk",
    "nawk": "/usr/bin/gawk",
    "nc": "/bin/nc.openbsd",
    "netcat": "/bin/nc.openbsd",
    "which": "/usr/bin/which.debianutils",
    "pager": "/usr/bin/less",
    "sar": "/usr/bin/sar.sysstat",
    "lzma": "/usr/bin/xz",
}
# The modules the initramfs loads (their dependencies are found from each module's .modinfo and
# loaded first: the package ships no modules.dep, depmod runs at install time). ext4 is built in.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng")
ENABLED_UNITS = ("webapp", "cron")
HOST_KEY_SEED = b"breakglass-tui lab guest host key v1"
# Fixed so the image is reproducible: the time of every file this builder writes (2025-01-01),
# the file systems' UUIDs and directory hash seeds.
EPOCH = 1735689600
ROOT_UUID = "6f1d3a50-2b7c-4c1e-9a51-0d5e7bd0b102"
DATA_UUID = "6f1d3a50-2b7c-4c1e-9a51-0d5e7bd0da7a"
ROOT_SIZE = 1024 * 1024 * 1024
# Small on purpose, so disk-full, deleted-open and inode-exhaustion are real and quick.
DATA_SIZE = 32 * 1024 * 1024
DATA_INODES = 2048
DATA_DIRS = ("log/app", "cache/sessions", "export", "db")
BREAKGLASS_UID = 1000
SHADOW_GID = 42
_SPECIAL_MODES = {
    "etc/shadow": (0o640, 0, SHADOW_GID),
    "etc/gshadow": (0o640, 0, SHADOW_GID),
    "etc/sudoers.d/breakglass": (0o440, 0, 0),
}

Progress = Callable[[str], None]
SHM = "/dev/shm"  # noqa: S108  (a tmpfs; the staging dir made in it is private, mkdtemp)


class GuestBuildError(Exception):
    """The image could not be built; the message says which step and what to do."""


def default_cache() -> Path:
    base = os.environ.get("BREAKGLASS_GUEST_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "breakglass-tui/guest"


@dataclass(frozen=True)
class GuestImage:
    """A built image: kernel, initramfs, the root and data disks, the guest's public host key."""

    directory: Path
    image_id: str

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.gz"

    @property
    def root_disk(self) -> Path:
        return self.directory / "root.qcow2"

    @property
    def data_disk(self) -> Path:
        return self.directory / "data.qcow2"

    @property
    def host_key_line(self) -> str:
        """``ssh-ed25519 AAAA…`` of the guest's host key."""
        return (self.directory / "host_key.pub").read_text().strip()

    @property
    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())

    def complete(self) -> bool:
        return (self.directory / "manifest.json").exists()


def _quiet(message: str) -> None:
    return None


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=900, env=env, check=False
        )
    except FileNotFoundError:
        raise GuestBuildError(
            f"{argv[0]} is missing: building the guest needs Debian's apt, dpkg, e2fsprogs and"
            " qemu-utils (bash scripts/setup.sh guest installs them)"
        ) from None
    if done.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv[:4])}… failed ({done.returncode}): {done.stderr.strip()[-500:]}"
        )
    return done.stdout


# -- the packages --------------------------------------------------------------------------------
def resolve_packages() -> list[tuple[str, str]]:
    """(name, version) of every package the devvm needs: PACKAGES and the kernel with their
    dependencies, as apt would install them on an empty system."""
    argv = [
        "apt-get",
        "--simulate",
        "-o",
        "Dir::State::status=/dev/null",
        "-o",
        "APT::Install-Recommends=false",
        "install",
        KERNEL_META,
        *PACKAGES,
    ]
    try:
        out = _run(argv)
    except GuestBuildError as exc:
        raise GuestBuildError(
            f"apt cannot resolve the guest's packages ({exc}). Run 'apt-get update' and retry."
        ) from None
    found = re.findall(r"^Inst (\S+) \((\S+)", out, re.M)
    if not found:
        raise GuestBuildError("apt resolved no package for the guest: run 'apt-get update'")
    return sorted(found)


def _deb_name(name: str, version: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_"


def fetch_debs(cache: Path, packages: list[tuple[str, str]], progress: Progress) -> list[Path]:
    """The .deb of every package, downloaded with apt-get into ``cache/debs`` (kept)."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)

    def find(name: str, version: str) -> Path | None:
        hits = sorted(debs.glob(_deb_name(name, version) + "*.deb"))
        return hits[0] if hits else None

    missing = [(n, v) for n, v in packages if find(n, v) is None]
    if missing:
        progress(f"downloading {len(missing)} Debian packages with apt-get…")
        try:
            _run(["apt-get", "download", *(f"{n}={v}" for n, v in missing)], cwd=debs)
        except GuestBuildError as exc:
            raise GuestBuildError(
                f"apt-get download failed ({exc}). Run 'apt-get update' and retry."
            ) from None
    paths = []
    for name, version in packages:
        path = find(name, version)
        if path is None:
            raise GuestBuildError(f"apt-get download did not fetch {name} {version}")
        paths.append(path)
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def sources_hash() -> str:
    """A hash of this builder and its files: what the image is made by (not of)."""
    h = hashlib.sha256(BUILDER_VERSION.encode() + Path(__file__).read_bytes())
    for path in sorted(p for p in FILES.rglob("*") if p.is_file() or p.is_symlink()):
        h.update(str(path.relative_to(FILES)).encode() + b"\0")
        h.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    h.update(HOST_KEY_SEED)
    return h.hexdigest()


def image_id_for(debs: list[Path]) -> str:
    """The image's id: the builder, its files and the exact .deb files."""
    h = hashlib.sha256(sources_hash().encode())
    for deb in sorted(debs, key=lambda p: p.name):
        h.update(deb.name.encode() + b"\0" + _sha256(deb).encode())
    return h.hexdigest()[:16]


# -- the host key --------------------------------------------------------------------------------
def _sshstr(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def host_key() -> tuple[bytes, str]:
    """The guest's ed25519 host key, derived from a fixed seed so the image is reproducible:
    (OpenSSH private key file, public line). A lab key: the lab pins it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    seed = hashlib.sha256(HOST_KEY_SEED).digest()
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = _sshstr(b"ssh-ed25519") + _sshstr(raw)
    # openssh-key-v1, unencrypted; the check integers are random in ssh-keygen, fixed here.
    check = hashlib.sha256(seed).digest()[:4] * 2
    private = check + _sshstr(b"ssh-ed25519") + _sshstr(raw) + _sshstr(seed + raw)
    private += _sshstr(b"root@devvm")
    private += bytes(range(1, 1 + (-len(private) % 8)))
    body = b"openssh-key-v1\0" + _sshstr(b"none") + _sshstr(b"none") + _sshstr(b"")
    body += (1).to_bytes(4, "big") + _sshstr(blob) + _sshstr(private)
    text = base64.b64encode(body).decode()
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    pem += "".join(text[i : i + 70] + "\n" for i in range(0, len(text), 70))
    pem += "-----END OPENSSH PRIVATE KEY-----\n"
    return pem.encode(), "ssh-ed25519 " + base64.b64encode(blob).decode()


# -- the root file system ------------------------------------------------------------------------
_MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def _merged(name: str) -> str:
    """A package path on Debian 12's merged /usr ("./bin/ls" -> "usr/bin/ls")."""
    name = name.removeprefix("./").rstrip("/")
    head, _, rest = name.partition("/")
    if head in _MERGED:
        return _MERGED[head] + ("/" + rest if rest else "")
    return name


def _excluded(path: str) -> bool:
    if path.startswith("usr/share/doc/"):
        return not path.endswith("/copyright") and path.count("/") > 3
    return any(path.startswith(prefix) for prefix in EXCLUDED)


def unpack(deb: Path, root: Path) -> list[str]:
    """Unpack one package's files into root on merged /usr; returns its file list (as dpkg
    records it: /bin/ls, not /usr/bin/ls)."""
    listing: list[str] = []
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            original = "/" + member.name.removeprefix("./").rstrip("/")
            listing.append("/." if original == "/" else original)
            target = _merged(member.name)
            if not target or _excluded(target):
                continue
            if target in _MERGED.values() and member.isdir() and (root / target).is_dir():
                continue
            member.name = target
            if member.islnk():
                member.linkname = _merged(member.linkname)
            dest = root / target
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                dest.unlink()
            tar.extract(member, root, set_attrs=True, numeric_owner=True)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise GuestBuildError(f"dpkg-deb could not read {deb.name}: {err.decode()[-300:]}")
    return listing


def _control(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb)]).rstrip("\n") + "\n"


def write_dpkg_database(root: Path, debs: list[Path], lists: dict[str, list[str]]) -> None:
    """/var/lib/dpkg/status and info/*.list, so dpkg -l, -L and -S answer as on Debian."""
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True, exist_ok=True)
    for d in ("updates", "triggers", "alternatives"):
        (root / "var/lib/dpkg" / d).mkdir(exist_ok=True)
    paragraphs = []
    for deb in sorted(debs, key=lambda p: p.name):
        control = _control(deb)
        fields = dict(re.findall(r"^(\S+): (.*)$", control, re.M))
        name = fields["Package"]
        lines = control.splitlines(keepends=True)
        lines.insert(1, "Status: install ok installed\n")
        paragraphs.append((name, "".join(lines)))
        qualified = (
            f"{name}:{fields['Architecture']}" if fields.get("Multi-Arch") == "same" else name
        )
        (info / f"{qualified}.list").write_text("\n".join(lists[deb.name]) + "\n")
    (root / "var/lib/dpkg/status").write_text("\n".join(p for _, p in sorted(paragraphs)))
    (root / "var/lib/dpkg/available").write_text("")


def configure(root: Path) -> None:
    """What the maintainer scripts and an installer would have made, and the lab's own files."""
    for link, target in _MERGED.items():
        if not (root / link).is_symlink():
            (root / target).mkdir(parents=True, exist_ok=True)
            _symlink(root / link, target)
    for d in ("proc", "sys", "dev", "run", "tmp", "home", "root", "data", "mnt", "srv", "opt"):
        (root / d).mkdir(exist_ok=True)
    overlay = FILES / "rootfs"
    for src in sorted(overlay.rglob("*")):
        rel = str(src.relative_to(overlay))
        dest = root / rel
        if src.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            dest.chmod(0o755)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        shutil.copyfile(src, dest)
        mode, uid, gid = _SPECIAL_MODES.get(rel, (_mode_for(rel), 0, 0))
        os.chown(dest, uid, gid)
        dest.chmod(mode)
    # The init is /sbin/init; reboot and friends are busybox's (no systemd, no sysvinit).
    for name in ("reboot", "poweroff", "halt"):
        _symlink(root / "usr/sbin" / name, "/bin/busybox")
    for name, target in ALTERNATIVES.items():
        if not (root / target.lstrip("/")).exists() and not (root / _merged(target)).exists():
            raise GuestBuildError(f"alternative {name} -> {target}: no such file in the packages")
        _symlink(root / "etc/alternatives" / name, target)
        _symlink(root / "usr/bin" / name, f"/etc/alternatives/{name}")
    enabled = root / "etc/lab-services/enabled"
    enabled.mkdir(parents=True, exist_ok=True)
    for unit in ENABLED_UNITS:
        _symlink(enabled / f"{unit}.service", f"../{unit}.service")
    private, public = host_key()
    key = root / "etc/ssh/ssh_host_ed25519_key"
    key.write_bytes(private)
    key.chmod(0o600)
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text(public + " root@devvm\n")
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")
    (root / "etc/machine-id").write_text(hashlib.md5(HOST_KEY_SEED).hexdigest() + "\n")  # noqa: S324
    for home, uid in (("root", 0), ("home/breakglass", BREAKGLASS_UID)):
        path = root / home
        path.mkdir(parents=True, exist_ok=True)
        for skel in sorted((root / "etc/skel").iterdir()):
            shutil.copyfile(skel, path / skel.name)
            os.chown(path / skel.name, uid, uid)
        (path / ".ssh").mkdir(mode=0o700, exist_ok=True)
        os.chown(path / ".ssh", uid, uid)
        os.chown(path, uid, uid)
        path.chmod(0o700 if uid == 0 else 0o750)
    for d in ("data", "var/lib/app", "var/log/lab", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/tmp").chmod(0o1777)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)


# Programs, by where they are (not by the source's mode bits, which an install may not keep).
_PROGRAM_DIRS = ("usr/bin/", "usr/sbin/", "usr/local/bin/", "usr/local/sbin/", "usr/local/lib/lab/")


def _mode_for(rel: str) -> int:
    return 0o755 if rel.startswith(_PROGRAM_DIRS) else 0o644


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def _normalise_times(root: Path, since: float) -> list[tuple[str, int]]:
    """Packaged files keep their package's mtime; directories, links and the files this builder
    wrote (modified after `since`, when unpacking began) get EPOCH. Returns every path with its
    mtime, for the inode times on the image."""
    entries: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            st = path.lstat()
            packaged = stat.S_ISREG(st.st_mode) and 0 < st.st_mtime < since
            mtime = int(st.st_mtime) if packaged else EPOCH
            os.utime(path, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)
            entries.append(("/" + str(path.relative_to(root)), mtime))
    os.utime(root, ns=(EPOCH * 10**9, EPOCH * 10**9))
    entries.append(("/", EPOCH))
    return entries


# Debian 12's ext4 defaults, written out so the host's /etc/mke2fs.conf cannot change the image.
MKE2FS_CONF = """[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""


def make_ext4(
    tree: Path,
    out: Path,
    *,
    since: float,
    size: int,
    uuid: str,
    label: str,
    inodes: int | None = None,
    errors: str = "continue",
) -> None:
    """An ext4 image of tree at out, the same bytes for the same tree."""
    entries = _normalise_times(tree, since)
    conf = out.with_suffix(".mke2fs.conf")
    conf.write_text(MKE2FS_CONF)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH), "MKE2FS_CONFIG": str(conf)}
    with out.open("wb") as f:
        f.truncate(size)
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-U", uuid, "-L", label]
    argv += ["-E", f"hash_seed={uuid},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0"]
    argv += ["-e", errors, "-d", str(tree)]
    if inodes:
        argv += ["-N", str(inodes)]
    _run([*argv, str(out)], env=env)
    # mke2fs copies each inode's atime and ctime from the staging files: set them (and the
    # creation time) to the mtime, so nothing of this build's clock reaches the image.
    script = out.with_suffix(".debugfs")
    with script.open("w") as f:
        for path, mtime in entries:
            quoted = '"' + path.replace('"', '\\"') + '"'
            for field in ("atime", "ctime", "crtime"):
                f.write(f"sif {quoted} {field} {mtime}\n")
            for field in ("atime_extra", "ctime_extra", "crtime_extra", "mtime_extra"):
                f.write(f"sif {quoted} {field} 0\n")
    _run(["debugfs", "-w", "-f", str(script), str(out)], env=env)
    script.unlink()


def _to_qcow2(raw: Path, out: Path) -> None:
    _run(
        [
            "qemu-img",
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compat=1.1",
            str(raw),
            str(out),
        ]
    )


# -- the initramfs -------------------------------------------------------------------------------
class Cpio:
    """A deterministic newc cpio archive builder."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, int, int]] = {}

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | mode, b"", 0, 0))

    def _parent(self, name: str) -> str:
        name = name.strip("/")
        if "/" in name:
            self.add_dir(name.rsplit("/", 1)[0])
        return name

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries[self._parent(name)] = (stat.S_IFREG | mode, data, 0, 0)

    def add_symlink(self, name: str, target: str) -> None:
        self.entries[self._parent(name)] = (stat.S_IFLNK | 0o777, target.encode(), 0, 0)

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.entries[self._parent(name)] = (stat.S_IFCHR | mode, b"", major, minor)

    def bytes(self) -> bytes:
        out = io.BytesIO()
        for ino, name in enumerate([*sorted(self.entries), "TRAILER!!!"], start=1):
            mode, data, major, minor = self.entries.get(name, (0, b"", 0, 0))
            encoded = name.encode() + b"\0"
            fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(encoded), 0]
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


def initramfs(busybox: bytes, modules: list[Path]) -> bytes:
    """The gzip'd initramfs: busybox, the virtio modules, an init that mounts the root disk."""
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "newroot", "etc"):
        cpio.add_dir(d)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_file("bin/busybox", busybox, 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    for path in modules:
        cpio.add_file(f"lib/modules/{path.name}", path.read_bytes())
    cpio.add_file("etc/modules-order", ("\n".join(p.name for p in modules) + "\n").encode())
    cpio.add_file("init", (FILES / "initramfs" / "init").read_bytes(), 0o755)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6, filename="") as gz:
        gz.write(cpio.bytes())
    return out.getvalue()


# -- the whole image -----------------------------------------------------------------------------
def _staging_dir() -> str | None:
    """Where to assemble the trees: a tmpfs when there is room (mke2fs -d copies directories in
    the order the file system lists them; a tmpfs lists them in the order they were made)."""
    try:
        free = shutil.disk_usage(SHM).free
    except OSError:
        return None
    return SHM if free > 1024**3 else None


def staging_prefix(pid: int) -> str:
    """The name a build's staging directory starts with, in SHM or TMPDIR (the building process's
    PID in it: whoever stops a build it started can remove what the build could not)."""
    return f"bg-guest-{pid}-"


def find_image(cache: Path | None = None) -> GuestImage | None:
    """The image last built by this builder (no apt call, no hashing of .debs: fast), or None."""
    cache = cache or default_cache()
    try:
        current = json.loads((cache / "current.json").read_text())
    except (OSError, ValueError):
        return None
    if current.get("sources") != sources_hash():
        return None
    image = GuestImage(cache / "images" / str(current.get("image_id")), str(current["image_id"]))
    return image if image.complete() else None


def build(
    cache: Path | None = None, *, quiet: bool = False, progress: Progress | None = None
) -> GuestImage:
    """Build the image (or find it in the cache) and return it; progress gets a line per step."""
    cache = cache or default_cache()
    say = progress or (_quiet if quiet else lambda m: print(f"guest image: {m}", file=sys.stderr))
    found = find_image(cache)
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise GuestBuildError(
            "building the devvm image needs root (its files must belong to root, setuid sudo"
            " included): run 'bash scripts/lab.sh' or 'scripts/setup.sh guest' as root"
        )
    say("resolving the devvm's Debian packages with apt…")
    packages = resolve_packages()
    debs = fetch_debs(cache, packages, say)
    image_id = image_id_for(debs)
    target = cache / "images" / image_id
    image = GuestImage(target, image_id)
    (cache / "images").mkdir(parents=True, exist_ok=True)
    with (cache / "images" / f"{image_id}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others find it done
        if not image.complete():
            assemble(image, debs, say)
            _prune(cache, keep=image_id)
    (cache / "current.json").write_text(
        json.dumps({"image_id": image_id, "sources": sources_hash()}) + "\n"
    )
    say(f"image {image_id} ready in {target}")
    return image


def _prune(cache: Path, keep: str) -> None:
    """Remove the images this builder made before (a new one replaces them), and their saved
    states."""
    for directory in sorted((cache / "images").glob("*")):
        try:
            builder = json.loads((directory / "manifest.json").read_text()).get("builder")
        except (OSError, ValueError):
            continue
        if directory.name == keep or builder != BUILDER_VERSION or not directory.is_dir():
            continue
        shutil.rmtree(directory, ignore_errors=True)
        for saved in (cache / "saved").glob(f"{directory.name}-*"):
            if saved.is_dir():
                shutil.rmtree(saved, ignore_errors=True)
            else:
                saved.unlink(missing_ok=True)


def assemble(image: GuestImage, debs: list[Path], say: Progress = _quiet) -> None:
    """Make the image from these .deb files (the kernel's among them) into image.directory."""
    started = time.monotonic()
    kernel_deb = next(d for d in debs if re.match(r"linux-image-\d", d.name))
    userland = [d for d in debs if d is not kernel_deb]
    with tempfile.TemporaryDirectory(prefix=staging_prefix(os.getpid()), dir=_staging_dir()) as tmp:
        work = Path(tmp)
        kernel_root, root, data = work / "kernel", work / "root", work / "data"
        for d in (kernel_root, root, data):
            d.mkdir()
            d.chmod(0o755)
        unpacking = time.time() - 1
        say(f"unpacking {len(userland)} packages…")
        lists: dict[str, list[str]] = {}
        for i, deb in enumerate(sorted(userland, key=lambda p: p.name), start=1):
            lists[deb.name] = unpack(deb, root)
            if i % 25 == 0:
                say(f"unpacked {i}/{len(userland)} packages")
        _run(["dpkg-deb", "-x", str(kernel_deb), str(kernel_root)])
        kernels = sorted((kernel_root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise GuestBuildError("the kernel package held no /boot/vmlinuz-*")
        release = kernels[-1].name.removeprefix("vmlinuz-")
        modules = module_load_order(kernel_root / "lib/modules" / release, MODULES)
        say("configuring the root file system (users, sshd, sudo, the lab's service manager)…")
        write_dpkg_database(root, userland, lists)
        configure(root)
        for d in DATA_DIRS:
            (data / d).mkdir(parents=True)
        staging = work / "out"
        staging.mkdir()
        say("writing the ext4 root and data disks…")
        make_ext4(
            root,
            work / "root.raw",
            since=unpacking,
            size=ROOT_SIZE,
            uuid=ROOT_UUID,
            label="devvm-root",
            errors="remount-ro",
        )
        make_ext4(
            data,
            work / "data.raw",
            since=unpacking,
            size=DATA_SIZE,
            uuid=DATA_UUID,
            label="devvm-data",
            inodes=DATA_INODES,
        )
        _to_qcow2(work / "root.raw", staging / "root.qcow2")
        _to_qcow2(work / "data.raw", staging / "data.qcow2")
        shutil.copyfile(kernels[-1], staging / "vmlinuz")
        (staging / "initrd.gz").write_bytes(
            initramfs((root / "usr/bin/busybox").read_bytes(), modules)
        )
        (staging / "host_key.pub").write_text(host_key()[1] + "\n")
        manifest = {
            "builder": BUILDER_VERSION,
            "image_id": image.image_id,
            "kernel_release": release,
            "debs": {deb.name: _sha256(deb) for deb in sorted(debs, key=lambda p: p.name)},
            "sha256": {
                name: _sha256(staging / name)
                for name in ("vmlinuz", "initrd.gz", "root.qcow2", "data.qcow2")
            },
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        image.directory.parent.mkdir(parents=True, exist_ok=True)
        partial = image.directory.with_name(image.directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staging, partial)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(image.directory)
        partial.rename(image.directory)
    say(f"built in {time.monotonic() - started:.0f} s")


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
