"""`vllm-fleet bench`'s pure part: what a run measures (targets, workload, sweep points), the
flags of vLLM's own `vllm bench serve` for one point, the checks of the command line's values,
the summary of one point's result, medians over repeats, the run record and the table.

No pyinfra and no subprocess here: ``roles.bench`` runs the points, ``roles.bench_plot`` draws them.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from roles.errors import FleetConfigError
from roles.plan.edge import Secret

RECORD_KIND = "vllm-fleet-bench"
RECORD_VERSION = 1

# Bounds of one invocation: a benchmark is traffic a fleet's real clients share.
MAX_NUM_PROMPTS = 2000
MAX_CONCURRENCY = 256
MAX_RATE = 1000.0
MAX_POINTS = 32
MAX_REPEAT = 20

DATASETS = ("random", "shared-prefix")
# vLLM's --goodput takes request-level SLOs only: ITL is per token, so it is no key there.
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
AXES = {"concurrency": "concurrency (requests in flight)", "rate": "request rate (requests/s)"}

# vllm bench serve's per-request lists: one entry per request, too big to keep per point.
PER_REQUEST_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "queue_times",
                    "generated_texts", "errors")
# The figures the table and the plot read (all in vLLM's result: ms, requests/s, tokens/s).
METRICS = ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
           "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "p50_tpot_ms", "p99_tpot_ms",
           "p50_e2el_ms", "p99_e2el_ms", "mean_ttft_ms", "median_ttft_ms", "mean_itl_ms", "median_itl_ms",
           "duration", "completed", "failed")


@dataclass(frozen=True)
class Target:
    """One endpoint a run measures: ``base_url`` without /v1, the key sent as OPENAI_API_KEY (never
    in argv, never in a repr), the CA its TLS certificate is checked against (None: plain HTTP or the
    system's CAs), the model name it serves and a tokenizer folder (or hub id) for vLLM's prompts."""

    label: str
    kind: str  # "edge" or "direct"
    base_url: str
    api_key: Secret = field(repr=False)
    ca_file: Path | None
    served_model: str
    tokenizer: str
    host: str = ""  # the host behind base_url, for messages

    def describe(self) -> dict[str, Any]:
        """What a run record keeps of the target: everything but the key."""
        return {"label": self.label, "kind": self.kind, "base_url": self.base_url, "host": self.host,
                "ca_file": str(self.ca_file) if self.ca_file else None, "served_model": self.served_model,
                "tokenizer": self.tokenizer}


@dataclass(frozen=True)
class Workload:
    """The prompts of every point: vLLM's random dataset (``input_len`` tokens in, ``output_len``
    out) or its prefix_repetition one (``num_prefixes`` shared prefixes of ``prefix_len`` tokens, each
    with its own ``suffix_len`` tokens). Outputs run to their length (--ignore-eos): a random-weight
    model stops anywhere otherwise, and then tokens/s measures the model's luck."""

    dataset: str = "random"
    input_len: int = 128
    output_len: int = 32
    prefix_len: int = 256
    suffix_len: int = 64
    num_prefixes: int = 4
    seed: int = 0

    def vllm_args(self) -> list[str]:
        if self.dataset == "random":
            data = ["--dataset-name", "random", "--random-input-len", str(self.input_len),
                    "--random-output-len", str(self.output_len)]
        else:
            data = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(self.prefix_len),
                    "--prefix-repetition-suffix-len", str(self.suffix_len),
                    "--prefix-repetition-num-prefixes", str(self.num_prefixes),
                    "--prefix-repetition-output-len", str(self.output_len)]
        return [*data, "--ignore-eos", "--seed", str(self.seed)]

    def describe(self) -> str:
        if self.dataset == "random":
            return f"random {self.input_len} in / {self.output_len} out"
        return (f"shared-prefix {self.num_prefixes}×{self.prefix_len} prefix + {self.suffix_len} in / "
                f"{self.output_len} out")

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "input_len": self.input_len, "output_len": self.output_len,
                "prefix_len": self.prefix_len, "suffix_len": self.suffix_len, "num_prefixes": self.num_prefixes,
                "seed": self.seed, "description": self.describe()}


