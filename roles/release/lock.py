"""Release locks: a manifest resolved once, on the control node, into every package at one
version with its sha256 (``<name>.lock``), so every host installs the same bytes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from roles.common import sha256_file
from roles.errors import FleetConfigError
from roles.release.manifest import Index, Release, manifest_path

LOCK_LINE_RE = re.compile(r"(?P<name>\S+)==(?P<version>\S+) --hash=sha256:(?P<sha256>[0-9a-f]{64})")


@dataclass(frozen=True)
class Lock:
    """A parsed ``<name>.lock``, checked to be current with its manifest."""

    path: Path
    release: str
    manifest_sha256: str
    python: str
    machine: str
    requirements: tuple[str, ...]  # "name==version --hash=sha256:<hex>", sorted by name
    digest: str  # sha256 of the lock file's bytes: what a host records once its install is complete


def lock_path(release: Release, releases_dir: Path) -> Path:
    return releases_dir / f"{release.name}.lock"


def lock_command(name: str) -> str:
    return f"vllm-fleet release lock {name}"


def index_args(index: Index) -> list[str]:
    args = ["--index-url", index.index_url] if index.index_url else []
    for url in index.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in index.find_links:
        args += ["--find-links", link]
    return args


def _python_for(release: Release, releases_dir: Path) -> str:
    """An interpreter of the release's major.minor: wheels and markers are chosen for it."""
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running == release.python:
        return sys.executable
    candidate = shutil.which(f"python{release.python}")
    if candidate:
        return candidate
    raise FleetConfigError(f"python in {manifest_path(release.name, releases_dir)}",
                           f"the release is for Python {release.python}, but this command runs on {running} and"
                           f" there is no python{release.python} on PATH.",
                           f"install Python {release.python} on the control node and run"
                           f" `python{release.python} -m roles.cli release ...`.")


# Local version labels of builds for one accelerator only ("2.13.0+cpu", "2.13.0+cu130").
_ACCELERATOR_LABEL_RE = re.compile(r"\+(cpu|cu\d+|rocm[\d.]+)$")


def _check_build_matches_accelerator(release: Release, name: str, version: str, url: str) -> None:
    """Refuse a build for another accelerator: an ``==2.13.0`` pin also matches ``2.13.0+cpu``, and
    pip prefers the local build when a wheel folder offers one, so a GPU release can silently
    lock CPU torch (and the reverse)."""
    label = _ACCELERATOR_LABEL_RE.search(version)
    if label is None:
        return
    wrong = (label.group(1) == "cpu") != (release.accelerator == "cpu")
    if wrong:
        raise FleetConfigError(f"packages in the release {release.name}",
                               f"{name} resolved to {version} ({url}), a build for "
                               f"{'CPUs' if label.group(1) == 'cpu' else label.group(1)}, but the release is for "
                               f"{release.accelerator} hosts.",
                               "resolve from an index that serves the right build (the manifest's index settings), "
                               "or without the wheel folder that offers this one (PIP_FIND_LINKS, find-links in "
                               "pip's configuration).")


def lock_text(release: Release, manifest_sha256: str, report: dict[str, Any]) -> str:
    """The lock file for a ``pip install --report`` resolution, excluded packages dropped."""
    excluded = {canonicalize_name(pkg) for pkg in release.exclude}
    lines = {}
    for item in report["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        if name in excluded:
            continue
        info = item["download_info"]
        sha256 = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        if not sha256 or not info["url"].endswith(".whl"):
            raise FleetConfigError(f"packages in the release {release.name}",
                                   f"{name} resolved to {info['url']}, which is not a wheel with a sha256.",
                                   f"pin a version of {name} that has a wheel for Python {release.python},"
                                   f" or exclude it.")
        _check_build_matches_accelerator(release, name, item["metadata"]["version"], info["url"])
        lines[name] = f"{name}=={item['metadata']['version']} --hash=sha256:{sha256}"
    environment = report["environment"]
    header = [
        f"# release: {release.name}",
        f"# manifest-sha256: {manifest_sha256}",
        f"# python: {environment['python_version']}",
        f"# machine: {environment['platform_machine']}",
        f"# generated by `{lock_command(release.name)}`; do not edit",
    ]
    return "\n".join(header + [lines[name] for name in sorted(lines)]) + "\n"


def resolve_lock(release: Release, releases_dir: Path) -> Path:
    """Resolve the manifest with pip (no install) and write ``<name>.lock`` beside it."""
    python = _python_for(release, releases_dir)
    with tempfile.TemporaryDirectory(prefix="vllm-fleet-lock-") as tmp:
        report_file = Path(tmp) / "report.json"
        command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report_file), *index_args(release.index), *release.requirements]
        print(f"release: resolving {release.name} with {python} ...", flush=True)
        if subprocess.run(command).returncode != 0:
            raise FleetConfigError(f"release {release.name}: packages",
                                   "pip cannot resolve these pins together (its reason is printed above).",
                                   f"change the pins in {manifest_path(release.name, releases_dir)} to versions "
                                   f"the engine {release.engine.distribution}=={release.engine.version} accepts.")
        report = json.loads(report_file.read_text())
    text = lock_text(release, sha256_file(manifest_path(release.name, releases_dir)), report)
    path = lock_path(release, releases_dir)
    path.write_text(text)
    return path


def read_lock(path: Path) -> Lock:
    """Parse a lock and check it still belongs to the manifest beside it."""
    name = path.name.removesuffix(".lock")
    if not path.is_file():
        raise FleetConfigError("release lock", f"{path} does not exist.", f"run `{lock_command(name)}`.")
    data = path.read_bytes()
    header: dict[str, str] = {}
    requirements = []
    for number, line in enumerate(data.decode().splitlines(), 1):
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            header[key] = value
        elif line and not line.startswith("#"):
            if not LOCK_LINE_RE.fullmatch(line):
                raise FleetConfigError(f"line {number} of {path}", f"{line!r} is not `name==version --hash=...`.",
                                       f"do not edit lock files; run `{lock_command(name)}`.")
            requirements.append(line)
    missing = [key for key in ("release", "manifest-sha256", "python", "machine") if key not in header]
    if missing:
        raise FleetConfigError(str(path), f"the header lacks {', '.join(missing)}.",
                               f"do not edit lock files; run `{lock_command(name)}`.")
    manifest = path.with_name(f"{header['release']}.yml")
    if not manifest.is_file() or sha256_file(manifest) != header["manifest-sha256"]:
        raise FleetConfigError(str(path), f"is stale: {manifest} changed (or is gone) since the lock was written.",
                               f"run `{lock_command(header['release'])}` and commit the new lock.")
    return Lock(path=path, release=header["release"], manifest_sha256=header["manifest-sha256"],
                python=header["python"], machine=header["machine"], requirements=tuple(requirements),
                digest=hashlib.sha256(data).hexdigest())
