"""`vllm-fleet status`: the table built from Prometheus's answers, the exposition of vLLM's
/metrics as the status view reads it, and the refusal without a monitor group (the lab test runs
it against the lab's Prometheus)."""

import math

import pytest

from roles.plan import status
from roles.plan.metrics import parse_exposition
from tests.unit.test_cli import vllm_fleet

# vLLM's TTFT buckets (vllm/v1/metrics/loggers.py), in seconds.
TTFT_BOUNDS = ("0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75", "1.0",
               "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0", "640.0", "2560.0", "+Inf")


def vllm_page(engines: dict[str, dict]) -> str:
    """A /metrics page as vLLM 0.32's prometheus_client writes it, for one or more engines (data
    parallel: one label set each). Per engine: running, waiting, kv, tokens (generation counter),
    ttft (cumulative count per bucket bound; missing bounds repeat the one below)."""
    lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
             "# TYPE vllm:num_requests_running gauge"]
    lines += [f'vllm:num_requests_running{{engine="{e}",model_name="tiny-llama"}} {v["running"]:.1f}'
              for e, v in engines.items()]
    lines += ["# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
              "# TYPE vllm:num_requests_waiting gauge"]
    lines += [f'vllm:num_requests_waiting{{engine="{e}",model_name="tiny-llama"}} {v["waiting"]:.1f}'
              for e, v in engines.items()]
    lines += ["# TYPE vllm:kv_cache_usage_perc gauge"]
    lines += [f'vllm:kv_cache_usage_perc{{engine="{e}",model_name="tiny-llama"}} {v["kv"]}' for e, v in engines.items()]
    lines += ["# HELP vllm:generation_tokens_total Number of generation tokens processed.",
              "# TYPE vllm:generation_tokens_total counter"]
    for e, v in engines.items():
        lines += [f'vllm:generation_tokens_total{{engine="{e}",model_name="tiny-llama"}} {v["tokens"]:.1f}',
                  f'vllm:generation_tokens_created{{engine="{e}",model_name="tiny-llama"}} 1.7961986954413e+09']
    lines += ["# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
              "# TYPE vllm:time_to_first_token_seconds histogram"]
    for e, v in engines.items():
        count = 0.0
        for bound in TTFT_BOUNDS:
            count = v["ttft"].get(bound, count)
            # Label order as prometheus_client writes it: le last.
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{engine="{e}",le="{bound}",'
                         f'model_name="tiny-llama"}} {count:.1f}')
        lines += [f'vllm:time_to_first_token_seconds_count{{engine="{e}",model_name="tiny-llama"}} {count:.1f}',
                  f'vllm:time_to_first_token_seconds_sum{{engine="{e}",model_name="tiny-llama"}} 0.52']
    lines.append('vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0"} 1.0')
    return "\n".join(lines) + "\n"


def engine(running=0, waiting=0, kv=0.0, tokens=0, ttft=None) -> dict:
    return {"running": running, "waiting": waiting, "kv": kv, "tokens": tokens, "ttft": ttft or {}}



# Two engines of one instance, read a window apart: 300 + 100 tokens generated, and 8 first tokens
# (engine 0: 1 by 0.02 s, 2 more by 0.04 s, 2 by 0.06 s; engine 1: 1 by 0.06 s, 2 by 0.08 s).
BEFORE = vllm_page({"0": engine(tokens=1000, ttft={"0.02": 10, "0.04": 20, "0.06": 30}),
                    "1": engine(tokens=500, ttft={"0.06": 7})})
AFTER = vllm_page({"0": engine(running=2, waiting=1, kv=0.25, tokens=1300, ttft={"0.02": 11, "0.04": 23, "0.06": 35}),
                   "1": engine(running=1, waiting=3, kv=0.5, tokens=600, ttft={"0.06": 8, "0.08": 10})})


# ---- the exposition ------------------------------------------------------------------------------

def test_the_exposition_is_read_as_series_and_values():
    samples = parse_exposition(AFTER)
    buckets = [s for s in samples if s.name == "vllm:time_to_first_token_seconds_bucket"]
    assert len(buckets) == 2 * len(TTFT_BOUNDS) and not any(s.name.startswith("#") for s in samples)
    # Labels sorted by name: the same series is the same key whatever order a page gives them in.
    assert buckets[-1].labels == (("engine", "1"), ("le", "+Inf"), ("model_name", "tiny-llama"))
    assert buckets[-1].value == 10.0 and buckets[-1].label("le") == "+Inf"
    created = next(s for s in samples if s.name == "vllm:generation_tokens_created")
    assert created.value == pytest.approx(1796198695.4413)


def test_label_values_are_unescaped_and_timestamps_and_specials_read():
    (quoted, special, stamped) = parse_exposition(
        'm{path="C:\\\\x",say="a \\"b\\"}",n="1\\n2",} 3\nm{} NaN\nm_total 7 1796199000000\n')
    assert dict(quoted.labels) == {"path": "C:\\x", "say": 'a "b"}', "n": "1\n2"} and quoted.value == 3.0
    assert math.isnan(special.value) and special.labels == ()
    assert (stamped.name, stamped.value) == ("m_total", 7.0)


@pytest.mark.parametrize("line", ["vllm:num_requests_running", 'm{le=0.1} 1', 'm{le="0.1" 1', "m 1.2.3", "m one"])
def test_a_line_that_is_no_sample_is_refused_naming_it(line):
    with pytest.raises(ValueError, match="not a sample line") as error:
        parse_exposition(f"# TYPE m gauge\nm 1\n{line}\n")
    assert repr(line) in str(error.value)



# ---- from Prometheus -----------------------------------------------------------------------------


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
