"""What `vllm-fleet lab deploy-cost` reports, from plain data: pyinfra's Grand total, the goals'
ratios with PASS/MISS, the table, a saved result read back, and its plot (matplotlib's Agg: a
control node has no display). Nothing here touches the lab, so all of it is unit-tested
(tests/unit/test_deploy_cost.py); the measuring is ``roles.lab.deploy_cost``.

A result is the JSON the command writes: ``rounds`` holds one entry per host count ``n``, each with
a ``first`` install and a ``noop`` re-run measurement (either may be missing after a failure):
seconds, returncode, timed_out, totals (the Grand total), control_out_bytes, control_in_bytes,
host_in_bytes ({host: bytes}) and apt_proxy_bytes (Debian packages the lab's apt proxy served, which
the bridge counts too: a real fleet's hosts get them from their mirror, so they are set apart).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roles.errors import FleetConfigError

KIND = "deploy-cost"
MB = 1e6
# The goals: bytes out of the control node for a first install independent of N within
# 10 %; the no-op re-run at the largest N within 2x of the smallest; the first install within 3x.
OUT_SPREAD_GOAL = 1.10
NOOP_RATIO_GOAL = 2.0
FIRST_RATIO_GOAL = 3.0
TOTALS_KEYS = ("operations", "changed", "errors", "unchanged")

# pyinfra may colour its rows; the figures are read without the escapes.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GRAND_TOTAL = re.compile(r"^\s*Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", re.MULTILINE)


def parse_hosts(text: str, most: int) -> list[int]:
    """`--hosts 1,2,4,8`: the distinct host counts, ascending; refused unless each is a whole number
    from 1 to ``most`` (the hosts the lab's subnet holds)."""
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1 or counts[-1] > most:
        raise FleetConfigError("`vllm-fleet lab deploy-cost --hosts`", f"{text!r} is not a list of host counts.",
                               f"give whole numbers from 1 to {most}, comma-separated, e.g. 1,2,4,8.")
    return counts


def grand_total(output: str) -> dict[str, int] | None:
    """pyinfra's 'Grand total' row (host-operations, changed, errors, unchanged; '-' is 0), or None
    where the output has none (a run stopped before its results table)."""
    rows = _GRAND_TOTAL.findall(_ANSI.sub("", output))
    if not rows:
        return None
    try:
        return dict(zip(TOTALS_KEYS, (0 if v == "-" else int(v) for v in rows[-1])))
    except ValueError:
        return None


def succeeded(measurement: dict[str, Any] | None) -> bool:
    """A deploy that ran to its end without an error: its figures are comparable."""
    return bool(measurement) and measurement["returncode"] == 0 and not measurement.get("timed_out")


def host_mean_max(measurement: dict[str, Any]) -> tuple[float, int]:
    received = list(measurement["host_in_bytes"].values()) or [0]
    return sum(received) / len(received), max(received)


@dataclass(frozen=True)
class Goal:
    text: str
    ratio: float | None
    limit: float
    limit_text: str

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "not measured"
        return "PASS" if self.ratio <= self.limit else "MISS"

    def line(self) -> str:
        measured = "-" if self.ratio is None else f"{self.ratio:.2f}"
        return f"{self.text} = {measured} (goal ≤ {self.limit_text}): {self.verdict}"


def _end_ratio(rounds: list[dict[str, Any]], which: str, what: str, limit: float) -> Goal:
    """Wall seconds of ``which`` at the largest N over the smallest, among the rounds where it succeeded."""
    done = [(r["n"], r[which]["seconds"]) for r in rounds if succeeded(r.get(which))]
    if len(done) < 2 or done[0][1] <= 0:
        return Goal(f"{what}, largest N / smallest N", None, limit, f"{limit:g}")
    (low, low_s), (high, high_s) = done[0], done[-1]
    return Goal(f"{what}, N={high} / N={low}", high_s / low_s, limit, f"{limit:g}")


def fleet_out(measurement: dict[str, Any]) -> int:
    """What left the control node for the fleet: the bridge's bytes less the Debian packages."""
    return measurement["control_out_bytes"] - measurement.get("apt_proxy_bytes", 0)


def goals(rounds: list[dict[str, Any]]) -> list[Goal]:
    """The three goals from the rounds (ascending N), each with its measured ratio."""
    rounds = sorted(rounds, key=lambda r: r["n"])
    out = [fleet_out(r["first"]) for r in rounds if succeeded(r.get("first"))]
    spread = max(out) / min(out) if len(out) >= 2 and min(out) > 0 else None
    return [Goal("out of the control node, first install: max/min over N", spread, OUT_SPREAD_GOAL,
                 f"{OUT_SPREAD_GOAL:.2f}"),
            _end_ratio(rounds, "noop", "no-op wall", NOOP_RATIO_GOAL),
            _end_ratio(rounds, "first", "first-install wall", FIRST_RATIO_GOAL)]


def not_noops(rounds: list[dict[str, Any]]) -> list[str]:
    """Re-runs that changed something (or whose changes are unknown): the deploy is not idempotent there."""
    flags = []
    for r in rounds:
        noop = r.get("noop")
        if not noop:
            continue
        totals = noop.get("totals")
        if totals is None:
            flags.append(f"N={r['n']}: the re-run printed no Grand total, so its changes are unknown")
        elif totals["changed"]:
            flags.append(f"N={r['n']}: the re-run changed {totals['changed']} operations: not a no-op")
    return flags


# (header, width): values are right-aligned under their header.
COLUMNS = (("hosts", 5), ("first: out of control node", 26), ("+ Debian packages", 17),
           ("into each host (mean / max)", 27), ("wall", 6), ("hosts' CPU", 10), ("CPUs busy", 9),
           ("no-op: wall", 11), ("out", 8), ("changes", 7))


def _mb(value: float) -> str:
    return f"{value / MB:.1f}"


def table_row(r: dict[str, Any]) -> str:
    first, noop = r.get("first"), r.get("noop")
    cells = [str(r["n"])] + ["-"] * 9
    if first:
        mean, most = host_mean_max(first)
        cells[1:5] = [f"{_mb(fleet_out(first))} MB", f"{_mb(first.get('apt_proxy_bytes', 0))} MB",
                      f"{_mb(mean)} / {_mb(most)} MB", f"{first['seconds']:.0f} s"]
        if first.get("cpu"):
            cells[5:7] = [f"{first['cpu']['hosts_s']:.0f} s", f"{busy(first):.0%}"]
        if not succeeded(first):
            cells[1] = "failed, " + cells[1]
    if noop:
        changed = (noop.get("totals") or {}).get("changed")
        cells[7:] = [f"{noop['seconds']:.1f} s", f"{_mb(fleet_out(noop))} MB",
                     "?" if changed is None else str(changed)]
        if not succeeded(noop):
            cells[7] = "failed, " + cells[7]
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS))


