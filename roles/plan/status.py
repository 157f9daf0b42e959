"""`vllm-fleet status`: per instance, its health, release, requests running and waiting, KV cache
usage, generated tokens per second and TTFT p50, from one of two sources:

- the fleet's Prometheus, over the last five minutes: the queries are here; the CLI runs them on
  the monitor host (Prometheus listens on its loopback) and hands the answers back;
- the instances themselves, over a sampling window: a script on each instance host reads every
  instance's /health and /metrics twice, a window apart; the arithmetic on the two readings (the
  same sums, increases and quantile as the queries') is here.

Both end as the same values per instance, which one table shows.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from roles.errors import FleetConfigError
from roles.plan.metrics import Sample, parse_exposition
from roles.release.metrics import VLLM_PREFIX

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
GENERATED = "vllm:generation_tokens_total"
TTFT_BUCKETS = "vllm:time_to_first_token_seconds_bucket"

WINDOW = "5m"
# Column -> PromQL, one value per (host, instance_name).
QUERIES: dict[str, str] = {
    "up": 'max by (host, instance_name, release) (up{job="vllm"})',
    "running": f"sum by (host, instance_name) ({RUNNING})",
    "waiting": f"sum by (host, instance_name) ({WAITING})",
    "kv": f"max by (host, instance_name) ({KV_CACHE})",
    "tokens_s": f"sum by (host, instance_name) (rate({GENERATED}[{WINDOW}]))",
    "ttft_p50": f"histogram_quantile(0.5, sum by (host, instance_name, le) (rate({TTFT_BUCKETS}[{WINDOW}])))",
}

# The direct view's sampling window, in seconds: long enough for counters to move, short enough
# to wait for (every host is sampled at once, so the whole view takes about one window).
DEFAULT_SAMPLE_S = 10.0
MIN_SAMPLE_S, MAX_SAMPLE_S = 1.0, 120.0


def header(window: str) -> tuple[str, ...]:
    """The table's header; ``window`` is what the rates and the quantile are taken over."""
    return ("instance", "health", "release", "running", "waiting", "KV cache", f"tokens/s ({window})",
            f"TTFT p50 ({window})")


def metric_names() -> set[str]:
    """The metrics the status view reads (checked against each release like the rules')."""
    # Here rather than at the top: the alerts bring jinja2, and the CLI's parser reads this module.
    from roles.plan.alerts import expression_metrics

    return {name for query in QUERIES.values() for name in expression_metrics(query)}


def sampled_metric_names() -> list[str]:
    """The metrics the direct view keeps of each /metrics page: the queries' vLLM ones (`up` is
    Prometheus's own)."""
    return sorted(name for name in metric_names() if name.startswith(VLLM_PREFIX))


def check_sample_window(seconds: float) -> float:
    """The direct view's sampling window, refused outside its bounds (NaN included)."""
    if not MIN_SAMPLE_S <= seconds <= MAX_SAMPLE_S:
        raise FleetConfigError("`vllm-fleet status --window`",
                               f"{seconds:g} s is no sampling window: under {MIN_SAMPLE_S:g} s counters barely "
                               f"move, and over {MAX_SAMPLE_S:g} s the view would keep you waiting.",
                               f"give {MIN_SAMPLE_S:g} to {MAX_SAMPLE_S:g} seconds (default {DEFAULT_SAMPLE_S:g}).")
    return seconds


# ---- from Prometheus ------------------------------------------------------------------------------

