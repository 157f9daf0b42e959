"""`vllm-fleet status`: the table built from Prometheus's answers, and the view straight from the
instances: the exposition parsed, the window's arithmetic, the host script against a local HTTP
server, and the command end to end through pyinfra's @local connector (the lab test runs it
against the lab). Every connection goes to loopback or to a `.invalid` name."""

import http.server
import json
import math
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from roles.paths import SAMPLE_INSTANCES
from roles.plan import status
from roles.plan.metrics import parse_exposition
from roles.release.metrics import release_metrics
from tests.unit.test_cli import REPO, vllm_fleet

RELEASE = "cpu-vllm-0.32.0"
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


def reading(page: str | None, at: float, health: int | None = 200) -> dict:
    return {"health": health, "metrics": page, "at": at, "error": None if page else "ConnectionRefusedError"}


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


# ---- the window's arithmetic ---------------------------------------------------------------------

def test_the_quantile_interpolates_inside_its_bucket_as_prometheus_does():
    # Rank 4 of 8 falls in (0.04, 0.06], which holds observations 4 to 6: 1/3 of the way in.
    assert status.histogram_quantile(0.5, {0.02: 1, 0.04: 3, 0.06: 6, 0.08: 8, math.inf: 8}) == \
        pytest.approx(0.04 + 0.02 / 3)
    # In the first bucket, from 0; in +Inf, the highest finite bound.
    assert status.histogram_quantile(0.5, {0.1: 4, math.inf: 4}) == pytest.approx(0.05)
    assert status.histogram_quantile(0.5, {0.1: 1, math.inf: 5}) == 0.1


def test_a_bucket_counted_below_the_one_under_it_is_read_as_equal():
    # As Prometheus's ensureMonotonic: 0.2's 0 is read as 1, so rank 2 lies 1/3 into (0.2, 0.3].
    assert status.histogram_quantile(0.5, {0.1: 1, 0.2: 0, 0.3: 4, math.inf: 4}) == pytest.approx(0.2 + 0.1 / 3)


@pytest.mark.parametrize("buckets", [{0.1: 0, math.inf: 0}, {0.1: 3}, {math.inf: 3}, {}])
def test_no_quantile_without_observations_or_an_inf_bucket(buckets):
    assert status.histogram_quantile(0.5, buckets) is None


def test_an_instance_sampled_twice_gives_the_columns_prometheus_would():
    values = status.sampled_values(reading(BEFORE, 100.0), reading(AFTER, 112.5), RELEASE)
    assert values["up"] == 1.0 and values["release"] == RELEASE
    # Gauges of the second reading, summed over the engines (KV: the fuller one), as the queries do.
    assert (values["running"], values["waiting"], values["kv"]) == (3.0, 4.0, 0.5)
    # Over the seconds between the two pages, not a nominal window.
    assert values["tokens_s"] == pytest.approx((300 + 100) / 12.5)
    # Summed over the engines by bucket: 0.02: 1, 0.04: 3, 0.06: 6, 0.08: 8 of 8; rank 4.
    assert values["ttft_p50"] == pytest.approx(0.04 + 0.02 / 3)
    assert status.rows({("lab1", "a"): values}) == [("lab1:a", "up", RELEASE, "3", "4", "50%", "32.0", "47 ms")]


def test_a_window_without_requests_shows_no_ttft():
    values = status.sampled_values(reading(AFTER, 100.0), reading(AFTER, 110.5), RELEASE)
    assert values["tokens_s"] == 0.0 and values["ttft_p50"] is None
    assert status.rows({("lab1", "a"): values})[0][6:] == ("0.0", "-")


def test_a_restart_in_the_window_counts_from_zero_rather_than_going_negative():
    restarted = vllm_page({"0": engine(tokens=120, ttft={"0.1": 2, "0.25": 4})})
    values = status.sampled_values(reading(AFTER, 100.0), reading(restarted, 110.0), RELEASE)
    assert values["tokens_s"] == pytest.approx(12.0)
    assert values["ttft_p50"] == pytest.approx(0.1)


