"""The arithmetic of `vllm-fleet bench --routing` and `--overhead`, from what was measured: pure.

Routing: each policy's fleet prefix-cache hit rate (the instances' ``vllm:prefix_cache_hits`` over
``vllm:prefix_cache_queries``, both counted in prompt tokens, increased over the policy's runs),
and its load balance (requests each instance finished, max over min). Overhead: the same instance
reached directly and through the edge with it as the only upstream; the edge's output tokens/s
over the direct one's and its TTFT p50/p99 minus the direct one's, each the median over the
interleaved repeats (the 2-core lab's back-to-back pairs swing by about 20%).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping

from roles.plan.metrics import parse_exposition
from roles.plan.status import increases, total

PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
FINISHED = "vllm:request_success_total"
COUNTERS = (PREFIX_HITS, PREFIX_QUERIES, FINISHED)
# The goals the overhead is held to (issue 13): what an edge may cost.
OVERHEAD_MIN_THROUGHPUT_RATIO = 0.98
OVERHEAD_MAX_TTFT_P50_MS = 2.0


def counter_increases(before: str, after: str) -> dict[str, float]:
    """How much each of COUNTERS grew on one instance between two /metrics pages (its series
    summed; a counter that went down restarted, so all of its value is new)."""
    grown = increases(parse_exposition(before), parse_exposition(after))
    return {name: total(grown, name) or 0.0 for name in COUNTERS}


@dataclass(frozen=True)
class PolicyOutcome:
    """What the instances counted while one routing policy served the workload."""

    policy: str
    hits: float  # prompt tokens served from the prefix cache
    queries: float  # prompt tokens looked up in it
    finished: Mapping[str, float]  # instance -> requests it finished

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    @property
    def balance(self) -> float | None:
        """Requests of the busiest instance over the idlest's; None when one served none."""
        counts = list(self.finished.values())
        return max(counts) / min(counts) if counts and min(counts) > 0 else None

    def as_dict(self) -> dict:
        return {"policy": self.policy, "prefix_cache_hits": self.hits, "prefix_cache_queries": self.queries,
                "hit_rate": self.hit_rate, "finished_per_instance": dict(self.finished), "balance": self.balance}


def policy_outcome(policy: str, grown: Mapping[str, Mapping[str, float]]) -> PolicyOutcome:
    """The fleet's outcome from each instance's ``counter_increases`` (instance -> increases),
    summed over every run of the policy."""
    return PolicyOutcome(policy, sum(g[PREFIX_HITS] for g in grown.values()),
                         sum(g[PREFIX_QUERIES] for g in grown.values()),
                         {instance: g[FINISHED] for instance, g in grown.items()})


def add_increases(into: dict[str, dict[str, float]], grown: Mapping[str, Mapping[str, float]]) -> None:
    """Sum one run's increases per instance into ``into`` (a policy's several runs)."""
    for instance, counts in grown.items():
        mine = into.setdefault(instance, dict.fromkeys(COUNTERS, 0.0))
        for name, value in counts.items():
            mine[name] += value


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@dataclass(frozen=True)
class Overhead:
    """The edge against the same instance reached directly, medians over interleaved repeats."""

    throughput_ratio: float | None  # edge output tokens/s over direct
    ttft_p50_ms: float | None  # edge minus direct
    ttft_p99_ms: float | None
    requests: Mapping[str, int]  # target -> requests completed over all repeats
    failed: Mapping[str, int]

    @property
    def meets_goal(self) -> bool:
        return (self.throughput_ratio is not None and self.ttft_p50_ms is not None
                and self.throughput_ratio >= OVERHEAD_MIN_THROUGHPUT_RATIO
                and self.ttft_p50_ms <= OVERHEAD_MAX_TTFT_P50_MS)

    def as_dict(self) -> dict:
        return {"throughput_ratio": self.throughput_ratio, "ttft_p50_diff_ms": self.ttft_p50_ms,
                "ttft_p99_diff_ms": self.ttft_p99_ms, "requests": dict(self.requests), "failed": dict(self.failed),
                "goal": {"min_throughput_ratio": OVERHEAD_MIN_THROUGHPUT_RATIO,
                         "max_ttft_p50_diff_ms": OVERHEAD_MAX_TTFT_P50_MS}, "meets_goal": self.meets_goal}


def overhead(pairs: Iterable[tuple[Mapping, Mapping]]) -> Overhead:
    """The overhead from (direct result, edge result) pairs of `vllm bench serve` results measured
    back to back: each pair's ratio and differences, then their medians (a pair shares the
    machine's state of that moment; medians of the two sides alone would not)."""
    pairs = list(pairs)
    ratios = [e["output_throughput"] / d["output_throughput"] for d, e in pairs if d.get("output_throughput")]
    return Overhead(
        throughput_ratio=_median(ratios),
        ttft_p50_ms=_median(e["p50_ttft_ms"] - d["p50_ttft_ms"] for d, e in pairs),
        ttft_p99_ms=_median(e["p99_ttft_ms"] - d["p99_ttft_ms"] for d, e in pairs),
        requests={"direct": sum(d["completed"] for d, _ in pairs), "edge": sum(e["completed"] for _, e in pairs)},
        failed={"direct": sum(d.get("failed", 0) for d, _ in pairs), "edge": sum(e.get("failed", 0) for _, e in pairs)})


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def routing_table(outcomes: Iterable[PolicyOutcome], results: Mapping[str, Iterable[Mapping]]) -> str:
    """One row per policy: hit rate, TTFT p50/p99 and output tokens/s (medians over its runs'
    `vllm bench serve` results in ``results``), requests per instance and their balance."""
    header = ("policy", "prefix-cache hit rate", "TTFT p50", "TTFT p99", "output tok/s", "requests per instance",
              "max/min")
    rows = [header]
    for o in outcomes:
        runs = list(results.get(o.policy, ()))
        rows.append((o.policy, _fmt(None if o.hit_rate is None else 100 * o.hit_rate, ".1f", "%"),
                     _fmt(_median(r.get("p50_ttft_ms") for r in runs), ".1f", " ms"),
                     _fmt(_median(r.get("p99_ttft_ms") for r in runs), ".1f", " ms"),
                     _fmt(_median(r.get("output_throughput") for r in runs), ".1f"),
                     " ".join(f"{int(n)}" for _, n in sorted(o.finished.items())),
                     _fmt(o.balance, ".2f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def overhead_lines(result: Overhead, instance: str) -> list[str]:
    """The overhead as the command prints it."""
    verdict = "meets" if result.meets_goal else "misses"
    return [f"LB overhead on {instance} (nginx with it as the only upstream vs direct, medians of pairs):",
            f"  output tokens/s through the edge: {_fmt(result.throughput_ratio and 100 * result.throughput_ratio, '.1f', '%')}"
            f" of direct (goal >= {100 * OVERHEAD_MIN_THROUGHPUT_RATIO:.0f}%)",
            f"  TTFT p50 {_fmt(result.ttft_p50_ms, '+.1f', ' ms')} (goal <= +{OVERHEAD_MAX_TTFT_P50_MS:g} ms), "
            f"TTFT p99 {_fmt(result.ttft_p99_ms, '+.1f', ' ms')}",
            f"  requests: {result.requests['direct']} direct, {result.requests['edge']} through the edge; failed: "
            f"{result.failed['direct']} direct, {result.failed['edge']} through the edge; {verdict} the goal"]
