"""The vLLM metrics each release really exposes, and the check that every metric an alert rule
(or a dashboard panel) uses is among them: a rename in a new release is refused before any host
changes, naming the metric, the file that uses it and the release that lacks it.

Each release's list (``inventories/releases/NAME.metrics``, roles/release/metrics.py) is captured
from a lab instance of that release, and the lab tests compare it with a live instance, so it
cannot go stale unseen; or it is derived from such a capture for a release of the same vLLM whose
engine wheel carries the same metrics code (roles/release/engine_source.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

from roles.errors import FleetConfigError
from roles.release.metrics import VLLM_PREFIX, metrics_file, release_metrics

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)")


def exposed_names(exposition: str) -> set[str]:
    """The sample names of a /metrics page in Prometheus's text format."""
    return {m.group(1) for line in exposition.splitlines()
            if not line.startswith("#") and (m := _SAMPLE.match(line))}


def check_release_metrics(release_name: str, releases_dir: Path, used: Mapping[str, Iterable[str]]) -> None:
    """Refuse when a file of ``used`` (file -> metric names it uses) needs a vLLM metric the
    release does not expose, or when the release's metrics were never captured."""
    available = release_metrics(release_name, releases_dir)
    if available is None:
        raise FleetConfigError(
            f"release {release_name}", f"has no list of the metrics it exposes ({metrics_file(release_name, releases_dir)}), "
            "so the alert rules and dashboards cannot be checked against it.",
            "capture it from a lab instance of the release: `curl -s http://INSTANCE/metrics`, its sample names "
            "one per line (see the other releases' .metrics files), and commit it beside the lock; or, for a "
            "release of a vLLM that a captured release also runs, `vllm-fleet release metrics "
            f"{release_name} --like CAPTURED`.")
    for file, names in used.items():
        missing = sorted(n for n in names if n.startswith(VLLM_PREFIX) and n not in available)
        if missing:
            raise FleetConfigError(
                f"release {release_name}: metric {missing[0]}",
                f"{file} uses {', '.join(missing)}, which release {release_name} does not expose (vLLM renamed "
                "or removed it): the panel or alert would go blank without a word.",
                f"use the release's name for it in {file} (the names are in "
                f"{metrics_file(release_name, releases_dir)}), or pin a release that exposes it.")
