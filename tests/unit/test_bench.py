"""`vllm-fleet bench` without the lab: the summary of a real `vllm bench serve` result (saved from
the lab's edge in tests/fixtures/bench/), medians, the table, the refusals of the command line's
values, the plot, the bench venv's checks and the runner's messages."""

import copy
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from roles import bench, secrets
from roles.cli import main
from roles.errors import FleetConfigError
from roles.plan import bench as plan
from roles.plan.edge import Secret

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bench"
RAW_RESULT = FIXTURES / "vllm-result-edge-c2.json"  # vllm bench serve --save-detailed, 6 requests at c=2
RUN = FIXTURES / "run-edge-least_conn.json"  # `vllm-fleet bench inventories/lab.py --concurrency 1,2 --num-prompts 20`
KEY = "sk-fleet-test-key-that-must-never-show-0123456789"


def raw_result() -> dict:
    return json.loads(RAW_RESULT.read_text())


def run_record() -> dict:
    return json.loads(RUN.read_text())


def target(kind: str = "edge", url: str = "https://edge.example:443") -> plan.Target:
    return plan.Target(label=f"{kind} x", kind=kind, base_url=url, api_key=Secret(KEY), ca_file=Path("/ca.pem"),
                       served_model="tiny-llama", tokenizer="/models/tiny", host="lab1")


# ---- summaries, medians, the table ----------------------------------------------------------------

def test_summary_of_a_real_result_keeps_the_figures_and_drops_per_request_lists():
    summary = plan.summarize(raw_result())
    assert not set(plan.PER_REQUEST_KEYS) & set(summary)
    assert (summary["completed"], summary["failed"], summary["error_counts"]) == (6, 0, {})
    for metric in ("request_throughput", "output_throughput", "request_goodput", "p50_ttft_ms", "p99_ttft_ms",
                   "p50_itl_ms", "p99_itl_ms", "p50_tpot_ms", "p99_e2el_ms", "mean_ttft_ms", "median_itl_ms"):
        assert isinstance(summary[metric], float), metric


def test_summary_counts_the_errors_of_failed_requests_by_their_last_line():
    result = raw_result()
    result["errors"][:3] = ["Traceback (most recent call last):\n  ...\nClientResponseError: 429, Too Many Requests"] * 2 \
        + ["Cannot connect to host 10.0.0.1:8001"]
    counts = plan.summarize(result)["error_counts"]
    assert counts == {"ClientResponseError: 429, Too Many Requests": 2, "Cannot connect to host 10.0.0.1:8001": 1}


def test_requests_lost_to_the_bench_clients_own_parse_error_are_no_failures_of_the_fleet():
    # vllm bench serve's SSE reader strips each read: a read ending just after "data: " makes the
    # next event unparsable (vllm-project/vllm#51172). As its error reads in a saved result:
    result = raw_result()
    result["errors"][:2] = ["Traceback (most recent call last):\n  File \"...\", line 253, in async_request_openai_chat_"
                            "completions\n    data = json.loads(chunk)\njson.decoder.JSONDecodeError: Expecting value: "
                            "line 1 column 1 (char 0)\n", "ClientResponseError: 502, Bad Gateway"]
    result["completed"], result["failed"] = 4, 2
    summary = plan.summarize(result)
    assert (summary["failed"], summary["client_parse_failed"]) == (1, 1)
    line = plan.point_summary("edge", plan.Point("concurrency", 2), summary)
    assert "1 failed" in line and "1 more lost by vllm bench's own SSE reader (vllm-project/vllm#51172)" in line


def test_medians_are_taken_per_target_and_load_over_the_repeats():
    base = plan.summarize(raw_result())
    points = [{"target": "edge", "axis": "concurrency", "value": 2, "repeat": i, "error": None,
               "result": {**base, "p50_ttft_ms": ttft}} for i, ttft in enumerate((100.0, 300.0, 120.0))]
    points.append({"target": "edge", "axis": "concurrency", "value": 4, "repeat": 0, "error": "no result within "
                   "the point's timeout of 600 s", "result": None})
    first, second = plan.median_points(points)
    assert (first["value"], first["repeats"], first["p50_ttft_ms"]) == (2, 3, 120.0)
    assert (second["repeats"], second["p50_ttft_ms"], second["errors"]) == (0, None, [points[-1]["error"]])


def test_the_table_has_a_line_per_target_and_load_with_ok_and_failed_requests():
    rows = plan.median_points(run_record()["points"])
    text = plan.table(rows)
    header, c1, c2, note = text.splitlines()
    assert header.split()[:3] == ["target", "load", "ok/failed"] and "goodput" in header
    assert c1.startswith("edge least_conn") and " c=1 " in c1 and " 20/0 " in c1
    assert " c=2 " in c2 and "ms" in note


# ---- the command line's values --------------------------------------------------------------------

