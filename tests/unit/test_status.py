"""`vllm-fleet status`: the table built from Prometheus's answers, and the refusal without a
monitor group (the lab test runs it against the lab's Prometheus)."""

from roles.plan import status
from tests.unit.test_cli import vllm_fleet


def sample(value: str, **labels) -> dict:
    return {"metric": labels, "value": [1796199000.0, value]}


ANSWERS = {
    "up": [sample("1", host="lab1", instance_name="b", release="r1"), sample("1", host="lab1", instance_name="a", release="r1"),
           sample("0", host="lab2", instance_name="a", release="r2")],
    "running": [sample("2", host="lab1", instance_name="a"), sample("0", host="lab1", instance_name="b")],
    "waiting": [sample("5", host="lab1", instance_name="a"), sample("0", host="lab1", instance_name="b")],
    "kv": [sample("0.4567", host="lab1", instance_name="a"), sample("0", host="lab1", instance_name="b")],
    "tokens_s": [sample("12.34", host="lab1", instance_name="a"), sample("0", host="lab1", instance_name="b")],
    # No request in the window: histogram_quantile answers NaN.
    "ttft_p50": [sample("0.0421", host="lab1", instance_name="a"), sample("NaN", host="lab1", instance_name="b")],
}


def test_one_row_per_instance_in_order_with_what_prometheus_knows():
    assert status.rows(ANSWERS) == [
        ("lab1:a", "up", "r1", "2", "5", "46%", "12.3", "42 ms"),
        ("lab1:b", "up", "r1", "0", "0", "0%", "0.0", "-"),
        # Down: only `up` answers for it, the rest is unknown rather than 0.
        ("lab2:a", "DOWN", "r2", "-", "-", "-", "-", "-"),
    ]


def test_the_table_is_aligned_under_its_header():
    lines = status.table(ANSWERS).splitlines()
    assert lines[0].split()[:3] == ["instance", "health", "release"] and len(lines) == 4
    assert {line.index("r") for line in lines[1:]} == {lines[0].index("release")}


def test_the_status_view_reads_only_metrics_the_release_exposes():
    assert status.metric_names() == {"up", "vllm:num_requests_running", "vllm:num_requests_waiting",
                                     "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total",
                                     "vllm:time_to_first_token_seconds_bucket"}


def test_an_inventory_without_a_monitor_group_is_refused():
    result = vllm_fleet("status", "inventories/prod.py")
    assert result.returncode == 2, result.stderr
    assert "inventory group `monitor`" in result.stderr and "add a monitor group" in result.stderr
