"""What the Containerfile says, checked without building (the build itself: test_image.py)."""

from __future__ import annotations

import json
import re
import tomllib

import yaml

from tests.image.images import REPO

CONTAINERFILE = (REPO / "Containerfile").read_text()
VALUES = yaml.safe_load((REPO / "helm" / "breakglass" / "values.yaml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in CONTAINERFILE.splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def args(word: str) -> list[str]:
    return [rest for w, rest in instructions() if w == word]


def test_the_base_is_debian_slim_pinned_by_digest_as_a_build_argument() -> None:
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", CONTAINERFILE, flags=re.M)
    assert default, "BASE_IMAGE must be a build argument with a default"
    assert re.fullmatch(
        r"docker\.io/library/debian:bookworm-slim@sha256:[0-9a-f]{64}", default.group(1)
    )
    assert args("FROM") == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]


def test_debians_python_and_the_packages_the_app_runs_need() -> None:
    final_stage = CONTAINERFILE.split("FROM ${BASE_IMAGE}\n", 1)[1]
    apt = next(a for a in args("RUN") if "apt-get" in a and "openssh-client" in a)
    for package in ("python3", "openssh-client", "tini"):
        assert re.search(rf"\b{package}\b", apt), package
    assert "--no-install-recommends" in apt
    assert "rm -rf /var/lib/apt/lists/*" in final_stage
    assert "pip" not in final_stage.split("COPY --from=builder", 1)[0], "no pip in the final image"


def test_python_packages_come_only_from_the_hashed_lock() -> None:
    runs = " ".join(args("RUN"))
    installs = re.findall(r"pip --python \S+ install [^&]*", runs)
    assert len(installs) == 3, installs
    locked = [i for i in installs if "-r /src/requirements/" in i]
    assert len(locked) == 2
    for install in locked:
        assert "--require-hashes" in install and "--only-binary=:all:" in install
    [app] = [i for i in installs if i not in locked]
    assert "--no-index --no-deps" in app, "the app's own wheel brings no dependency of its own"
    assert "wheel --no-index --no-build-isolation --no-deps" in runs


def test_the_ca_bundle_is_a_build_secret_never_copied() -> None:
    for copy in args("COPY") + args("ADD"):
        assert "cert" not in copy and ".crt" not in copy and "secret" not in copy, copy
    secret_runs = [a for a in args("RUN") if "/run/secrets/ca-bundle" in a]
    assert secret_runs, "the download steps take the CA bundle as a secret"
    for run in secret_runs:
        assert run.startswith("--mount=type=secret,id=ca-bundle")


def test_numeric_non_root_user_the_chart_names_and_tini_as_pid_1() -> None:
    [user] = args("USER")
    uid, _, gid = user.partition(":")
    assert int(uid) == VALUES["securityContext"]["runAsUser"]
    assert int(gid) == VALUES["securityContext"]["runAsGroup"]
    [entrypoint] = args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--", "breakglass-serve"]
    assert args("EXPOSE") == [str(VALUES["server"]["port"])]
    assert "PYTHONDONTWRITEBYTECODE=1" in CONTAINERFILE


def test_oci_labels_and_the_version_default_is_the_projects() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}" in CONTAINERFILE
    label = " ".join(args("LABEL"))
    for key, arg in (("source", "SOURCE"), ("version", "VERSION"), ("revision", "REVISION")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in label, key


def test_the_build_context_is_what_the_containerfile_copies() -> None:
    ignore = (REPO / ".containerignore").read_text()
    assert (REPO / ".dockerignore").read_text() == ignore, "docker and buildah see one context"
    allowed = {line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")}
    copied = set()
    for copy in args("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _destination = copy.split()
        copied |= set(sources)
    assert copied == allowed, "COPY sources and .containerignore's allowlist differ"
    for path in copied:
        assert (REPO / path).exists(), path