@pytest.mark.parametrize("concurrency, problem", [("1,x", "'x'"), ("0", "'0'"), ("1,1", "repeats a value"),
                                                  ("1.5", "'1.5'"), ("", "''"), ("100000", "'100000'")])
def test_a_bad_concurrency_list_is_refused(concurrency, problem):
    with pytest.raises(FleetConfigError, match="--concurrency") as refused:
        plan.sweep_points(concurrency, None)
    assert problem in refused.value.problem


def test_concurrency_and_rate_sweeps():
    assert plan.sweep_points(None, None) == [plan.Point("concurrency", v) for v in (1, 2, 4)]
    assert [p.vllm_args() for p in plan.sweep_points(None, "0.5,2")] == [["--request-rate", "0.5"],
                                                                        ["--request-rate", "2"]]
    with pytest.raises(FleetConfigError, match="--concurrency` and `--rate"):
        plan.sweep_points("1", "1")


def test_goodput_takes_vllms_keys_and_refuses_itl_naming_tpot():
    assert plan.parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(FleetConfigError) as refused:
        plan.parse_goodput(["itl:50"])
    assert "tpot" in refused.value.fix
    for bad in (["ttft"], ["ttft:-1"], ["e2el:x"], ["ttft:1", "ttft:2"], ["latency:5"]):
        with pytest.raises(FleetConfigError, match="--goodput"):
            plan.parse_goodput(bad)


def test_requests_and_repeats_are_bounded():
    with pytest.raises(FleetConfigError, match="--num-prompts"):
        plan.check_num_prompts(plan.MAX_NUM_PROMPTS + 1)
    with pytest.raises(FleetConfigError, match="--repeat"):
        plan.check_repeat(0)


def test_the_flags_of_a_point_hold_no_key_and_fix_the_output_length():
    args = plan.vllm_bench_args(target(), plan.Workload(dataset="shared-prefix", output_len=16), plan.Point(
        "concurrency", 4), 40, {"ttft": 500.0}, Path("/tmp/out"), "r.json")
    assert KEY not in " ".join(args) and KEY not in repr(target())
    assert "--ignore-eos" in args and args[args.index("--dataset-name") + 1] == "prefix_repetition"
    assert args[args.index("--prefix-repetition-output-len") + 1] == "16"
    assert args[args.index("--max-concurrency") + 1] == "4" and args[args.index("--request-rate") + 1] == "inf"
    assert args[args.index("--goodput") + 1] == "ttft:500" and "--insecure" not in args


def test_the_record_file_is_named_by_time_and_label():
    assert plan.record_file_name("edge least_conn", "2026-12-07T05:39:06+00:00") == \
        "20261207-053906-edge-least_conn.json"


# ---- the plot -------------------------------------------------------------------------------------

def test_the_plot_of_a_run_has_labelled_axes_and_one_legend_entry_per_target(tmp_path):
    from roles.bench_plot import PANELS, draw_runs, plot_runs

    record = run_record()
    png = plot_runs([record], tmp_path / "run.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = draw_runs([record])
    panels = figure.axes[:len(PANELS)]
    for axes, (_, _, y_label) in zip(panels, PANELS):
        assert axes.get_xlabel() == "concurrency (requests in flight)"
        assert axes.get_ylabel() == y_label and ("(ms)" in y_label or "tokens/s" in y_label)
        assert [line.get_label() for line in axes.get_lines()] == ["edge least_conn"]
    assert [t.get_text() for t in figure.axes[5].get_legend().get_texts()] == ["edge least_conn"]
    assert "cpu-vllm-0.32.0" in figure._suptitle.get_text() and "random 128 in / 32 out" in figure._suptitle.get_text()


def test_a_comparison_draws_a_line_per_run_and_target_and_names_failures(tmp_path):
    from roles.bench_plot import draw_runs

    other = copy.deepcopy(run_record())
    other["label"] = "prefix"
    other["points"][0]["result"]["failed"] = 3
    figure = draw_runs([run_record(), other])
    legend = [t.get_text() for t in figure.axes[5].get_legend().get_texts()]
    assert legend == ["edge least_conn", "prefix: edge least_conn"]
    notes = figure.axes[5].texts[0].get_text()
    assert "3 failed requests" in notes and "c=1" in notes


def test_a_routing_comparison_draws_each_policys_hit_rate_with_its_balance():
    from roles.bench_plot import draw_runs

    record = copy.deepcopy(run_record())
    record["routing_comparison"] = [{"policy": "least_conn", "hit_rate": 0.2, "balance": 1.8},
                                    {"policy": "prefix", "hit_rate": 0.6, "balance": None}]
    figure = draw_runs([record])
    (bars,) = figure.axes[5].child_axes
    assert [round(b.get_height()) for b in bars.patches] == [20, 60]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["least_conn", "prefix"]
    assert [t.get_text() for t in bars.texts] == ["max/min 1.80", "max/min -"]
    assert bars.get_ylabel() == "prefix-cache hit rate (%)"
    assert not draw_runs([run_record()]).axes[5].child_axes


# ---- the CLI's refusals ---------------------------------------------------------------------------

def refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_cli_refuses_a_bad_concurrency_before_loading_anything(capsys):
    err = refused(capsys, "bench", "inventories/nope.py", "--concurrency", "1,two")
    assert "refused: `vllm-fleet bench --concurrency`" in err and "'two'" in err and "fix:" in err


def test_cli_refuses_compare_files_that_are_missing_or_not_bench_results(capsys, tmp_path):
    assert "does not exist" in refused(capsys, "bench", "--compare", str(RUN), str(tmp_path / "gone.json"))
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps(raw_result()))
    assert "is not a result of `vllm-fleet bench`" in refused(capsys, "bench", "--compare", str(foreign))
    assert "is not a .png file" in refused(capsys, "bench", "--compare", str(RUN), "--out", str(tmp_path / "x.jpg"))


