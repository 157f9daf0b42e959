"""`vllm-fleet status`: per instance, its health, release, requests running and waiting, KV cache
usage, generated tokens per second and TTFT p50 over the last five minutes, as the fleet's
Prometheus sees them. The queries and the table are here; the CLI runs the queries on the
monitor host (Prometheus listens on its loopback) and hands the answers back.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from roles.plan.alerts import expression_metrics

WINDOW = "5m"
# Column -> PromQL, one value per (host, instance_name).
QUERIES: dict[str, str] = {
    "up": 'max by (host, instance_name, release) (up{job="vllm"})',
    "running": "sum by (host, instance_name) (vllm:num_requests_running)",
    "waiting": "sum by (host, instance_name) (vllm:num_requests_waiting)",
    "kv": "max by (host, instance_name) (vllm:kv_cache_usage_perc)",
    "tokens_s": f"sum by (host, instance_name) (rate(vllm:generation_tokens_total[{WINDOW}]))",
    "ttft_p50": "histogram_quantile(0.5, sum by (host, instance_name, le) "
                f"(rate(vllm:time_to_first_token_seconds_bucket[{WINDOW}])))",
}
HEADER = ("instance", "health", "release", "running", "waiting", "KV cache", f"tokens/s ({WINDOW})",
          f"TTFT p50 ({WINDOW})")


def metric_names() -> set[str]:
    """The metrics the status view reads (checked against each release like the rules')."""
    return {name for query in QUERIES.values() for name in expression_metrics(query)}


def _number(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


def rows(results: Mapping[str, list[Mapping[str, Any]]]) -> list[tuple[str, ...]]:
    """The table's rows from Prometheus's answers (query column -> its vector result), one per
    instance Prometheus scrapes, in host and name order."""
    values: dict[tuple[str, str], dict[str, Any]] = {}
    for column, vector in results.items():
        for sample in vector:
            labels = sample["metric"]
            key = (labels.get("host", "?"), labels.get("instance_name", "?"))
            values.setdefault(key, {})[column] = _number(sample["value"][1])
            if column == "up":
                values[key]["release"] = labels.get("release", "?")
    return [_row(host, name, values[(host, name)]) for host, name in sorted(values) if "up" in values[(host, name)]]


def _row(host: str, name: str, v: Mapping[str, Any]) -> tuple[str, ...]:
    def show(column: str, form: str) -> str:
        return "-" if v.get(column) is None else form.format(v[column])

    return (f"{host}:{name}", "up" if v.get("up") == 1 else "DOWN", v.get("release", "?"), show("running", "{:.0f}"),
            show("waiting", "{:.0f}"), show("kv", "{:.0%}"), show("tokens_s", "{:.1f}"),
            "-" if v.get("ttft_p50") is None else f"{v['ttft_p50'] * 1000:.0f} ms")


def table(results: Mapping[str, list[Mapping[str, Any]]]) -> str:
    """The status view as aligned text."""
    lines = [HEADER, *rows(results)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
