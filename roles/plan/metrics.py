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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from roles.errors import FleetConfigError
from roles.release.metrics import VLLM_PREFIX, metrics_file, release_metrics

# A sample line of Prometheus's text format: NAME[{LABELS}] VALUE [TIMESTAMP]. The labels are
# matched greedily up to the last "}" before the value: a label value may hold "}" itself.
_SAMPLE = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?[ \t]+"
                     r"([+-]?(?:Inf|NaN|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?))(?:[ \t]+-?[0-9]+)?")
_LABEL = re.compile(r'[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(?:,|$)')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class Sample:
    """One sample of a /metrics page: its series (the name, and the labels sorted by name, so one
    series is one key whatever order the page gives them in) and its value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


def parse_exposition(exposition: str) -> list[Sample]:
    """The samples of a /metrics page in Prometheus's text format; comments and blank lines are
    skipped. A line that is no sample is refused with ValueError, naming it: a page misread would
    show wrong numbers rather than none."""
    return [_sample(line.strip()) for line in exposition.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _sample(line: str) -> Sample:
    match = _SAMPLE.fullmatch(line)
    labels = _labels(match.group(2) or "") if match else None
    if labels is None:
        raise ValueError(f"not a sample line of Prometheus's text format: {line!r}")
    return Sample(match.group(1), labels, float(match.group(3)))


def _labels(text: str) -> tuple[tuple[str, str], ...] | None:
    """NAME="VALUE" pairs, comma-separated (a trailing comma allowed); None when ``text`` is not."""
    labels, position = {}, 0
    while position < len(text):
        match = _LABEL.match(text, position)
        if match is None:
            return None
        labels[match.group(1)] = re.sub(r'\\[\\"n]', lambda escape: _ESCAPES[escape.group(0)], match.group(2))
        position = match.end()
    return tuple(sorted(labels.items()))


def exposed_names(exposition: str) -> set[str]:
    """The sample names of a /metrics page in Prometheus's text format."""
    return {sample.name for sample in parse_exposition(exposition)}


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