def test_cli_compare_writes_the_png_and_prints_each_runs_table(capsys, tmp_path):
    assert main(["bench", "--compare", str(RUN), str(RUN), "--out", str(tmp_path / "both.png")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "both.png").is_file() and out.count("TTFT p50") == 2


def test_cli_refuses_a_target_list_and_direct_without_an_instance(capsys):
    assert "is not a list of edge and direct" in refused(capsys, "bench", "inventories/nope.py", "--target",
                                                         "edge,nginx")
    assert "add --direct HOST:INSTANCE" in refused(capsys, "bench", "inventories/nope.py", "--target", "edge,direct")
    assert "inventories/nope.py is not a file" in refused(capsys, "bench", "inventories/nope.py")


# ---- the runner -----------------------------------------------------------------------------------

def test_a_missing_wheelhouse_is_refused_naming_the_command(tmp_path):
    with pytest.raises(FleetConfigError) as refusal:
        bench.bench_venv("cpu-vllm-0.32.0", root=tmp_path / "venvs", wheelhouse_root=tmp_path / "none")
    assert "vllm-fleet release wheelhouse cpu-vllm-0.32.0" in refusal.value.fix


def test_a_bench_venv_stamped_with_the_locks_digest_is_used_as_it_is(tmp_path):
    from roles.release.lock import lock_path, read_lock
    from roles.release.manifest import RELEASES_DIR, load_release

    lock = read_lock(lock_path(load_release("cpu-vllm-0.32.0", RELEASES_DIR), RELEASES_DIR))
    venv = tmp_path / "cpu-vllm-0.32.0"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / bench.STAMP).write_text(lock.digest + "\n")
    # No wheelhouse here: a current venv must not need one.
    assert bench.bench_venv("cpu-vllm-0.32.0", root=tmp_path, wheelhouse_root=tmp_path / "none") == venv
    (venv / bench.STAMP).write_text("an older lock\n")
    with pytest.raises(FleetConfigError, match="wheelhouse"):
        bench.bench_venv("cpu-vllm-0.32.0", root=tmp_path, wheelhouse_root=tmp_path / "none")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_instance_is_one_paragraph_naming_the_host_and_the_firewall_setting():
    with pytest.raises(bench.BenchError) as failure:
        bench.check_reachable(target("direct", f"http://127.0.0.1:{closed_port()}"))
    message = str(failure.value)
    assert "\n" not in message and "host lab1" in message and "firewall_instance_allow_from" in message
    assert "cannot connect" in message and KEY not in message


def test_the_key_and_the_ca_go_in_the_environment_and_proxies_stay_out(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://elsewhere")
    env = bench.bench_environment(target())
    assert env["OPENAI_API_KEY"] == KEY and env["SSL_CERT_FILE"] == "/ca.pem"
    assert "HTTPS_PROXY" not in env and "OPENAI_BASE_URL" not in env


def lb_inventory(data: dict):
    host = SimpleNamespace(name="lb1", data=SimpleNamespace(dict=lambda: data))
    return SimpleNamespace(get_group=lambda name, default=None: [host] if name == "lb" else default)


def test_the_edge_target_wants_a_client_when_there_are_several(tmp_path):
    directory = tmp_path / "secrets"
    for name in ("alice", "bob"):
        secrets.add_client_key(directory, name)
    inventory = lb_inventory({"nginx_secrets_dir": str(directory), "ssh_hostname": "10.0.0.5"})
    with pytest.raises(FleetConfigError, match="--client") as refusal:
        bench.edge_target(inventory, SimpleNamespace())
    assert "alice, bob" in refusal.value.problem
    with pytest.raises(FleetConfigError, match="fleet CA"):  # bob is known; the fleet is not deployed yet
        bench.edge_target(inventory, SimpleNamespace(), "bob")


def test_the_routing_policy_is_read_from_the_load_balancer_with_a_default():
    assert bench.routing_policy(lb_inventory({})) == "least_conn"
    assert bench.routing_policy(lb_inventory({"nginx_routing": "prefix"})) == "prefix"
