"""The picture of `vllm-fleet bench` runs: TTFT and ITL (p50, p99) and output tokens/s against the
load (concurrency or request rate), one line per run and target. Drawn with matplotlib's Agg
backend: a control node has no display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from roles.plan import bench as plan  # noqa: E402

# (metric, panel title, y axis label)
PANELS = (("p50_ttft_ms", "time to first token, p50", "TTFT p50 (ms)"),
          ("p99_ttft_ms", "time to first token, p99", "TTFT p99 (ms)"),
          ("p50_itl_ms", "inter-token latency, p50", "ITL p50 (ms)"),
          ("p99_itl_ms", "inter-token latency, p99", "ITL p99 (ms)"),
          ("output_throughput", "output throughput", "output tokens/s"))


def series(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(line label, its record, its median rows by load) for every run and target. A run's target
    is labelled by the target alone when only one run is drawn, else by the run's label too (and
    its start time where two runs share a label)."""
    labels = [r["label"] for r in records]
    lines = []
    for record in records:
        run = record["label"] + (f" ({record['started'][:16]})" if labels.count(record["label"]) > 1 else "")
        rows = plan.median_points(record["points"])
        for target in dict.fromkeys(row["target"] for row in rows):
            name = target if len(records) == 1 or run == target else f"{run}: {target}"
            lines.append((name, record, sorted((r for r in rows if r["target"] == target), key=lambda r: r["value"])))
    return lines


def _title(records: list[dict[str, Any]]) -> str:
    def joined(values) -> str:
        return " | ".join(dict.fromkeys(str(v) for v in values))

    hardware = joined(f"{r['hosts']} hosts, {r['instances']} instances; control node {r['machine']['cpu_model']} "
                      f"({r['machine']['cpus']} CPUs)" for r in records)
    workload = joined(f"{r['workload']['description']}, {r['num_prompts']} requests per point"
                      + (f", median of {r['repeat']} repeats" if r["repeat"] > 1 else "") for r in records)
    return f"vLLM bench serve: {joined(r['release'] for r in records)}\n{hardware}\n{workload}"


def _notes(records: list[dict[str, Any]]) -> list[str]:
    """Points with failed requests or no result: said on the figure, not only in the table."""
    notes = []
    for record in records:
        for point in record["points"]:
            failed = (point.get("result") or {}).get("failed") or 0
            if point.get("error") or failed:
                load = plan.Point(point["axis"], point["value"]).short
                why = point["error"] or f"{failed} failed requests"
                notes.append(f"{point['target']} {load} (repeat {point.get('repeat', 0) + 1}): {why}"[:90])
    return notes


def _draw_hit_rates(axes, comparisons: list[tuple[dict, dict]], label_runs: bool) -> None:
    """`bench --routing`'s outcome per policy: the fleet's prefix-cache hit rate as a bar, each
    bar marked with the requests per instance's max/min (the load balance)."""
    names = [f"{r['label']}: {o['policy']}" if label_runs else o["policy"] for r, o in comparisons]
    rates = [100 * (o["hit_rate"] or 0) for _, o in comparisons]
    positions = list(range(len(names)))
    bars = axes.bar(positions, rates, color=[f"C{i}" for i in positions])
    axes.set_xticks(positions, names)
    for bar, (_, outcome) in zip(bars, comparisons):
        balance = outcome["balance"]
        axes.annotate("max/min " + ("-" if balance is None else f"{balance:.2f}"), (bar.get_x() + bar.get_width() / 2,
                      bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes.set_ylabel("prefix-cache hit rate (%)")
    axes.set_ylim(0, 100)
    axes.set_title("routing: fleet prefix-cache hit rate", fontsize=10)
    axes.tick_params(axis="x", labelsize=8)


def plot_runs(records: list[dict[str, Any]], png_path: Path) -> Path:
    """One PNG of ``records`` (run records of ``roles.plan.bench.run_record``) at ``png_path``."""
    figure = draw_runs(records)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path


def draw_runs(records: list[dict[str, Any]]):
    """The figure of ``plot_runs`` (a matplotlib Figure; the caller closes it)."""
    axes_names = {r["sweep"]["axis"] for r in records}
    x_label = plan.AXES[next(iter(axes_names))] if len(axes_names) == 1 else "load (concurrency or requests/s)"
    figure, grid = plt.subplots(2, 3, figsize=(16, 9.5))
    panels = grid.flat
    lines = series(records)
    for (metric, title, y_label), axes in zip(PANELS, panels):
        for name, _, rows in lines:
            drawn = [r for r in rows if r[metric] is not None]
            axes.plot([r["value"] for r in drawn], [r[metric] for r in drawn], marker="o", label=name)
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        values = sorted({r["value"] for _, _, rows in lines for r in rows})
        if values and all(float(v).is_integer() for v in values):
            axes.set_xticks(values)
    # One legend for all five panels, in the sixth: per-panel legends covered data points.
    info = grid.flat[5]
    info.axis("off")
    handles, names = grid.flat[0].get_legend_handles_labels()
    info.legend(handles, names, loc="upper left", title="run: target" if len(records) > 1 else "target")
    notes = _notes(records)
    comparisons = [(r, o) for r in records for o in r.get("routing_comparison", ())]
    text = ["failed requests:", *notes[:(6 if comparisons else 12)]] if notes else ["no failed requests"]
    info.text(0.0, 0.7 if comparisons else 0.45, "\n".join(text), va="top", ha="left", fontsize=9,
              transform=info.transAxes, color="firebrick" if notes else "dimgray")
    if comparisons:
        _draw_hit_rates(info.inset_axes([0.12, 0.0, 0.85, 0.42]), comparisons, len(records) > 1)
    figure.suptitle(_title(records), fontsize=11)
    figure.tight_layout()
    return figure