def busy(measurement: dict[str, Any]) -> float:
    """How busy this machine's CPUs were during a deploy: CPU seconds over wall seconds times CPUs."""
    cpu = measurement["cpu"]
    return cpu["machine_s"] / (measurement["seconds"] * cpu["cpus"])


def cpu_bound(rounds: list[dict[str, Any]]) -> list[str]:
    """What bounds the first install's wall time, in the largest round: the CPU work of every host on
    this machine's CPUs, against the smallest round's."""
    measured = sorted((r for r in rounds if succeeded(r.get("first")) and r["first"].get("cpu")), key=lambda r: r["n"])
    if len(measured) < 2:
        return []
    low, high = measured[0], measured[-1]
    first, cpu = high["first"], high["first"]["cpu"]
    return [f"first install at N={high['n']}: the hosts used {cpu['hosts_s']:.0f} CPU-seconds "
            f"({cpu['hosts_s'] / high['n']:.0f} each; {low['first']['cpu']['hosts_s'] / low['n']:.0f} each at "
            f"N={low['n']}) in {first['seconds']:.0f} s on {cpu['cpus']} CPUs, which were {busy(first):.0%} busy; "
            f"some task waited for a CPU {cpu['stalled_s'] / first['seconds']:.0%} of the time"]


def table(rounds: list[dict[str, Any]]) -> str:
    header = "  ".join(name.rjust(width) for name, width in COLUMNS)
    return "\n".join([header, *(table_row(r) for r in sorted(rounds, key=lambda r: r["n"]))])


