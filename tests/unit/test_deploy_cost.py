"""`vllm-fleet lab deploy-cost` without the lab: pyinfra's Grand total, the byte counters and their
deltas, the goals' ratios and verdicts, the table, the rounds' order and their stop at a failure
(the lab and pyinfra replaced by stand-ins), the saved result read back, its plot, and the
command's refusals before it touches anything."""

import json
import re
from pathlib import Path

import pytest

from roles.cli import main
from roles.errors import FleetConfigError
from roles.lab import deploy_cost
from roles.lab import deploy_cost_report as cost
from roles.lab.config import BRIDGE, veth_name

REPO = Path(__file__).resolve().parents[2]
MB = 10**6

# The end of a real `pyinfra -y @local d.py` (pyinfra 3.10), two operations: one changed, one not.
PYINFRA_OUTPUT = """\
--> Starting operation: a folder that exists
    [@local] No changes

--> Results:
    Operation              Hosts   Success   Error   No Change
    a shell command        1       1         -       -
    a folder that exists   1       -         -       1
    Grand total            2       1         -       1

--> Disconnecting from hosts...
"""


def measurement(seconds: float, out_mb: float, host_mb: list[float], changed: int = 0,
                returncode: int = 0) -> dict:
    return {"seconds": seconds, "returncode": returncode, "timed_out": False,
            "totals": {"operations": 40, "changed": changed, "errors": 0, "unchanged": 40 - changed},
            "control_out_bytes": int(out_mb * MB), "control_in_bytes": 2 * MB,
            "host_in_bytes": {f"lab{i}": int(mb * MB) for i, mb in enumerate(host_mb, 1)}, "log": "x.log"}


def a_round(n: int, first_s: float, noop_s: float, out_mb: float = 600.0, noop_changed: int = 0) -> dict:
    return {"n": n, "hosts": [f"lab{i}" for i in range(1, n + 1)],
            "first": measurement(first_s, out_mb, [600.0] + [590.0] * (n - 1)),
            "noop": measurement(noop_s, 0.4, [0.1] * n, changed=noop_changed)}


def a_result(rounds: list[dict], failed: dict | None = None) -> dict:
    return {"kind": "deploy-cost", "started": "2026-01-02T03:04:05+00:00", "finished": None,
            "machine": {"node": "labhost", "cpus": 2, "cpu_model": "AMD EPYC", "platform": "Linux", "python": "3.11"},
            "release": "cpu-vllm-0.32.0", "wheelhouse": {"path": "/w", "bytes": 585 * MB, "prebuilt": True},
            "model": {"path": ".cache/models/tiny-llama", "bytes": 3 * MB, "built_now": False},
            "deploy": "pyinfra -y inventories/lab.py deploys/install.py", "hosts": [r["n"] for r in rounds],
            "apt_proxy_cache_kept": True, "apt_note": deploy_cost.APT_NOTE, "logs": "/logs", "rounds": rounds,
            "failed": failed}


# ---- pyinfra's Grand total, the host counts -------------------------------------------------------

def test_grand_total_of_real_pyinfra_output():
    assert cost.grand_total(PYINFRA_OUTPUT) == {"operations": 2, "changed": 1, "errors": 0, "unchanged": 1}


def test_grand_total_read_through_colours_and_absent_when_the_run_stopped_early():
    coloured = PYINFRA_OUTPUT.replace("Grand total", "\x1b[1mGrand total\x1b[0m").replace(" 1       -",
                                                                                           " \x1b[32m1\x1b[0m       -")
    assert cost.grand_total(coloured)["changed"] == 1
    assert cost.grand_total(PYINFRA_OUTPUT.split("--> Results:")[0]) is None
    # An operation named "Grand total ..." is no totals row: only a row of four figures counts.
    assert cost.grand_total("    Grand total of a file   1   2   3   4\n") is None


def test_host_counts_ascending_and_distinct_and_refused_before_anything():
    assert cost.parse_hosts("8,1,4,2,4", most=244) == [1, 2, 4, 8]
    for text in ("0,2", "two", "", "1,,2", "300"):
        with pytest.raises(FleetConfigError, match="is not a list of host counts"):
            cost.parse_hosts(text, most=244)


