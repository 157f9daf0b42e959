"""roles/files/gpu_metrics.py: NVIDIA XID events from the kernel log (journalctl), counted per GPU
across runs through a state file and a journal cursor, as Prometheus counters for the node
exporter's textfile collector. The rest of its exposition: test_gpu_metrics_exposition.py.

No GPU here: NVML and journalctl are stand-ins (tests/unit/gpu_scripts.py); the exposition text
is checked by the independent parser there."""

import json

import pytest

from tests.unit.gpu_scripts import (
    KERNEL_LOG,
    P,
    eight_gpu_host,
    gpu_host,
    gpu_metrics,
    label_sets,
    names,
    parse_exposition,
    value,
)


@pytest.fixture
def host(tmp_path):
    return gpu_host(tmp_path)


def test_xid_lines_of_the_kernel_log():
    assert gpu_metrics.parse_xid_lines(KERNEL_LOG) == [
        ("0000:3a:00", 63), ("0000:2a:00", 48), ("0000:5d:00", 94), ("0000:9a:00", 13), ("0000:c1:00", 79),
        ("0000:18:00", 79)]
    assert gpu_metrics.pci_key("00000000:DB:00.0") == gpu_metrics.pci_key("0000:db:00") == "0000:db:00"


def test_xids_count_per_gpu_and_other_addresses_are_skipped():
    state = gpu_metrics.count_xids({}, gpu_metrics.parse_xid_lines(KERNEL_LOG), eight_gpu_host())
    assert state["counts"] == {"2": {"63": 1}, "1": {"48": 1}, "3": {"94": 1}, "4": {"13": 1}, "0": {"79": 1}}
    assert state["last"]["0"] == 79
    assert state["pci"]["0000:db:00"] == 7 and "0000:c1:00" not in state["pci"]
    # Counted again on top: counts only go up, and the last XID is the latest one.
    again = gpu_metrics.count_xids(state, [("0000:18:00", 79), ("0000:18:00", 13)], eight_gpu_host())
    assert again["counts"]["0"] == {"79": 2, "13": 1} and again["last"]["0"] == 13
    assert state["counts"]["0"] == {"79": 1}  # the state given is not changed
    series = parse_exposition(gpu_metrics.exposition(eight_gpu_host(), 8, again))
    assert value(series, f"{P}xid_events_total", gpu="0", xid="79") == 2
    assert value(series, f"{P}xid_events_total", gpu="0", xid="13") == 1
    assert value(series, f"{P}xid_last", gpu="0") == 13
    # Every GPU has the well-known fault XIDs at 0 from the start, for increase() in alert rules.
    assert value(series, f"{P}xid_events_total", gpu="7", xid="79") == 0
    assert {labels["xid"] for labels in label_sets(series, f"{P}xid_events_total") if labels["gpu"] == "7"} == {
        str(x) for x in gpu_metrics.SEEDED_XIDS}
    assert [labels["gpu"] for labels in label_sets(series, f"{P}xid_last")] == ["0", "1", "2", "3", "4"]


# ---- the script, run as the timer runs it --------------------------------------------------------

def xid_counts(series):
    return {(dict(ls)["gpu"], dict(ls)["xid"]): v for (n, ls), v in series.items()
            if n == f"{P}xid_events_total" and v}


def test_xid_counts_accumulate_across_runs_through_the_state_file(host):
    host.log(KERNEL_LOG[3], KERNEL_LOG[9])  # XID 63 on GPU 2, XID 79 on GPU 0
    first = host.run()
    assert first.returncode == 0, first.stderr
    assert xid_counts(host.series()) == {("2", "63"): 1, ("0", "79"): 1}
    assert value(host.series(), f"{P}xid_source_up") == 1

    # Between two runs GPU 0 falls off the bus again and then NVML cannot open it any more: its
    # XID still counts, through the PCI address the state kept. A foreign address is skipped.
    machine = eight_gpu_host()
    machine["gpus"][0] = {"error": "NVMLError_GpuIsLost: GPU is lost"}
    host.machine(machine)
    host.log(KERNEL_LOG[9], KERNEL_LOG[8], KERNEL_LOG[4])
    second = host.run()
    assert second.returncode == 0, second.stderr
    series = host.series()
    assert xid_counts(series) == {("2", "63"): 1, ("0", "79"): 2, ("1", "48"): 1}
    assert value(series, f"{P}xid_last", gpu="0") == 79 and value(series, f"{P}count") == 7
    # Each run asked for the lines after the last one it read: none was read twice.
    calls = host.calls()
    assert "--boot" in calls[0] and "--after-cursor" not in calls[0]
    assert calls[1][calls[1].index("--after-cursor") + 1] == "s=c4"

    # The kernel log cannot be read: the counts stay as they were (never down), reported as such,
    # and the position stays for the next run.
    (host.root / "journal" / "denied").touch()
    third = host.run()
    assert third.returncode == 0 and "XID events not read" in third.stderr
    assert xid_counts(host.series()) == xid_counts(series) and value(host.series(), f"{P}xid_source_up") == 0
    (host.root / "journal" / "denied").unlink()
    host.log(KERNEL_LOG[5])
    assert host.run().returncode == 0
    assert xid_counts(host.series()) == {("2", "63"): 1, ("0", "79"): 2, ("1", "48"): 1, ("3", "94"): 1}
    assert host.calls()[-1][host.calls()[-1].index("--after-cursor") + 1] == "s=c7"


def test_a_cursor_journalctl_refuses_falls_back_to_the_time_of_the_last_read(host):
    assert host.run().returncode == 0
    state = json.loads(host.state.read_text())
    host.state.write_text(json.dumps({**state, "cursor": "s=rotated-away", "time": 1_795_934_000 + 3}))
    host.log(KERNEL_LOG[4])
    done = host.run()
    assert done.returncode == 0, done.stderr
    assert xid_counts(host.series()) == {("1", "48"): 1}
    assert host.calls()[-1][host.calls()[-1].index("--since") + 1] == "@1795934003"
    assert json.loads(host.state.read_text())["cursor"] == "s=c3"


def test_a_lost_or_broken_state_file_starts_counting_again(host):
    host.log(KERNEL_LOG[4])
    assert host.run().returncode == 0
    host.state.write_text("{not json")
    done = host.run()
    assert done.returncode == 0 and "XID counts start again from 0" in done.stderr
    assert xid_counts(host.series()) == {("1", "48"): 1}  # this boot's lines, read afresh


def test_without_a_state_file_no_xid_metrics(host):
    done = host.run(state=False)
    assert done.returncode == 0, done.stderr
    assert not any(n.startswith(f"{P}xid") for n in names(host.series()))
    assert not (host.root / "journal" / "calls").exists()