def _number(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


def prometheus_values(results: Mapping[str, list[Mapping[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Each instance's values, by (host, instance name), from Prometheus's answers (query column
    -> its vector result): only instances Prometheus scrapes (those `up` answers for)."""
    values: dict[tuple[str, str], dict[str, Any]] = {}
    for column, vector in results.items():
        for sample in vector:
            labels = sample["metric"]
            key = (labels.get("host", "?"), labels.get("instance_name", "?"))
            values.setdefault(key, {})[column] = _number(sample["value"][1])
            if column == "up":
                values[key]["release"] = labels.get("release", "?")
    return {key: v for key, v in values.items() if "up" in v}


# ---- straight from the instances ------------------------------------------------------------------

def sampled_values(first: Mapping[str, Any], second: Mapping[str, Any], release: str) -> dict[str, Any]:
    """One instance's values from the host script's two readings of it, a window apart (each:
    "health", /health's status or None; "metrics", its /metrics lines of sampled_metric_names() or None;
    "at", when /metrics was read, in seconds). The gauges are the second reading's; the rate and
    the quantile need both. Raises ValueError when a page is not Prometheus's text format."""
    values: dict[str, Any] = {"up": 1.0 if second["health"] == 200 else 0.0, "release": release}
    if second["metrics"] is None:
        return values
    now = parse_exposition(second["metrics"])
    values.update(running=total(now, RUNNING), waiting=total(now, WAITING), kv=_largest(now, KV_CACHE))
    if first["metrics"] is None:
        return values
    grown = increases(parse_exposition(first["metrics"]), now)
    seconds = second["at"] - first["at"]
    generated = total(grown, GENERATED)
    values.update(tokens_s=None if generated is None else generated / seconds,
                  ttft_p50=histogram_quantile(0.5, _buckets(grown, TTFT_BUCKETS)))
    return values


def total(samples: Iterable[Sample], name: str) -> float | None:
    """The sum over every series of ``name``; None when the page has none (unknown, not 0)."""
    found = [s.value for s in samples if s.name == name]
    return sum(found) if found else None


def _largest(samples: Iterable[Sample], name: str) -> float | None:
    found = [s.value for s in samples if s.name == name]
    return max(found) if found else None


def increases(before: Iterable[Sample], after: Iterable[Sample]) -> list[Sample]:
    """How much each series of ``after`` grew since ``before``, as Prometheus's increase() takes
    a counter between two samples: one that went down restarted from zero (the instance restarted
    in the window), so all of its value is new; one that was not there yet started in the window."""
    earlier = {(s.name, s.labels): s.value for s in before}
    grown = []
    for sample in after:
        start = earlier.get((sample.name, sample.labels), 0.0)
        grown.append(Sample(sample.name, sample.labels, sample.value - start if sample.value >= start else sample.value))
    return grown


def _buckets(samples: Iterable[Sample], name: str) -> dict[float, float]:
    """Histogram ``name``'s buckets summed over its series: upper bound (le) -> count."""
    buckets: dict[float, float] = {}
    for sample in samples:
        if sample.name == name and sample.label("le") is not None:
            bound = float(sample.label("le"))
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q``-quantile of cumulative ``buckets`` (upper bound -> count) as Prometheus's
    histogram_quantile() computes it: linear inside the bucket the rank falls in, the highest
    finite bound when it falls in the +Inf bucket. None where Prometheus answers NaN: no +Inf
    bucket, fewer than two buckets, or no observation."""
    bounds = sorted(buckets)
    if len(bounds) < 2 or bounds[-1] != math.inf:
        return None
    counts, highest = [], 0.0
    for bound in bounds:  # a bucket counted lower than the one below it is read as equal (as Prometheus does)
        highest = max(highest, buckets[bound])
        counts.append(highest)
    if counts[-1] == 0:
        return None
    rank = q * counts[-1]
    b = next((i for i, count in enumerate(counts[:-1]) if count >= rank), len(bounds) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, below = (bounds[b - 1], counts[b - 1]) if b > 0 else (0.0, 0.0)
    return start + (bounds[b] - start) * (rank - below) / (counts[b] - below)


# ---- the table --------------------------------------------------------------------------------------

def rows(values: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """The table's rows, one per instance (values by (host, instance name)), in host and name order."""
    return [_row(host, name, values[(host, name)]) for host, name in sorted(values)]


def _row(host: str, name: str, v: Mapping[str, Any]) -> tuple[str, ...]:
    def show(column: str, form: str) -> str:
        return "-" if v.get(column) is None else form.format(v[column])

    return (f"{host}:{name}", "up" if v.get("up") == 1 else "DOWN", v.get("release", "?"), show("running", "{:.0f}"),
            show("waiting", "{:.0f}"), show("kv", "{:.0%}"), show("tokens_s", "{:.1f}"),
            "-" if v.get("ttft_p50") is None else f"{v['ttft_p50'] * 1000:.0f} ms")


def table(values: Mapping[tuple[str, str], Mapping[str, Any]], window: str) -> str:
    """The status view as aligned text; ``window`` is the one the header names."""
    lines = [header(window), *rows(values)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
