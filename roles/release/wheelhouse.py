"""The wheelhouse: every wheel of a lock downloaded once on the control node and checked against its
hash, from which the fleet's artifact cache is sent what it lacks; hosts install with ``--no-index``
and never reach a registry."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from roles.common import ArtifactFile, sha256_file
from roles.errors import FleetConfigError
from roles.release.lock import LOCK_LINE_RE, Lock, index_args
from roles.release.manifest import load_release

WHEELHOUSE_CACHE = Path("~/.cache/vllm-fleet/wheelhouse").expanduser()
"""Control-node cache of downloaded wheels, one folder per lock digest."""




def _locked_hashes(lock: Lock) -> dict[tuple[str, Version], str]:
    """(name, version) -> sha256 of each lock line."""
    matches = (LOCK_LINE_RE.fullmatch(line) for line in lock.requirements)
    return {(canonicalize_name(m["name"]), Version(m["version"])): m["sha256"] for m in matches}


def _wheels_of(lock: Lock, folder: Path) -> dict[tuple[str, Version], Path]:
    """The wheel file in ``folder`` of each lock line there is one for."""
    wanted = _locked_hashes(lock)
    found = {}
    for wheel in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if (name, version) in wanted:
            found[(name, version)] = wheel
    return found


def _verified_wheels(lock: Lock, folder: Path) -> list[Path]:
    """The wheel file for each lock line, checked against its hash; an error names what is off."""
    wanted, found = _locked_hashes(lock), _wheels_of(lock, folder)
    missing = sorted(f"{n}=={v}" for n, v in wanted.keys() - found.keys())
    corrupt = sorted(p.name for key, p in found.items() if sha256_file(p) != wanted[key])
    if missing or corrupt:
        raise FleetConfigError(f"wheelhouse {folder}", f"missing {missing}, hash mismatch {corrupt}.",
                               f"delete {folder} and run `vllm-fleet release wheelhouse {lock.release}` again.")
    return sorted(found.values())


def build_wheelhouse(lock: Lock, cache_root: Path = WHEELHOUSE_CACHE) -> Path:
    """Download and verify every wheel of ``lock`` into ``<cache_root>/<digest[:16]>/``.

    ``COMPLETE`` marks a folder whose every wheel was checked; the artifact cache is sent from it.
    """
    folder = cache_root / lock.digest[:16]
    if (folder / "COMPLETE").exists():
        return folder
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if (running, platform.machine()) != (lock.python, lock.machine):
        raise FleetConfigError(f"wheelhouse for {lock.release}",
                               f"the lock is for Python {lock.python} on {lock.machine}, this is Python {running}"
                               f" on {platform.machine()}: pip would fetch the wrong wheels.",
                               f"run `python{lock.python} -m roles.cli release wheelhouse {lock.release}` on a"
                               f" {lock.machine} control node.")
    release = load_release(lock.release, lock.path.parent)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"release: downloading {len(lock.requirements)} wheels for {lock.release} into {folder} ...", flush=True)
    started = time.monotonic()
    # Wheels already in the folder from an interrupted run are re-checked, not fetched again.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                    "--only-binary=:all:", "--quiet", *index_args(release.index),
                    "-r", str(lock.path), "-d", str(folder)], check=True)
    wheels = _verified_wheels(lock, folder)
    size_mb = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"release: {len(wheels)} wheels verified, {size_mb:.0f} MB in {time.monotonic() - started:.0f} s",
          flush=True)
    # Written last: a folder without it is an interrupted build and is resumed, never used.
    (folder / "COMPLETE").write_text(lock.digest + "\n")
    return folder


def wheel_files(lock: Lock) -> tuple[ArtifactFile, ...]:
    """Every wheel of ``lock`` as hosts fetch it (file name, size, the lock's sha256), from its
    wheelhouse, downloaded first if need be (verified then: the folder's COMPLETE says so)."""
    folder = build_wheelhouse(lock)
    wanted = _locked_hashes(lock)
    return tuple(sorted((ArtifactFile(path.name, path.stat().st_size, sha256=wanted[key])
                         for key, path in _wheels_of(lock, folder).items()), key=lambda f: f.path))