# ---- the counters ---------------------------------------------------------------------------------

def test_bytes_out_of_the_control_node_are_the_bridges_tx_and_into_a_host_its_veths_tx(tmp_path):
    hosts = ["lab1", "lab2"]
    devices = [BRIDGE, *(veth_name(h) for h in hosts)]

    def write(values: dict[str, tuple[int, int]]) -> None:
        for device, (tx, rx) in values.items():
            (tmp_path / device / "statistics").mkdir(parents=True, exist_ok=True)
            (tmp_path / device / "statistics" / "tx_bytes").write_text(f"{tx}\n")
            (tmp_path / device / "statistics" / "rx_bytes").write_text(f"{rx}\n")

    write({BRIDGE: (1000, 50), veth_name("lab1"): (10, 0), veth_name("lab2"): (20, 0)})
    before = deploy_cost.read_counters(devices, root=tmp_path)
    write({BRIDGE: (601_000, 2050), veth_name("lab1"): (600_010, 0), veth_name("lab2"): (590_020, 7)})
    after = deploy_cost.read_counters(devices, root=tmp_path)
    assert deploy_cost.traffic(before, after, hosts) == {
        "control_out_bytes": 600_000, "control_in_bytes": 2000, "host_in_bytes": {"lab1": 600_000, "lab2": 590_000}}


# ---- goals, flags, the table ----------------------------------------------------------------------

def test_goals_pass_with_their_ratios():
    rounds = [a_round(1, 180, 9.0, 600), a_round(2, 200, 10, 610), a_round(4, 300, 11, 612),
              a_round(8, 470, 12.6, 618)]
    lines = [goal.line() for goal in cost.goals(rounds)]
    assert lines == ["out of the control node, first install: max/min over N = 1.03 (goal ≤ 1.10): PASS",
                     "no-op wall, N=8 / N=1 = 1.40 (goal ≤ 2): PASS",
                     "first-install wall, N=8 / N=1 = 2.61 (goal ≤ 3): PASS"]


def test_goals_miss_just_past_their_limits_and_rounds_are_taken_in_order_of_n():
    rounds = [a_round(8, 541, 18.1, 661), a_round(1, 180, 9.0, 600)]
    assert [(g.verdict, round(g.ratio, 3)) for g in cost.goals(rounds)] == [
        ("MISS", 1.102), ("MISS", 2.011), ("MISS", 3.006)]


def test_debian_packages_the_lab_proxy_served_are_not_counted_as_leaving_the_control_node(tmp_path):
    """The lab's hosts get their Debian packages from this machine's apt proxy; a fleet's get them
    from their mirror. What the proxy served during the deploy (its transfer log) is set apart."""
    log = tmp_path / "apt-cacher.log"
    log.write_text("1000|O|500|10.213.7.11|old.deb\n1010|I|7000000|10.213.7.11|x.deb\n"
                   "1010|O|7000000|10.213.7.11|x.deb\n1020|O|3000000|10.213.7.12|y.deb\n1099|O|9|10.213.7.12|late.deb\n")
    assert deploy_cost.apt_proxy_bytes(1005, 1050, log) == 10_000_000
    assert deploy_cost.apt_proxy_bytes(1005, 1050, tmp_path / "none.log") == 0
    rounds = [a_round(1, 180, 9.0, 610), a_round(8, 470, 12.6, 770)]
    rounds[0]["first"]["apt_proxy_bytes"], rounds[1]["first"]["apt_proxy_bytes"] = 10 * MB, 160 * MB
    assert cost.goals(rounds)[0].line() == \
        "out of the control node, first install: max/min over N = 1.02 (goal ≤ 1.10): PASS"
    assert "600.0 MB" in cost.table(rounds).splitlines()[1] and "160.0 MB" in cost.table(rounds).splitlines()[2]


