"""What `vllm-fleet bench --routing` and `--overhead` change on the fleet while they measure, and
put back: the edge's routing policy, or every instance but one marked down in nginx. Each change
is the fleet's own deploy (`pyinfra INVENTORY deploys/vllm.py`) limited to the load balancers,
with the setting given as pyinfra's ``--data``: the same checks, ``nginx -t`` and graceful reload
as any deploy, and nothing restarts (an instance restarts only when its release or configuration
changed, and --data here names edge settings only). The last step deploys the inventory as it is,
which puts the edge back whatever happened in between.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from roles import bench as runner
from roles import status_view
from roles.errors import FleetConfigError
from roles.plan import bench as plan
from roles.plan import bench_routing, settings
from roles.plan.fleet import LB_GROUP
from roles.plan.metrics import check_release_metrics

# A deploy of the load balancers alone takes about 15 s on the lab; a package to install (njs,
# the first time `prefix` is deployed) a minute more.
DEPLOY_TIMEOUT_S = 900
LOG_DIR = Path(".cache/bench/deploys")


def _pyinfra() -> str:
    return str(Path(sys.executable).with_name("pyinfra"))


def deploy_edge(inventory: str, overrides: Mapping[str, object], why: str) -> None:
    """Deploy the load balancers with ``overrides`` (setting -> value, none: the inventory's own).
    pyinfra's output goes to a log file; on failure its end is shown and RuntimeError raised."""
    data = [arg for key, value in overrides.items() for arg in ("--data", f"{key}={json.dumps(value)}")]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{'-'.join(overrides) or 'inventory'}.log"
    print(f"bench: {why}: deploying the load balancers ({' '.join(data[1::2]) or 'the inventory as it is'}); "
          f"pyinfra's output in {log}", flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run([_pyinfra(), "-y", "--limit", LB_GROUP, *data, inventory, "deploys/vllm.py"],
                              stdout=out, stderr=subprocess.STDOUT, timeout=DEPLOY_TIMEOUT_S)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"the deploy of the load balancers failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    print(f"bench: the edge is deployed ({time.monotonic() - started:.0f} s)", flush=True)


@contextlib.contextmanager
def edge_put_back(inventory: str) -> Iterator[None]:
    """Whatever the measurement does to the edge, the inventory's edge is deployed again after it."""
    try:
        yield
    finally:
        deploy_edge(inventory, {}, "putting the edge back as the inventory has it")


# ---- --overhead: one instance direct and through the edge, with it as the only upstream -----------

def overhead_command(args) -> int:
    """The LB overhead on instance ``args.overhead``: the edge holds every other instance down
    (nginx_instances_down), then direct and edge points take turns, the order swapped on each
    repeat (an instance still busy-polling after one run would slow whichever comes next)."""
    spec = args.overhead
    setup = _setup(args)
    inventory, fleet = setup["inventory"], setup["fleet"]
    direct = runner.direct_target(inventory, fleet, spec)
    edge = replace(runner.edge_target(inventory, fleet, args.client), label=f"edge, {spec} its only upstream")
    for target in (direct, edge):
        runner.check_reachable(target)
    venv = runner.bench_venv(fleet.hosts[0].release.name, Path(fleet.hosts[0].get("vllm_releases_dir")))
    others = [name for name in _instances(fleet) if name != spec]
    started, results = runner.now(), []
    with edge_put_back(args.inventory):
        if others:
            deploy_edge(args.inventory, {"nginx_instances_down": others}, f"leaving {spec} the edge's only upstream")
        for repeat in range(setup["repeat"]):
            print(f"bench: overhead, repeat {repeat + 1} of {setup['repeat']}", flush=True)
            order = [direct, edge] if repeat % 2 == 0 else [edge, direct]
            results += _repeat(venv, order, setup, repeat, args, seed_offset=len(results))
    by_point = {value: bench_routing.overhead(pairs) for value, pairs in _pairs(results, direct, edge).items()}
    record = _record(args, setup, [direct, edge], "only upstream: " + spec, started, results)
    record["overhead"] = {f"{value:g}": o.as_dict() for value, o in by_point.items()}
    lines = [line for value, o in by_point.items()
             for line in [f"at {plan.Point(setup['points'][0].axis, value).short}:", *bench_routing.overhead_lines(o, spec)]]
    return _finish(args, record, results, lines)


def _pairs(results: list[dict], direct, edge) -> dict[float, list[tuple[dict, dict]]]:
    """(direct, edge) results of each load level, paired within a repeat."""
    found: dict[tuple[int, float], dict[str, dict]] = {}
    for record in results:
        if record["result"]:
            found.setdefault((record["repeat"], record["value"]), {})[record["target"]] = record["result"]
    pairs: dict[float, list[tuple[dict, dict]]] = {}
    for (_, value), both in sorted(found.items()):
        if direct.label in both and edge.label in both:
            pairs.setdefault(value, []).append((both[direct.label], both[edge.label]))
    return pairs


# ---- --routing: the policies one after another on the same workload -------------------------------

def routing_command(args) -> int:
    """Each policy of ``args.routing`` deployed in turn (the order reversed on every other repeat)
    and measured through the edge; the instances' prefix-cache and finished-request counters read
    before and after each policy's points. Every point samples prompts of its own (``sweep``'s
    seeds), so no policy finds prefixes another one left in the caches."""
    policies = _policies(args.routing)
    setup = _setup(args)
    inventory, fleet = setup["inventory"], setup["fleet"]
    for release in sorted({h.release.name for h in fleet.hosts}):
        check_release_metrics(release, Path(fleet.hosts[0].get("vllm_releases_dir")),
                              {"roles/plan/bench_routing.py": bench_routing.COUNTERS})
    edge = runner.edge_target(inventory, fleet, args.client)
    runner.check_reachable(edge)
    venv = runner.bench_venv(fleet.hosts[0].release.name, Path(fleet.hosts[0].get("vllm_releases_dir")))
    grown: dict[str, dict[str, dict[str, float]]] = {p: {} for p in policies}
    started, results = runner.now(), []
    with edge_put_back(args.inventory):
        for repeat in range(setup["repeat"]):
            for policy in policies if repeat % 2 == 0 else policies[::-1]:
                deploy_edge(args.inventory, {"nginx_routing": policy}, f"routing {policy}, repeat {repeat + 1}")
                before = _counters(args.inventory)
                results += _repeat(venv, [replace(edge, label=f"edge {policy}")], setup, repeat, args,
                                   seed_offset=len(results))
                after = _counters(args.inventory)
                bench_routing.add_increases(grown[policy], {i: bench_routing.counter_increases(before[i], after[i])
                                                            for i in before})
    outcomes = [bench_routing.policy_outcome(p, grown[p]) for p in policies]
    targets = [replace(edge, label=f"edge {p}") for p in policies]
    record = _record(args, setup, targets, ",".join(policies), started, results)
    record["routing_comparison"] = [o.as_dict() for o in outcomes]
    by_policy = {p: [r["result"] for r in results if r["target"] == f"edge {p}" and r["result"]] for p in policies}
    return _finish(args, record, results, [f"routing policies on {setup['workload'].describe()} (hit rate over all "
                                     "points; times and tokens/s the medians of the points):",
                                     bench_routing.routing_table(outcomes, by_policy)])


def _policies(text: str) -> list[str]:
    choices = settings.BY_NAME["nginx_routing"].choices
    policies = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in policies if p not in choices]
    if unknown or len(set(policies)) != len(policies) or len(policies) < 2:
        raise FleetConfigError("`vllm-fleet bench --routing`", f"{text!r} is not two or more distinct policies.",
                               f"give policies separated by commas, e.g. least_conn,prefix (of {', '.join(choices)}).")
    return policies


def _counters(inventory: str) -> dict[str, str]:
    try:
        return status_view.instance_metrics(inventory, list(bench_routing.COUNTERS))
    except RuntimeError as error:
        raise runner.BenchError(f"bench: the instances' counters could not be read: {error}. The comparison "
                                "needs every instance's; check the hosts (vllm-fleet status --direct).") from None


# ---- what both share ------------------------------------------------------------------------------

def _instances(fleet) -> list[str]:
    return [f"{h.name}:{i.name}" for h in fleet.hosts for i in h.serving]


def _setup(args) -> dict[str, Any]:
    """The command line's values checked, then the fleet loaded (no host contacted)."""
    found = {"points": plan.sweep_points(args.concurrency, args.rate),
             "num_prompts": plan.check_num_prompts(args.num_prompts), "repeat": plan.check_repeat(args.repeat),
             "goodput": plan.parse_goodput(args.goodput), "workload": runner.workload_of(args)}
    if not args.inventory:
        raise FleetConfigError("`vllm-fleet bench`", "needs an INVENTORY.", "e.g. vllm-fleet bench inventories/lab.py.")
    found["inventory"], found["fleet"] = runner.load_fleet(args.inventory)
    return found


def _repeat(venv: Path, targets: list, setup: Mapping[str, Any], repeat: int, args, seed_offset: int) -> list[dict]:
    """One pass of the sweep over ``targets``; its points take the seeds after the ``seed_offset``
    points run before it (every point of the measurement samples prompts of its own)."""
    records = runner.sweep(venv, targets, setup["workload"], setup["points"], setup["num_prompts"], 1,
                           setup["goodput"], args.point_timeout, seed_offset=seed_offset)
    for record in records:
        record["repeat"] = repeat
    return records


def _record(args, setup: Mapping[str, Any], targets: list, routing: str, started: str, results: list) -> dict:
    fleet = setup["fleet"]
    return plan.run_record(
        label=args.label or ("routing " + routing if args.routing else f"overhead {args.overhead}"),
        release=fleet.hosts[0].release.name, inventory=args.inventory, hosts=len(fleet.hosts),
        instances=len(_instances(fleet)), routing=routing, targets=targets, workload=setup["workload"],
        points=setup["points"], num_prompts=setup["num_prompts"], repeat=setup["repeat"], goodput=setup["goodput"],
        machine=runner.machine_info(), started=started, ended=runner.now(), results=results)


def _finish(args, record: dict, results: list[dict], lines: list[str]) -> int:
    """The record saved with its plot, the points' table and the comparison printed."""
    from roles.bench_plot import plot_runs  # matplotlib

    path = runner.write_run(record, Path(args.out or runner.DEFAULT_OUT))
    png = plot_runs([record], path.with_suffix(".png"))
    print(plan.table(plan.median_points(results)))
    print("\n".join(lines))
    print(f"bench: wrote {path} and {png}")
    troubled = [r for r in results if r["error"] or (r["result"] or {}).get("failed")]
    if troubled:
        print(f"bench: {len(troubled)} of {len(results)} points had failed requests or did not run (above)",
              file=sys.stderr)
    return 1 if troubled else 0
