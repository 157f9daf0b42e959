"""The wheelhouse: every wheel of a lock downloaded once on the control node, checked against its
hash and tarred for pushing, so hosts install with ``--no-index`` and never reach a registry."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from roles.common import sha256_file
from roles.errors import FleetConfigError
from roles.release.lock import LOCK_LINE_RE, Lock, index_args
from roles.release.manifest import load_release

WHEELHOUSE_CACHE = Path("~/.cache/vllm-fleet/wheelhouse").expanduser()
"""Control-node cache of downloaded wheels, one folder per lock digest."""




def _verified_wheels(lock: Lock, folder: Path) -> list[Path]:
    """The wheel file for each lock line, checked against its hash; an error names what is off."""
    wanted = {}
    for line in lock.requirements:
        match = LOCK_LINE_RE.fullmatch(line)
        wanted[(canonicalize_name(match["name"]), Version(match["version"]))] = match["sha256"]
    found = {}
    for wheel in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if (name, version) in wanted:
            found[(name, version)] = wheel
    missing = sorted(f"{n}=={v}" for n, v in wanted.keys() - found.keys())
    corrupt = sorted(p.name for key, p in found.items() if sha256_file(p) != wanted[key])
    if missing or corrupt:
        raise FleetConfigError(f"wheelhouse {folder}", f"missing {missing}, hash mismatch {corrupt}.",
                               f"delete {folder} and run `vllm-fleet release wheelhouse {lock.release}` again.")
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