def test_goals_not_measured_without_two_successful_rounds():
    failed = a_round(8, 500, 9.0)
    failed["first"]["returncode"] = 1
    del failed["noop"]
    for rounds in ([a_round(1, 180, 9.0)], [a_round(1, 180, 9.0), failed]):
        goals = cost.goals(rounds)
        assert [g.verdict for g in goals] == ["not measured"] * 3
        assert goals[1].line() == "no-op wall, largest N / smallest N = - (goal ≤ 2): not measured"


def test_a_rerun_that_changed_something_is_flagged():
    rounds = [a_round(1, 180, 9.0), a_round(2, 200, 10, noop_changed=3), a_round(4, 300, 11)]
    rounds[2]["noop"]["totals"] = None
    assert cost.not_noops(rounds) == ["N=2: the re-run changed 3 operations: not a no-op",
                                      "N=4: the re-run printed no Grand total, so its changes are unknown"]
    assert cost.not_noops([a_round(1, 180, 9.0)]) == []


def test_table_rows_line_up_under_their_headers():
    rounds = [a_round(1, 184, 9.1, 612.5), a_round(2, 230, 10.2, 615.0)]
    lines = cost.table(rounds).splitlines()
    assert lines[0].split("  ")[0] == "hosts" and "into each host (mean / max)" in lines[0]
    assert re.fullmatch(r"\s+1\s+612\.5 MB\s+0\.0 MB\s+600\.0 / 600\.0 MB\s+184 s\s+-\s+-\s+9\.1 s\s+0\.4 MB\s+0",
                        lines[1]), lines[1]
    assert "595.0 / 600.0 MB" in lines[2]
    assert {len(line) for line in lines} == {len(lines[0])}


def test_cpu_seconds_and_how_busy_the_cpus_were_say_what_bounds_the_wall_time():
    rounds = [a_round(1, 50, 3.0), a_round(8, 280, 4.5)]
    rounds[0]["first"]["cpu"] = {"hosts_s": 40.0, "machine_s": 60.0, "stalled_s": 2.0, "cpus": 2}
    rounds[1]["first"]["cpu"] = {"hosts_s": 320.0, "machine_s": 532.0, "stalled_s": 252.0, "cpus": 2}
    rows = cost.table(rounds).splitlines()
    assert re.search(r"\s40 s\s+60%\s", rows[1]) and re.search(r"\s320 s\s+95%\s", rows[2]), rows
    assert cost.cpu_bound(rounds) == [
        "first install at N=8: the hosts used 320 CPU-seconds (40 each; 40 each at N=1) in 280 s on 2 CPUs, which "
        "were 95% busy; some task waited for a CPU 90% of the time"]
    assert cost.cpu_bound(rounds[:1]) == []


def test_table_shows_a_failed_deploy_and_what_was_not_measured():
    broken = a_round(4, 2400, 0)
    broken["first"]["returncode"] = None
    broken["first"]["timed_out"] = True
    del broken["noop"]
    row = cost.table([broken]).splitlines()[1]
    assert "failed, 600.0 MB" in row and row.split()[-6:] == ["s", "-", "-", "-", "-", "-"]


def test_report_names_the_machine_the_goals_and_where_it_stopped():
    failed = {"n": 4, "step": "first install", "problem": "pyinfra exited 1", "log": "/logs/N4-first.log"}
    text = cost.report(a_result([a_round(1, 180, 9.0), a_round(2, 200, 10.0)], failed))
    assert "measured on labhost: AMD EPYC (2 CPUs)" in text
    assert "one copy of the release's wheels and the model: 588.0 MB" in text and "apt proxy" in text
    assert "first-install wall, N=2 / N=1 = 1.11 (goal ≤ 3): PASS" in text
    assert text.splitlines()[-1] == "stopped at N=4, first install: pyinfra exited 1 (log: /logs/N4-first.log)"


# ---- the rounds, with stand-ins for the lab and pyinfra -------------------------------------------

