"""The vLLM metric names each release exposes, ``inventories/releases/NAME.metrics`` beside its
lock: captured from a lab instance of the release (the lab tests compare it with a live one), or
derived from such a capture for a release of the same vLLM (roles/release/engine_source.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SUFFIX = ".metrics"
# Only vLLM's own names are pinned to the release; node_*, nginx_* and vllm_fleet_* are not its.
VLLM_PREFIX = "vllm:"


def metrics_file(release_name: str, releases_dir: Path) -> Path:
    return Path(releases_dir) / f"{release_name}{SUFFIX}"


def release_metrics(release_name: str, releases_dir: Path) -> frozenset[str] | None:
    """The names release ``release_name`` exposes, or None when none was captured."""
    path = metrics_file(release_name, releases_dir)
    if not path.is_file():
        return None
    return frozenset(line.strip() for line in path.read_text().splitlines()
                     if line.strip() and not line.startswith("#"))


def metrics_text(names: Iterable[str], header: Iterable[str]) -> str:
    """A release's metrics file: ``header`` as comments (where the names come from), then the
    vLLM names, one per line, sorted."""
    comments = [f"# {line}".rstrip() for line in header]
    return "\n".join([*comments, *sorted(n for n in names if n.startswith(VLLM_PREFIX))]) + "\n"