@dataclass(frozen=True)
class Point:
    """One load level: requests kept in flight (``concurrency``, sent as fast as they finish), or a
    Poisson arrival rate (``rate`` requests/s)."""

    axis: str  # "concurrency" or "rate"
    value: float

    def vllm_args(self) -> list[str]:
        if self.axis == "concurrency":
            return ["--max-concurrency", str(int(self.value)), "--request-rate", "inf"]
        return ["--request-rate", f"{self.value:g}"]

    @property
    def short(self) -> str:
        return f"c={int(self.value)}" if self.axis == "concurrency" else f"rate={self.value:g}/s"


# ---- the command line's values --------------------------------------------------------------------

def _number_list(option: str, text: str, cast, low: float, high: float, example: str) -> list:
    """``text`` ("1,2,4") as a list of distinct numbers in [low, high], or a refusal naming ``option``."""
    values = []
    for item in (part.strip() for part in str(text).split(",")):
        try:
            value = cast(item)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not low <= value <= high:
            raise FleetConfigError(f"`vllm-fleet bench {option}`", f"{item!r} (in {text!r}) is not a number from "
                                   f"{low:g} to {high:g}.", f"give a comma-separated list, e.g. {option} {example}.")
        values.append(value)
    if len(set(values)) != len(values):
        raise FleetConfigError(f"`vllm-fleet bench {option}`", f"{text!r} repeats a value.",
                               "give each load level once; --repeat K runs every point K times.")
    if len(values) > MAX_POINTS:
        raise FleetConfigError(f"`vllm-fleet bench {option}`", f"{len(values)} points is more than {MAX_POINTS}.",
                               "sweep fewer load levels per run.")
    return values


def sweep_points(concurrency: str | None, rate: str | None) -> list[Point]:
    """The load levels of a run: --concurrency (default 1,2,4) or --rate, not both."""
    if concurrency is not None and rate is not None:
        raise FleetConfigError("`vllm-fleet bench --concurrency` and `--rate`", "sweep two different things.",
                               "give one: --concurrency 1,2,4 (requests in flight) or --rate 1,2 (requests/s).")
    if rate is not None:
        return [Point("rate", v) for v in _number_list("--rate", rate, float, 0.01, MAX_RATE, "1,2")]
    values = _number_list("--concurrency", "1,2,4" if concurrency is None else concurrency, _int, 1,
                          MAX_CONCURRENCY, "1,2,4")
    return [Point("concurrency", v) for v in values]