def test_rounds_run_in_order_each_on_a_fresh_lab_and_stop_at_the_first_failed_deploy(tmp_path):
    calls, saved = [], []

    def lab(*args):
        calls.append(("lab", *args))

    def measure(hosts, log):
        calls.append(("deploy", len(hosts), log.name))
        return measurement(1.0, 600, [600] * len(hosts), returncode=1 if log.name == "N4-noop.log" else 0)

    def refresh(hosts):
        calls.append(("indexes", *hosts))

    result = a_result([])
    done = deploy_cost.run_rounds([1, 4, 8], tmp_path, result, lambda: saved.append(len(result["rounds"])),
                                  lab=lab, measure=measure, refresh=refresh)
    assert not done
    assert calls == [("lab", "down", "--keep-base"), ("lab", "up", "--hosts", "1"), ("indexes", "lab1"),
                     ("deploy", 1, "N1-first.log"), ("deploy", 1, "N1-noop.log"),
                     ("lab", "down", "--keep-base"), ("lab", "up", "--hosts", "4"),
                     ("indexes", "lab1", "lab2", "lab3", "lab4"),
                     ("deploy", 4, "N4-first.log"), ("deploy", 4, "N4-noop.log")]
    assert [r["n"] for r in result["rounds"]] == [1, 4] and result["rounds"][1]["hosts"][-1] == "lab4"
    assert result["failed"] == {"n": 4, "step": "no-op re-run", "problem": "pyinfra exited 1",
                                "log": str(tmp_path / "N4-noop.log")}
    assert saved and saved[-1] == 2  # saved after the failure too: the JSON keeps what was measured


def test_a_lab_that_does_not_come_up_stops_the_rounds(tmp_path):
    import subprocess

    def lab(*args):
        if args[0] == "up":
            raise subprocess.CalledProcessError(1, ["vllm-fleet", "lab", *args])

    result = a_result([])
    assert not deploy_cost.run_rounds([2], tmp_path, result, lambda: None, lab=lab, measure=None, refresh=None)
    assert result["rounds"] == [] and result["failed"]["step"] == "fresh lab"


# ---- the lab's release, the saved result, the plot, the command line ------------------------------

def test_the_lab_release_and_model_are_read_from_the_lab_inventory_as_make_lab_installs_them():
    settings = deploy_cost.lab_settings((REPO / "inventories" / "lab.py").read_text())
    makefile = (REPO / "Makefile").read_text()
    assert f"RELEASE := {settings['vllm_release']}\n" in makefile
    assert f"MODEL := {settings['vllm_model_path']}\n" in makefile


def test_a_saved_result_reads_back_and_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(a_result([a_round(1, 180, 9.0)])))
    assert cost.read_result(path)["rounds"][0]["n"] == 1
    (tmp_path / "bench.json").write_text(json.dumps({"label": "edge", "points": []}))
    for name in ("bench.json", "missing.json"):
        with pytest.raises(FleetConfigError):
            cost.read_result(tmp_path / name)


def test_plot_is_a_png(tmp_path):
    result = a_result([a_round(1, 180, 9.0), a_round(2, 200, 10.0), a_round(8, 470, 12.0)],
                      failed={"n": 8, "step": "no-op re-run", "problem": "pyinfra exited 1", "log": None})
    png = cost.plot(result, tmp_path / "plots" / "cost.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_only_reports_and_draws_a_saved_result_without_the_lab(tmp_path, capsys):
    path = tmp_path / "20260102-030405-deploy-cost.json"
    path.write_text(json.dumps(a_result([a_round(1, 180, 9.0), a_round(8, 470, 12.6)])))
    assert main(["lab", "deploy-cost", "--plot-only", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no-op wall, N=8 / N=1 = 1.40 (goal ≤ 2): PASS" in out
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bad_host_counts_are_refused_before_the_lab_is_touched(monkeypatch, capsys):
    def touched(*args, **kwargs):
        raise AssertionError("the lab was touched")

    monkeypatch.setattr(deploy_cost, "require_root", touched)
    monkeypatch.setattr(deploy_cost, "lab_cli", touched)
    assert main(["lab", "deploy-cost", "--hosts", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "refused: `vllm-fleet lab deploy-cost --hosts`" in err and "e.g. 1,2,4,8" in err
