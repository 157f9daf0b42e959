"""roles/plan/bench_routing.py: the routing comparison's hit rate and balance from the instances'
counters, and the LB overhead from back-to-back pairs. The /metrics lines are in the form a lab
instance of cpu-vllm-0.32.0 writes them (labels and all)."""

import pytest

from roles.plan import bench_routing as br


def page(queries: float, hits: float, length: float, stop: float = 0.0) -> str:
    labels = 'engine="0",model_name="tiny-llama"'
    return "\n".join([
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{labels}}} {queries}",
        f"vllm:prefix_cache_hits_total{{{labels}}} {hits}",
        f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="tiny-llama"}} {stop}',
        f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="tiny-llama"}} {length}',
        "vllm:num_requests_running{engine=\"0\",model_name=\"tiny-llama\"} 0.0", ""])


def test_increases_sum_the_series_and_a_restarted_instance_counts_from_zero():
    assert br.counter_increases(page(100, 10, 3), page(700, 410, 9, stop=1)) == {
        br.PREFIX_QUERIES: 600, br.PREFIX_HITS: 400, br.FINISHED: 7}
    # The counters went down: the instance restarted between the pages, all of the second is new.
    assert br.counter_increases(page(700, 410, 9), page(50, 0, 1))[br.PREFIX_QUERIES] == 50


def test_policy_outcome_is_the_fleet_hit_rate_and_the_busiest_over_the_idlest():
    runs: dict = {}
    br.add_increases(runs, {"lab1:a": br.counter_increases(page(0, 0, 0), page(600, 300, 10)),
                            "lab2:a": br.counter_increases(page(0, 0, 0), page(400, 100, 5))})
    br.add_increases(runs, {"lab1:a": br.counter_increases(page(600, 300, 10), page(700, 350, 12)),
                            "lab2:a": br.counter_increases(page(400, 100, 5), page(500, 150, 9))})
    outcome = br.policy_outcome("prefix", runs)
    assert outcome.hit_rate == pytest.approx(500 / 1200)
    assert outcome.finished == {"lab1:a": 12, "lab2:a": 9} and outcome.balance == pytest.approx(12 / 9)
    idle = br.policy_outcome("prefix", {"a": {br.PREFIX_HITS: 0, br.PREFIX_QUERIES: 0, br.FINISHED: 0},
                                        "b": {br.PREFIX_HITS: 0, br.PREFIX_QUERIES: 0, br.FINISHED: 4}})
    assert idle.hit_rate is None and idle.balance is None


def result(tok_s: float, p50: float, p99: float, completed: int = 40, failed: int = 0) -> dict:
    return {"output_throughput": tok_s, "p50_ttft_ms": p50, "p99_ttft_ms": p99, "completed": completed,
            "failed": failed}


def test_overhead_is_the_median_of_pairs_not_of_the_two_sides():
    pairs = [(result(100, 10, 20), result(99, 11, 22)),   # 0.99, +1
             (result(80, 14, 30), result(78, 15.5, 29)),  # 0.975, +1.5
             (result(120, 9, 19), result(121, 9.5, 25))]  # 1.008, +0.5
    found = br.overhead(pairs)
    assert found.throughput_ratio == pytest.approx(0.99) and found.ttft_p50_ms == pytest.approx(1.0)
    assert found.ttft_p99_ms == pytest.approx(2.0)
    assert found.requests == {"direct": 120, "edge": 120} and found.meets_goal
    slow = br.overhead([(result(100, 10, 20), result(90, 15, 30, failed=2))])
    assert not slow.meets_goal and slow.failed == {"direct": 0, "edge": 2}
    assert "misses the goal" in br.overhead_lines(slow, "lab1:a")[-1]


def test_routing_table_has_a_row_per_policy():
    outcomes = [br.PolicyOutcome("least_conn", 100, 1000, {"lab1:a": 10, "lab2:a": 8}),
                br.PolicyOutcome("prefix", 600, 1000, {"lab1:a": 9, "lab2:a": 9})]
    text = br.routing_table(outcomes, {"least_conn": [result(50, 30, 60)], "prefix": [result(55, 20, 40)]})
    lines = text.splitlines()
    assert lines[0].startswith("policy") and len(lines) == 3
    assert "10.0%" in lines[1] and "30.0 ms" in lines[1] and "1.25" in lines[1]
    assert "60.0%" in lines[2] and "1.00" in lines[2]


@pytest.mark.parametrize("release", ["cpu-vllm-0.32.0", "nvidia-vllm-0.32.0"])
def test_the_counters_are_among_the_pinned_releases_metrics(release):
    from roles.paths import REPO_ROOT
    from roles.plan.metrics import check_release_metrics

    check_release_metrics(release, REPO_ROOT / "inventories" / "releases", {"roles/plan/bench_routing.py": br.COUNTERS})