def test_an_instance_that_does_not_answer_is_down_with_nothing_else():
    values = status.sampled_values(reading(AFTER, 100.0), reading(None, None, health=None), RELEASE)
    assert status.rows({("lab2", "a"): values}) == [("lab2:a", "DOWN", RELEASE, "-", "-", "-", "-", "-")]


def test_an_instance_up_only_for_the_second_reading_has_gauges_but_no_rates():
    values = status.sampled_values(reading(None, None, health=None), reading(AFTER, 110.0), RELEASE)
    assert status.rows({("lab2", "a"): values}) == [("lab2:a", "up", RELEASE, "3", "4", "50%", "-", "-")]


def test_a_metric_the_page_lacks_is_unknown_not_zero():
    renamed = AFTER.replace("vllm:num_requests_waiting", "vllm:num_requests_queued")
    values = status.sampled_values(reading(BEFORE, 100.0), reading(renamed, 110.0), RELEASE)
    assert values["waiting"] is None and values["running"] == 3.0


def test_the_header_names_the_window_of_each_source():
    assert status.table({}, "10s").split()[-4:] == ["(10s)", "TTFT", "p50", "(10s)"]
    assert "tokens/s (5m)" in status.table({}, status.WINDOW)


def test_the_host_script_keeps_exactly_the_vllm_metrics_the_queries_read():
    assert status.sampled_metric_names() == sorted(status.metric_names() - {"up"})
    assert set(status.sampled_metric_names()) <= release_metrics(RELEASE, REPO / "inventories" / "releases")


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
    assert status.rows(status.prometheus_values(ANSWERS)) == [
        ("lab1:a", "up", "r1", "2", "5", "46%", "12.3", "42 ms"),
        ("lab1:b", "up", "r1", "0", "0", "0%", "0.0", "-"),
        # Down: only `up` answers for it, the rest is unknown rather than 0.
        ("lab2:a", "DOWN", "r2", "-", "-", "-", "-", "-"),
    ]


def test_the_table_is_aligned_under_its_header():
    lines = status.table(status.prometheus_values(ANSWERS), status.WINDOW).splitlines()
    assert lines[0].split()[:3] == ["instance", "health", "release"] and len(lines) == 4
    assert {line.index("r") for line in lines[1:]} == {lines[0].index("release")}


def test_the_status_view_reads_only_metrics_the_release_exposes():
    assert status.metric_names() == {"up", "vllm:num_requests_running", "vllm:num_requests_waiting",
                                     "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total",
                                     "vllm:time_to_first_token_seconds_bucket"}


# ---- the host script and the command -------------------------------------------------------------