def one_copy_bytes(result: dict[str, Any]) -> int:
    """What one copy of what the cache is sent weighs: the release's wheels and the model."""
    return result["wheelhouse"]["bytes"] + result["model"]["bytes"]


def report(result: dict[str, Any]) -> str:
    """The printed report: the table, what one copy weighs, the goals, re-runs that changed something."""
    machine = result["machine"]
    lines = [(f"install-only deploy ({result['deploy']}) of {result['release']} against fleet size, measured on "
              f"{machine['node']}: {machine['cpu_model']} ({machine['cpus']} CPUs)"), "",
             table(result["rounds"]), "",
             (f"one copy of the release's wheels and the model: {_mb(one_copy_bytes(result))} MB (wheelhouse "
              "prebuilt on this machine)"), f"apt: {result['apt_note']}",
             *(goal.line() for goal in goals(result["rounds"])),
             *cpu_bound(result["rounds"]),
             *not_noops(result["rounds"])]
    if result.get("failed"):
        failed = result["failed"]
        lines.append(f"stopped at N={failed['n']}, {failed['step']}: {failed['problem']}"
                     + (f" (log: {failed['log']})" if failed.get("log") else ""))
    return "\n".join(lines)


def read_result(path: Path) -> dict[str, Any]:
    """A saved result, checked enough to report and plot; anything else is refused by name."""
    where = f"`vllm-fleet lab deploy-cost --plot-only {path}`"
    if not path.is_file():
        raise FleetConfigError(where, "does not exist.", "give the JSON a deploy-cost run wrote (in --out, default "
                                                         ".cache/bench/).")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        data = None
    if not (isinstance(data, dict) and data.get("kind") == KIND and isinstance(data.get("rounds"), list)
            and all(isinstance(r, dict) and isinstance(r.get("n"), int) for r in data["rounds"])):
        raise FleetConfigError(where, "is not the result of a deploy-cost run.",
                               "give a <time>-deploy-cost.json that `vllm-fleet lab deploy-cost` wrote.")
    return data


def plot(result: dict[str, Any], png_path: Path) -> Path:
    """Two panels against N (log-2 axis, ticks at the N measured): MB out of the control node and mean
    MB into a host for the first install; wall seconds of the first install and of the no-op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rounds = sorted(result["rounds"], key=lambda r: r["n"])
    firsts = [(r["n"], r["first"]) for r in rounds if succeeded(r.get("first"))]
    noops = [(r["n"], r["noop"]) for r in rounds if succeeded(r.get("noop"))]
    figure, (data, wall) = plt.subplots(1, 2, figsize=(13, 5.5))
    data.plot([n for n, _ in firsts], [fleet_out(m) / MB for _, m in firsts], marker="o",
              label="out of the control node")
    data.plot([n for n, _ in firsts], [m.get("apt_proxy_bytes", 0) / MB for _, m in firsts], marker="^",
              label="Debian packages (the lab's apt proxy; a fleet's mirror)")
    data.plot([n for n, _ in firsts], [host_mean_max(m)[0] / MB for _, m in firsts], marker="s",
              label="into a host (mean)")
    data.axhline(one_copy_bytes(result) / MB, color="gray", linestyle="--", label="one copy: wheels + model")
    data.set_title("first install: data moved")
    data.set_ylabel("MB")
    wall.plot([n for n, _ in firsts], [m["seconds"] for _, m in firsts], marker="o", label="first install")
    wall.plot([n for n, _ in noops], [m["seconds"] for _, m in noops], marker="s", label="no-op re-run")
    wall.set_title("wall time")
    wall.set_ylabel("seconds")
    ticks = [r["n"] for r in rounds]
    for axes in (data, wall):
        axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, [str(n) for n in ticks])
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xlabel("hosts (N)")
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best")
    machine = result["machine"]
    title = (f"install-only deploy of {result['release']} against fleet size\ncontrol node and lab: "
             f"{machine['node']}, {machine['cpu_model']} ({machine['cpus']} CPUs)")
    if result.get("failed"):
        title += f"\nstopped at N={result['failed']['n']}, {result['failed']['step']}"
    figure.suptitle(title, fontsize=11, color="firebrick" if result.get("failed") else "black")
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