def _int(text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise ValueError(text)
    return int(text)


def check_num_prompts(num_prompts: int) -> int:
    if not 1 <= num_prompts <= MAX_NUM_PROMPTS:
        raise FleetConfigError("`vllm-fleet bench --num-prompts`", f"{num_prompts} requests per point is not from 1 "
                               f"to {MAX_NUM_PROMPTS}.", "give fewer: a benchmark is traffic the fleet's clients share.")
    return num_prompts


def check_repeat(repeat: int) -> int:
    if not 1 <= repeat <= MAX_REPEAT:
        raise FleetConfigError("`vllm-fleet bench --repeat`", f"{repeat} is not from 1 to {MAX_REPEAT}.",
                               "give e.g. --repeat 3: the report takes each point's median over the repeats.")
    return repeat


def parse_goodput(specs: Iterable[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` as vLLM's --goodput takes it: request-level SLOs in milliseconds."""
    slos: dict[str, float] = {}
    for spec in specs or ():
        key, _, value = spec.partition(":")
        fix = f"give KEY:MILLISECONDS with KEY one of {', '.join(GOODPUT_KEYS)}, e.g. --goodput ttft:500 tpot:50"
        if key == "itl":
            raise FleetConfigError("`vllm-fleet bench --goodput`", f"{spec!r}: vLLM's goodput counts requests, and ITL "
                                   "is per token (each request has many).", f"use tpot (a request's mean time per "
                                   f"output token) instead; {fix}.")
        try:
            milliseconds = float(value)
        except ValueError:
            milliseconds = -1.0
        if key not in GOODPUT_KEYS or not math.isfinite(milliseconds) or milliseconds <= 0 or key in slos:
            raise FleetConfigError("`vllm-fleet bench --goodput`", f"{spec!r} is not a new KEY:MILLISECONDS pair "
                                   "with a positive number.", f"{fix}.")
        slos[key] = milliseconds
    return slos


def target_kinds(text: str | None, direct: list[str] | None) -> list[str]:
    """What a run measures: "edge", "direct" or both (--target); by default the edge, or the
    --direct instances when some are given."""
    kinds = [k.strip() for k in (text or ("direct" if direct else "edge")).split(",")]
    if any(k not in ("edge", "direct") for k in kinds) or len(set(kinds)) != len(kinds):
        raise FleetConfigError("`vllm-fleet bench --target`", f"{text!r} is not a list of edge and direct.",
                               "give --target edge, --target direct or --target edge,direct.")
    if "direct" in kinds and not direct:
        raise FleetConfigError("`vllm-fleet bench --target direct`", "names no instance.",
                               "add --direct HOST:INSTANCE (once per instance to measure).")
    return kinds


def check_workload(workload: Workload) -> Workload:
    if workload.dataset not in DATASETS:
        raise FleetConfigError("`vllm-fleet bench --dataset`", f"{workload.dataset!r} is not one of "
                               f"{', '.join(DATASETS)}.", "give --dataset random or --dataset shared-prefix.")
    for name in ("input_len", "output_len", "prefix_len", "suffix_len", "num_prefixes"):
        if getattr(workload, name) < 1:
            raise FleetConfigError(f"`vllm-fleet bench --{name.replace('_', '-')}`",
                                   f"{getattr(workload, name)} is not a positive number.", "give 1 or more.")
    return workload


# ---- one point's flags and result -----------------------------------------------------------------

def vllm_bench_args(target: Target, workload: Workload, point: Point, num_prompts: int,
                    goodput: dict[str, float], result_dir: Path, result_file: str,
                    ready_timeout_s: int = 0) -> list[str]:
    """`vllm bench serve`'s flags for one point (no key: the key is in the environment). The
    result is saved detailed: its per-request errors say why requests failed (``summarize``)."""
    args = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", target.base_url,
            "--model", target.served_model, "--tokenizer", target.tokenizer, *workload.vllm_args(),
            "--num-prompts", str(num_prompts), *point.vllm_args(), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--save-result", "--save-detailed", "--result-dir", str(result_dir),
            "--result-filename", result_file, "--disable-tqdm"]
    if goodput:
        args += ["--goodput", *(f"{key}:{ms:g}" for key, ms in goodput.items())]
    if ready_timeout_s:
        args += ["--ready-check-timeout-sec", str(ready_timeout_s)]
    return args


# `vllm bench serve`'s own SSE reader strips every network read before it joins them, so a read
# that ends just after "data: " loses that space and the next event no longer parses: the request
# counts as failed though the server sent it whole (vllm-project/vllm#51172, open). Reads end at
# arbitrary bytes through a proxy's buffer (nginx), so this is seen through the edge only.
CLIENT_PARSE_ERROR = "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """vLLM's result of one point without its per-request lists; the requests' distinct errors
    kept, counted (a 429 from the edge or a refused connection is reported, not hidden). Requests
    lost to the bench client's own parse error are counted apart (``client_parse_failed``), not
    as the fleet's failures."""
    summary = {key: value for key, value in result.items() if key not in PER_REQUEST_KEYS}
    errors: dict[str, int] = {}
    for error in result.get("errors") or ():
        if error:
            first_line = str(error).strip().splitlines()[-1][:200] if str(error).strip() else "error"
            errors[first_line] = errors.get(first_line, 0) + 1
    summary["error_counts"] = errors
    summary.setdefault("failed", sum(errors.values()))
    summary["client_parse_failed"] = errors.get(CLIENT_PARSE_ERROR, 0)
    summary["failed"] -= summary["client_parse_failed"]
    return summary


def median_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, load level): the median of each metric over the repeats that ran, in
    the order the points first appear; ``repeats`` says how many there were."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["target"], point["value"]), []).append(point)
    rows = []
    for (target, value), group in groups.items():
        results = [p["result"] for p in group if p.get("result")]
        row: dict[str, Any] = {"target": target, "axis": group[0]["axis"], "value": value, "repeats": len(results),
                               "errors": [p["error"] for p in group if p.get("error")]}
        for metric in METRICS:
            numbers = [r[metric] for r in results if isinstance(r.get(metric), (int, float))]
            row[metric] = statistics.median(numbers) if numbers else None
        rows.append(row)
    return rows


# ---- the run record and the table ---------------------------------------------------------------

def run_record(*, label: str, release: str, inventory: str, hosts: int, instances: int, routing: str,
               targets: list[Target], workload: Workload, points: list[Point], num_prompts: int, repeat: int,
               goodput: dict[str, float], machine: dict[str, Any], started: str, ended: str,
               results: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything a saved run holds: what ran, where, against what, and every point's result."""
    return {"kind": RECORD_KIND, "version": RECORD_VERSION, "label": label, "release": release,
            "inventory": inventory, "hosts": hosts, "instances": instances, "routing": routing,
            "targets": [t.describe() for t in targets], "workload": workload.as_dict(),
            "sweep": {"axis": points[0].axis, "values": [p.value for p in points]}, "num_prompts": num_prompts,
            "repeat": repeat, "goodput": goodput, "machine": machine, "started": started, "ended": ended,
            "points": results}


def check_record(data: Any, source: str) -> dict[str, Any]:
    """``data`` (read from ``source``) if it is a run record this version of vllm-fleet reads."""
    if not isinstance(data, dict) or data.get("kind") != RECORD_KIND or not isinstance(data.get("points"), list):
        raise FleetConfigError(f"`vllm-fleet bench --compare {source}`", "is not a result of `vllm-fleet bench`.",
                               "give the JSON files a bench run wrote (in --out, default .cache/bench/).")
    if data.get("version") != RECORD_VERSION:
        raise FleetConfigError(f"`vllm-fleet bench --compare {source}`", f"is a version {data.get('version')} result; "
                               f"this vllm-fleet reads version {RECORD_VERSION}.", "run the benchmark again.")
    return data


def time_stamp(iso_time: str) -> str:
    """``2025-01-01T12:00:00+01:00`` as ``20250101-120000`` (local time, as recorded)."""
    return re.sub(r"[^0-9T]", "", re.split(r"[.+]|(?<=T..:..:..)-", iso_time)[0]).replace("T", "-")


def record_file_name(label: str, started: str) -> str:
    """``20250101-120000-edge-least_conn.json``: sorted by time, named by what ran."""
    return f"{time_stamp(started)}-{re.sub(r'[^A-Za-z0-9_.]+', '-', label).strip('-') or 'bench'}.json"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


TABLE_COLUMNS = ("target", "load", "ok/failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                 "goodput")


def table(rows: list[dict[str, Any]]) -> str:
    """The points (medians over repeats, ``median_points``) as text: one line per target and load."""
    lines = [TABLE_COLUMNS]
    for row in rows:
        load = f"c={int(row['value'])}" if row["axis"] == "concurrency" else f"{row['value']:g}/s"
        ok = "-" if row["completed"] is None else f"{row['completed']:g}/{row['failed'] or 0:g}"
        if row.get("errors"):
            ok += f" ({len(row['errors'])} not run)"
        lines.append((row["target"], load, ok, _rate(row["request_throughput"]), _rate(row["output_throughput"]),
                      _ms(row["p50_ttft_ms"]), _ms(row["p99_ttft_ms"]), _ms(row["p50_itl_ms"]),
                      _ms(row["p99_itl_ms"]), _rate(row["request_goodput"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_COLUMNS))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    note = "times in ms (p50/p99), throughput per second"
    if any(row["repeats"] > 1 for row in rows):
        note += "; each row the median of its repeats"
    return "\n".join([*text, note])


def point_summary(target: str, point: Point, result: dict[str, Any]) -> str:
    """One finished point in a line, its failed requests and their errors included."""
    line = (f"{result.get('completed', 0)} ok, {result.get('failed', 0)} failed, "
            f"{_rate(result.get('request_throughput'))} req/s, {_rate(result.get('output_throughput'))} out tok/s, "
            f"TTFT p50 {_ms(result.get('p50_ttft_ms'))} ms, ITL p50 {_ms(result.get('p50_itl_ms'))} ms")
    if result.get("client_parse_failed"):
        line += (f"; {result['client_parse_failed']} more lost by vllm bench's own SSE reader (vllm-project/vllm"
                 "#51172), not by the fleet")
    errors = result.get("error_counts") or {}
    if errors:
        line += "; errors: " + "; ".join(f"{count}× {error}" for error, count in list(errors.items())[:3])
    return f"  {target} {point.short}: {line}"