@contextmanager
def fake_instance(pages: list[str], health: int = 200):
    """A vLLM stand-in on 127.0.0.1: /health answers ``health``; /metrics each of ``pages`` in
    turn, then the last again. Yields its port."""
    served = iter(pages)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"" if self.path == "/health" else next(served, pages[-1]).encode()
            self.send_response(health if self.path == "/health" else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_host_script_reads_each_instance_twice_a_window_apart():
    down = closed_port()
    with fake_instance([BEFORE, AFTER]) as port:
        # As the command sends it: the file's text through `python3 -c`.
        done = subprocess.run([sys.executable, "-c", SAMPLE_INSTANCES.read_text(), "--address", "127.0.0.1",
                               "--instance", f"a:{port}", "--instance", f"b:{down}", "--window", "1", "--timeout", "2",
                               *[arg for name in status.sampled_metric_names() for arg in ("--metric", name)]],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    (first, second), (down_first, down_second) = answer["a"], answer["b"]
    assert first["health"] == second["health"] == 200 and first["error"] is None
    # A window apart, give or take how long each request took.
    assert 0.9 < second["at"] - first["at"] < 5.0
    # Only the sample lines of the status view's metrics come back, exactly as served.
    kept = [line for line in AFTER.splitlines() if line.split("{")[0] in status.sampled_metric_names()]
    assert second["metrics"].splitlines() == kept and "cache_config_info" not in second["metrics"]
    assert first["metrics"] != second["metrics"]
    assert down_first["health"] is None and down_second["metrics"] is None
    assert "ConnectionRefusedError" in down_second["error"]
    values = status.sampled_values(first, second, RELEASE)
    assert 400 / 5.0 < values["tokens_s"] < 400 / 0.9


def local_inventory(tmp_path: Path, host_data, ports: dict[str, int], **groups: str) -> str:
    """An inventory whose one instance host is this machine (pyinfra's @local connector, no ssh),
    its instances on loopback at ``ports``; ``groups``: more inventory lines."""
    data = host_data(vllm_advertise_address="127.0.0.1",
                     vllm_instances=[{"name": name, "port": port} for name, port in ports.items()])
    del data["ssh_hostname"]
    inventory = tmp_path / "inventory.py"
    inventory.write_text("\n".join([f"vllm = [('@local', {data!r})]", "lb = ['@local']", *groups.values()]) + "\n")
    return str(inventory)


@pytest.mark.parametrize("monitored", [False, True])
def test_the_command_reads_the_instances_straight_from_their_host(tmp_path, host_data, monitored):
    # With a monitor group, --direct makes it read the instances all the same.
    extra = {"monitor": "monitor = ['@local']"} if monitored else {}
    with fake_instance([BEFORE, AFTER]) as port:
        inventory = local_inventory(tmp_path, host_data, {"a": port, "b": closed_port()}, **extra)
        result = vllm_fleet("status", inventory, "--window", "1", *(["--direct"] if monitored else []))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "straight from the instances, sampled over 1 s:"
    assert "tokens/s (1s)" in lines[1] and "TTFT p50 (1s)" in lines[1]
    (a, b) = (line.split() for line in lines[2:])
    assert a[:6] == ["@local:a", "up", RELEASE, "3", "4", "50%"] and a[7:] == ["47", "ms"]
    assert 400 / 5.0 < float(a[6]) < 400 / 0.9
    assert b == ["@local:b", "DOWN", RELEASE, "-", "-", "-", "-", "-"]
    assert "@local:b: first reading: ConnectionRefusedError" in result.stderr


def test_a_host_that_cannot_be_reached_is_named_and_fails_the_command(tmp_path):
    # The example production fleet (no monitor group) on names that never resolve.
    inventory = tmp_path / "prod.py"
    inventory.write_text((REPO / "inventories" / "prod.py").read_text().replace(".internal", ".invalid"))
    result = vllm_fleet("status", str(inventory), "--window", "1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout.startswith("straight from the instances")
    assert "host gpu-01.invalid: not read: Could not resolve hostname" in result.stderr
    assert "Left out of the table: gpu-01.invalid:a, gpu-01.invalid:b." in result.stderr
    assert "host gpu-02.invalid: not read" in result.stderr


@pytest.mark.parametrize("window", ["0.5", "121", "nan", "-3"])
def test_a_window_out_of_bounds_is_refused_before_connecting(window):
    result = vllm_fleet("status", "inventories/prod.py", "--window", window)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == "", result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "refused: `vllm-fleet status --window`" and lines[1].startswith("  problem: ")
    assert lines[2] == "  fix: give 1 to 120 seconds (default 10)."


def test_a_window_for_the_prometheus_view_is_refused(tmp_path, host_data):
    inventory = local_inventory(tmp_path, host_data, {"a": closed_port()}, monitor="monitor = ['@local']")
    result = vllm_fleet("status", inventory, "--window", "30")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "but this fleet's view comes from Prometheus on @local" in result.stderr
    assert "add --direct" in result.stderr.splitlines()[2]
