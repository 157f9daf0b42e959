"""roles/bench_edge.py without a fleet: the policies --routing takes, refused before anything is
loaded or deployed, and how --overhead pairs the direct and edge points of each repeat."""

import pytest

from roles import bench_edge, cli
from roles.plan.bench import Target, Workload
from roles.plan.edge import Secret


def refused(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("policies, why", [("least_conn", "two or more"), ("least_conn,least_conn", "distinct"),
                                           ("least_conn,random", "two or more distinct policies")])
def test_routing_takes_two_or_more_known_policies(capsys, policies, why):
    err = refused(capsys, "bench", "inventories/nope.py", "--routing", policies)
    assert "--routing" in err and "least_conn,prefix" in err and "Traceback" not in err
    assert why.split()[0] in err


def test_overhead_refuses_a_bad_load_before_loading_the_inventory(capsys):
    err = refused(capsys, "bench", "inventories/nope.py", "--overhead", "lab1:a", "--concurrency", "0")
    assert "--concurrency" in err and "nope.py" not in err


def target(label: str, kind: str) -> Target:
    return Target(label, kind, "http://10.0.0.1:8001", Secret("k"), None, "tiny", "tok")


def point(label: str, repeat: int, value: float, tok_s: float | None) -> dict:
    result = None if tok_s is None else {"output_throughput": tok_s}
    return {"target": label, "repeat": repeat, "value": value, "result": result, "error": None if result else "x"}


def test_overhead_pairs_the_two_targets_within_each_repeat_and_skips_a_point_that_did_not_run():
    direct, edge = target("direct h:a", "direct"), target("edge", "edge")
    results = [point("direct h:a", 0, 4, 100), point("edge", 0, 4, 98),
               point("edge", 1, 4, 90), point("direct h:a", 1, 4, 95),
               point("direct h:a", 2, 4, 80), point("edge", 2, 4, None)]
    pairs = bench_edge._pairs(results, direct, edge)
    assert pairs == {4: [({"output_throughput": 100}, {"output_throughput": 98}),
                         ({"output_throughput": 95}, {"output_throughput": 90})]}


def test_every_point_of_a_sweep_samples_prompts_of_its_own(monkeypatch):
    # The instances' prefix caches outlive a point: one that sent an earlier point's prompts again
    # would be served from them. Each point takes the next seed, after seed_offset earlier ones.
    from roles import bench
    from roles.plan.bench import Point

    seeds = []
    monkeypatch.setattr(bench, "run_point", lambda venv, target, workload, *rest: seeds.append(workload.seed) or
                        {"result": None, "error": "not run"})
    targets = [target("direct h:a", "direct"), target("edge", "edge")]
    bench.sweep(None, targets, Workload(seed=40), [Point("concurrency", 1), Point("concurrency", 2)], 8, repeat=2,
                progress=lambda line: None, seed_offset=3)
    assert seeds == list(range(43, 51))
