"""`gpu_probe.py metrics`: NVML readings and kernel-log XIDs in Prometheus' text format, for the
node exporter's textfile collector on GPU hosts.

No GPU here: NVML is replaced by a stand-in pynvml that answers from readings as
`gpu_probe.py readings` records them (tests/fixtures/gpu/h200-readings.json was recorded on a real
H200), and journalctl by a stand-in that serves kernel log lines by cursor. The exposition text is
checked by an independent parser below and, where /usr/bin/promtool exists, by promtool."""

import copy
import importlib.util
import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from roles.files import gpu_probe  # a script the roles copy to hosts; importable for its pure parts
from roles.paths import GPU_PROBE

FIXTURES = Path(__file__).parents[1] / "fixtures" / "gpu"
PROMTOOL = Path(os.environ.get("PROMTOOL_UNDER_TEST", "/usr/bin/promtool"))


def recorded():
    return json.loads((FIXTURES / "h200-readings.json").read_text())


# ---- a stand-in for nvidia-ml-py ------------------------------------------------------------------

FAKE_PYNVML = r'''
"""Stand-in for nvidia-ml-py's pynvml, answering from a readings dict (MACHINE) in the shape
`gpu_probe.py readings` records: a value {"error": "NVMLError_X: text"} raises NVMLError_X, a reading
the dict lacks raises NVMLError_NotSupported. Call names, argument order and return shapes are those
of nvidia-ml-py 13.615.71 (the release's pin): structs with .total/.used, .gpu, .busId; tuples for
remapped rows; [current, pending] for modes."""
import json
import os
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1


class NVMLError(Exception):
    pass


def _error_class(name):
    if name not in globals():
        globals()[name] = type(name, (NVMLError,), {})
    return globals()[name]


for _name in ("NotSupported", "LibraryNotFound", "DriverNotLoaded", "GpuIsLost", "FunctionNotFound"):
    _error_class("NVMLError_" + _name)

MACHINE = json.loads(open(os.environ["FAKE_NVML_MACHINE"]).read()) if "FAKE_NVML_MACHINE" in os.environ else None


def _raise(recorded):
    name, _, text = recorded.partition(": ")
    raise _error_class(name)(text)


def _get(where, key):
    if key not in where:
        raise NVMLError_NotSupported("Not Supported")
    value = where[key]
    if isinstance(value, dict) and "error" in value:
        _raise(value["error"])
    return value


def nvmlInit():
    if "nvml_error" in MACHINE:
        _raise(MACHINE["nvml_error"])


def nvmlSystemGetDriverVersion():
    return _get(MACHINE, "driver_version")


def nvmlSystemGetCudaDriverVersion():
    return _get(MACHINE, "cuda_driver_version")


def nvmlDeviceGetCount():
    return len(MACHINE["gpus"])


def nvmlDeviceGetHandleByIndex(index):
    gpu = MACHINE["gpus"][index]
    if "error" in gpu:
        _raise(gpu["error"])
    return gpu


def nvmlDeviceGetName(h):
    return _get(h, "name")


def nvmlDeviceGetUUID(h):
    return _get(h, "uuid")


def nvmlDeviceGetPciInfo(h):
    return SimpleNamespace(busId=_get(h, "pci_bus_id"), bus=0, device=0, domain=0)


def nvmlDeviceGetMemoryInfo(h):
    total, used = _get(h, "memory_total_bytes"), _get(h, "memory_used_bytes")
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(h):
    return SimpleNamespace(gpu=_get(h, "utilization_gpu_percent"), memory=0)


def nvmlDeviceGetTemperature(h, sensor):
    assert sensor == NVML_TEMPERATURE_GPU
    return _get(h, "temperature_gpu_c")


def nvmlDeviceGetPowerUsage(h):
    return _get(h, "power_usage_mw")


def nvmlDeviceGetCurrentClocksEventReasons(h):
    return _get(h, "clock_event_reasons")


def nvmlDeviceGetPersistenceMode(h):
    return _get(h, "persistence_mode")


def nvmlDeviceGetEccMode(h):
    mode = _get(h, "ecc_mode")
    return [mode, mode]


def nvmlDeviceGetTotalEccErrors(h, error_type, counter):
    kind = {NVML_MEMORY_ERROR_TYPE_CORRECTED: "corrected", NVML_MEMORY_ERROR_TYPE_UNCORRECTED: "uncorrected"}
    span = {NVML_VOLATILE_ECC: "volatile", NVML_AGGREGATE_ECC: "aggregate"}
    return _get(h, f"ecc_{kind[error_type]}_{span[counter]}")


def nvmlDeviceGetRetiredPagesPendingStatus(h):
    return _get(h, "retired_pages_pending")


def nvmlDeviceGetRemappedRows(h):
    rows = _get(h, "remapped_rows")
    return (rows["correctable"], rows["uncorrectable"], rows["pending"], rows["failure"])


def nvmlDeviceGetCurrPcieLinkGeneration(h):
    return _get(h, "pcie_gen")


def nvmlDeviceGetMaxPcieLinkGeneration(h):
    return _get(h, "pcie_gen_max")


def nvmlDeviceGetCurrPcieLinkWidth(h):
    return _get(h, "pcie_width")


def nvmlDeviceGetMaxPcieLinkWidth(h):
    return _get(h, "pcie_width_max")


def nvmlDeviceGetMigMode(h):
    mode = _get(h, "mig_mode")
    return [mode, mode]


def nvmlDeviceGetComputeRunningProcesses(h):
    return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p["used_memory_bytes"]) for p in _get(h, "processes")]
'''

# What the recorded H200 readings predate: the readings `metrics` added (utilization, temperature,
# power, clocks event reasons, corrected ECC, PCI address). Not recorded: plausible values for an
# idle H200 SXM, for the synthetic hosts below. Re-record h200-readings.json with
# `gpu_probe.py readings` on a GPU to replace them.
NOT_RECORDED = {
    "pci_bus_id": "00000000:18:00.0",
    "utilization_gpu_percent": 0,
    "temperature_gpu_c": 31,
    "power_usage_mw": 74512,
    "clock_event_reasons": 0x1,  # gpu_idle
    "ecc_corrected_volatile": 0,
    "ecc_corrected_aggregate": 0,
}
NOT_SUPPORTED = {"error": "NVMLError_NotSupported: Not Supported"}
HGX_BUSES = ("18", "2a", "3a", "5d", "9a", "ab", "ba", "db")  # an 8-GPU HGX board's PCI buses


def eight_gpu_host():
    """Synthetic: the recorded H200 as eight GPUs of one HGX board, each busy; GPU 2 without ECC
    counters (NVML: not supported), GPU 5 with a row remapping pending, GPU 6 throttled hot."""
    readings = recorded()
    template = {**readings["gpus"][0], **NOT_RECORDED}
    readings["gpus"] = []
    for index, bus in enumerate(HGX_BUSES):
        gpu = copy.deepcopy(template)
        gpu.update(index=index, uuid=f"GPU-d952b138-dee3-1f00-ce7d-aa510a60f7{index:02x}",
                   pci_bus_id=f"00000000:{bus}:00.0", utilization_gpu_percent=87 + index,
                   memory_used_bytes=135_000_000_000 + index, temperature_gpu_c=60 + index,
                   power_usage_mw=612_250 + index * 1000, clock_event_reasons=0, ecc_corrected_volatile=index,
                   ecc_corrected_aggregate=100 + index)
        readings["gpus"].append(gpu)
    for key in ("ecc_uncorrected_volatile", "ecc_uncorrected_aggregate", "ecc_corrected_volatile",
                "ecc_corrected_aggregate"):
        readings["gpus"][2][key] = NOT_SUPPORTED
    readings["gpus"][5]["remapped_rows"] = {"correctable": 0, "uncorrectable": 1, "pending": 1, "failure": 0}
    readings["gpus"][6].update(clock_event_reasons=0x40 | 0x8, temperature_gpu_c=92)  # hw thermal + hw slowdown
    return readings


def load_fake_pynvml(tmp_path, machine):
    (tmp_path / "pynvml.py").write_text(FAKE_PYNVML)
    spec = importlib.util.spec_from_file_location("pynvml", tmp_path / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.MACHINE = machine
    return module


# ---- an independent parser of the text exposition format ----------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text):
    """{(name, ((label, value), ...)): value} of a text exposition, asserting what the node exporter
    and Prometheus need: HELP and TYPE once each and before the family's samples, each family in one
    block, valid names, labels and values, no series twice, the last line ended."""
    assert text.endswith("\n"), "the last line is not ended"
    helps, types, series, closed = {}, {}, {}, set()
    current = None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            match = re.fullmatch(rf"# (HELP|TYPE) ({NAME}) (.*)", line)
            assert match, where
            keyword, name, rest = match.groups()
            if name != current:
                assert name not in closed and name not in helps and name not in types, f"{where}: {name} again"
                if current:
                    closed.add(current)
                current = name
            if keyword == "HELP":
                assert name not in helps and rest, where
                helps[name] = rest
            else:
                assert name not in types and rest in ("counter", "gauge", "untyped", "summary", "histogram"), where
                types[name] = rest
            continue
        match = re.fullmatch(rf"({NAME})(?:\{{(.*)\}})? (\S+)", line)
        assert match, where
        name, inside, value = match.groups()
        assert name == current and name in helps and name in types, f"{where}: a sample outside its family's block"
        labels, position = {}, 0
        while inside and position < len(inside):
            label = LABEL.match(inside, position)
            assert label and label.group(1) not in labels, where
            labels[label.group(1)] = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)),
                                            label.group(2))
            position = label.end()
            if position < len(inside):
                assert inside[position] == ",", where
                position += 1
        assert re.fullmatch(r"[-+]?(\d+\.?\d*([eE][-+]?\d+)?|NaN|[-+]?Inf)", value), where
        number_value = float(value)
        assert math.isfinite(number_value), where
        key = (name, tuple(sorted(labels.items())))
        assert key not in series, f"{where}: series written twice"
        series[key] = number_value
    assert set(helps) == set(types), "a family with HELP but no TYPE, or the reverse"
    return series


def value(series, name, **labels):
    found = [v for (n, ls), v in series.items() if n == name and labels.items() <= dict(ls).items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} series"
    return found[0]


def names(series):
    return {n for n, _ in series}


def label_sets(series, name):
    return [dict(ls) for n, ls in series if n == name]


P = "vllm_fleet_gpu_"
PER_GPU = [f"{P}{n}" for n in (
    "utilization_ratio", "memory_used_bytes", "memory_total_bytes", "temperature_celsius", "power_watts",
    "throttle_reasons", "throttle_active", "ecc_uncorrected_volatile_total", "ecc_uncorrected_aggregate_total",
    "ecc_corrected_volatile_total", "ecc_corrected_aggregate_total", "remapped_rows_pending",
    "remapped_rows_failed", "remapped_rows_correctable", "remapped_rows_uncorrectable", "pcie_link_width",
    "pcie_link_width_max", "pcie_link_generation", "pcie_link_generation_max")]


@pytest.mark.parametrize("broken, why", [
    ("# TYPE a gauge\na 1\n", "sample before HELP"),
    ("# HELP a x\n# TYPE a gauge\na 1\na 2\n", "series twice"),
    ('# HELP a x\n# TYPE a gauge\na{g="0"} 1\n# HELP b x\n# TYPE b gauge\nb 1\na{g="1"} 1\n', "family split"),
    ("# HELP a x\n# TYPE a gauge\na one\n", "not a number"),
    ('# HELP a x\n# TYPE a gauge\na{g="0} 1\n', "label quote"),
    ("# HELP a x\n# TYPE a gauge\na 1", "last line not ended"),
    ("# HELP a x\n# TYPE a gauge\n# HELP a y\na 1\n", "HELP twice"),
])
def test_the_parser_rejects_broken_expositions(broken, why):
    with pytest.raises(AssertionError):
        parse_exposition(broken)


# ---- the NVML reader -----------------------------------------------------------------------------

def test_the_reader_reproduces_the_recorded_h200_readings(tmp_path, monkeypatch):
    """One reader for `readings` and `metrics`: replaying the H200's answers through the stand-in
    NVML gives back every recorded reading; those it predates come back as not supported."""
    machine = recorded()
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml(tmp_path, machine))
    again = gpu_probe.nvml_readings()
    for key in ("driver_version", "cuda_driver_version"):
        assert again[key] == machine[key]
    (gpu,) = again["gpus"]
    assert {k: gpu[k] for k in machine["gpus"][0]} == machine["gpus"][0]
    assert {k: gpu[k] for k in NOT_RECORDED} == {k: NOT_SUPPORTED for k in NOT_RECORDED}


def test_the_reader_reads_every_reading_metrics_uses(tmp_path, monkeypatch):
    machine = eight_gpu_host()
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml(tmp_path, machine))
    assert gpu_probe.nvml_readings()["gpus"] == machine["gpus"]


def test_a_gpu_nvml_cannot_open_is_not_counted(tmp_path, monkeypatch):
    machine = eight_gpu_host()
    machine["gpus"][3] = {"error": "NVMLError_GpuIsLost: GPU is lost"}
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml(tmp_path, machine))
    readings = gpu_probe.nvml_readings()
    assert readings["gpus"][3] == {"index": 3, "error": "NVMLError_GpuIsLost: GPU is lost"}
    series = parse_exposition(gpu_probe.exposition(readings, expected_count=8))
    assert value(series, f"{P}count") == 7
    assert "3" not in {labels["gpu"] for labels in label_sets(series, f"{P}temperature_celsius")}


# ---- the exposition ------------------------------------------------------------------------------

def test_recorded_h200_readings_as_metrics():
    series = parse_exposition(gpu_probe.exposition(recorded(), expected_count=1))
    gpu = {"gpu": "0", "uuid": "GPU-d952b138-dee3-1f00-ce7d-aa510a60f72b", "model": "NVIDIA H200"}
    assert value(series, f"{P}count") == 1 and value(series, f"{P}expected_count") == 1
    assert value(series, f"{P}nvml_up") == 1
    assert value(series, f"{P}memory_total_bytes", **gpu) == 150754820096
    assert value(series, f"{P}memory_used_bytes", **gpu) == 644939776
    assert value(series, f"{P}ecc_uncorrected_volatile_total", **gpu) == 0
    assert value(series, f"{P}ecc_uncorrected_aggregate_total", **gpu) == 0
    assert value(series, f"{P}remapped_rows_pending", **gpu) == 0
    assert value(series, f"{P}remapped_rows_failed", **gpu) == 0
    assert value(series, f"{P}pcie_link_width", **gpu) == value(series, f"{P}pcie_link_width_max", **gpu) == 16
    assert value(series, f"{P}pcie_link_generation", **gpu) == 5
    assert value(series, f"{P}pcie_link_generation_max", **gpu) == 5
    # The recording predates these readings: left out, not written as 0.
    for name in ("utilization_ratio", "temperature_celsius", "power_watts", "throttle_reasons", "throttle_active",
                 "ecc_corrected_volatile_total", "ecc_corrected_aggregate_total"):
        assert f"{P}{name}" not in names(series)
    assert not any(n.startswith(f"{P}xid") for n in names(series))  # no --state: no XID metrics


def test_eight_gpu_host_as_metrics():
    text = gpu_probe.exposition(eight_gpu_host(), expected_count=8)
    series = parse_exposition(text)
    assert value(series, f"{P}count") == 8
    for name in PER_GPU:
        for labels in label_sets(series, name):
            assert set(labels) == {"gpu", "uuid", "model"} | ({"reason"} if name.endswith("throttle_active") else set())
            assert labels["model"] == "NVIDIA H200"
    gpu = {str(i): {"gpu": str(i)} for i in range(8)}
    assert value(series, f"{P}utilization_ratio", **gpu["1"]) == pytest.approx(0.88)
    assert value(series, f"{P}power_watts", **gpu["1"]) == pytest.approx(613.25)
    assert value(series, f"{P}temperature_celsius", **gpu["6"]) == 92
    # GPU 2 has no ECC counters: no ECC series for it, while the others have theirs.
    for name in ("ecc_uncorrected_volatile_total", "ecc_uncorrected_aggregate_total", "ecc_corrected_volatile_total",
                 "ecc_corrected_aggregate_total"):
        assert sorted(labels["gpu"] for labels in label_sets(series, f"{P}{name}")) == list("0134567")
    assert value(series, f"{P}ecc_corrected_volatile_total", **gpu["7"]) == 7
    # GPU 5: a row remapping pending, none failed.
    assert [value(series, f"{P}remapped_rows_pending", **gpu[i]) for i in sorted(gpu)] == [0, 0, 0, 0, 0, 1, 0, 0]
    assert value(series, f"{P}remapped_rows_uncorrectable", **gpu["5"]) == 1
    assert all(value(series, f"{P}remapped_rows_failed", **gpu[i]) == 0 for i in gpu)
    # GPU 6: throttled by the hardware for heat.
    assert value(series, f"{P}throttle_reasons", **gpu["6"]) == 0x48
    active = {(labels["gpu"], labels["reason"]) for labels in label_sets(series, f"{P}throttle_active")
              if value(series, f"{P}throttle_active", **labels)}
    assert active == {("6", "hw_thermal_slowdown"), ("6", "hw_slowdown")}
    assert len(label_sets(series, f"{P}throttle_active")) == 8 * len(gpu_probe.THROTTLE_REASONS)
    # Counters are typed counter, the rest gauge; each family once, before its samples.
    for name in ("ecc_uncorrected_volatile_total", "ecc_corrected_aggregate_total"):
        assert f"# TYPE {P}{name} counter\n" in text
    assert f"# TYPE {P}temperature_celsius gauge\n" in text
    assert text.count(f"# TYPE {P}throttle_active ") == 1


def test_label_values_are_escaped():
    readings = eight_gpu_host()
    readings["gpus"][0]["name"] = 'NVIDIA "H200"\\x\nnew'
    series = parse_exposition(gpu_probe.exposition(readings, expected_count=8))
    assert label_sets(series, f"{P}memory_total_bytes")[0]["model"] == 'NVIDIA "H200"\\x\nnew'


@pytest.mark.skipif(not PROMTOOL.exists(), reason=f"{PROMTOOL} is not installed (the Makefile installs it; "
                                                  "PROMTOOL_UNDER_TEST=PATH names another)")
def test_promtool_accepts_the_exposition(tmp_path):
    state = gpu_probe.count_xids({}, [("0000:18:00", 79), ("0000:3a:00", 31)], eight_gpu_host())
    for text in (gpu_probe.exposition(recorded(), 1), gpu_probe.exposition(eight_gpu_host(), 8, state)):
        done = subprocess.run([str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True)
        # The only lint promtool has: `_count` is a histogram's suffix, and the names of the GPU count
        # and the expected count are fixed (the alert rules use them). Exit 3 is lint only; 1 would
        # be a parse error.
        allowed = {f'{P}{n} non-histogram and non-summary metrics should not have "_count" suffix'
                   for n in ("count", "expected_count")}
        problems = set((done.stdout + done.stderr).splitlines())
        assert done.returncode in (0, 3) and problems <= allowed, done.stdout + done.stderr


# ---- XID events ----------------------------------------------------------------------------------

KERNEL_LOG = [
    "NVRM: GPU at PCI:0000:18:00: GPU-d952b138-dee3-1f00-ce7d-aa510a60f700",
    "NVRM: GPU Board Serial Number: 1652923012345",
    "nvidia 0000:18:00.0: enabling device (0000 -> 0003)",
    "NVRM: Xid (PCI:0000:3a:00): 63, pid=20211, name=python3, Row Remapper: New row (0x0000000000d3c5e8) "
    "Marked for Remapping, reset gpu to activate.",
    "NVRM: Xid (PCI:0000:2a:00): 48, pid=20211, name=python3, An uncorrectable double bit error (DBE) has been "
    "detected on GPU in the framebuffer at partition 6, subpartition 0.",
    "[1234567.891011] NVRM: Xid (PCI:0000:5d:00): 94, pid=20211, name=python3, Contained: SM (0x1). RST: No, "
    "D-RST: No",
    "NVRM: Xid (0000:9a:00): 13, Graphics SM Warp Exception on (GPC 0, TPC 0, SM 0): Out Of Range Address",
    "nvidia-nvswitch2: SXid (PCI:0000:86:00.0): 12028, Non-fatal, Link 44 egress non-posted PRIV error (First)",
    "NVRM: Xid (PCI:0000:c1:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    "NVRM: Xid (PCI:0000:18:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
]


def test_xid_lines_of_the_kernel_log():
    assert gpu_probe.parse_xid_lines(KERNEL_LOG) == [
        ("0000:3a:00", 63), ("0000:2a:00", 48), ("0000:5d:00", 94), ("0000:9a:00", 13), ("0000:c1:00", 79),
        ("0000:18:00", 79)]
    assert gpu_probe.pci_key("00000000:DB:00.0") == gpu_probe.pci_key("0000:db:00") == "0000:db:00"


def test_xids_count_per_gpu_and_other_addresses_are_skipped():
    state = gpu_probe.count_xids({}, gpu_probe.parse_xid_lines(KERNEL_LOG), eight_gpu_host())
    assert state["counts"] == {"2": {"63": 1}, "1": {"48": 1}, "3": {"94": 1}, "4": {"13": 1}, "0": {"79": 1}}
    assert state["last"]["0"] == 79
    assert state["pci"]["0000:db:00"] == 7 and "0000:c1:00" not in state["pci"]
    # Counted again on top: counts only go up, and the last XID is the latest one.
    again = gpu_probe.count_xids(state, [("0000:18:00", 79), ("0000:18:00", 13)], eight_gpu_host())
    assert again["counts"]["0"] == {"79": 2, "13": 1} and again["last"]["0"] == 13
    assert state["counts"]["0"] == {"79": 1}  # the state given is not changed
    series = parse_exposition(gpu_probe.exposition(eight_gpu_host(), 8, again))
    assert value(series, f"{P}xid_events_total", gpu="0", xid="79") == 2
    assert value(series, f"{P}xid_events_total", gpu="0", xid="13") == 1
    assert value(series, f"{P}xid_last", gpu="0") == 13
    # Every GPU has the well-known fault XIDs at 0 from the start, for increase() in alert rules.
    assert value(series, f"{P}xid_events_total", gpu="7", xid="79") == 0
    assert {labels["xid"] for labels in label_sets(series, f"{P}xid_events_total") if labels["gpu"] == "7"} == {
        str(x) for x in gpu_probe.SEEDED_XIDS}
    assert [labels["gpu"] for labels in label_sets(series, f"{P}xid_last")] == ["0", "1", "2", "3", "4"]


# ---- the subcommand, run as the timer runs it ---------------------------------------------------

FAKE_JOURNALCTL = r'''#!{python} -S
"""Stand-in for journalctl: serves JOURNAL/journal.json ([cursor, realtime, message], ...) as
`journalctl --output=cat --show-cursor` would, after --after-cursor or since --since @T; a file
JOURNAL/denied makes it answer as for a user without access to the system journal."""
import json, os, sys
d = os.environ["FAKE_JOURNAL"]
args = sys.argv[1:]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(json.dumps(args) + "\n")
if os.path.exists(os.path.join(d, "denied")):
    print("Hint: You are currently not seeing messages from other users and the system.", file=sys.stderr)
    sys.exit(0)
assert "_TRANSPORT=kernel" in args and "--output=cat" in args and "--show-cursor" in args, args
entries = json.load(open(os.path.join(d, "journal.json")))
if "--after-cursor" in args:
    cursors = [e[0] for e in entries]
    cursor = args[args.index("--after-cursor") + 1]
    if cursor not in cursors:
        print("Failed to seek to cursor: Invalid argument", file=sys.stderr)
        sys.exit(1)
    entries = entries[cursors.index(cursor) + 1:]
elif "--since" in args:
    entries = [e for e in entries if e[1] >= float(args[args.index("--since") + 1].lstrip("@"))]
else:
    assert "--boot" in args, args
for entry in entries:
    print(entry[2])
if entries:
    print("-- cursor: " + entries[-1][0])
'''


class Host:
    """A GPU host for the subcommand: the stand-in NVML on PYTHONPATH, the stand-in journalctl on
    PATH, a textfile directory and a state file."""

    def __init__(self, tmp_path, machine):
        self.root = tmp_path
        for d in ("lib", "bin", "journal", "textfile", "state"):
            (tmp_path / d).mkdir()
        (tmp_path / "lib" / "pynvml.py").write_text(FAKE_PYNVML)
        # A torch whose import leaves a mark: `metrics` runs every scrape interval and must not load it.
        (tmp_path / "lib" / "torch.py").write_text(
            f"open({str(tmp_path / 'torch-imported')!r}, 'w').close()\nraise ImportError('stand-in')\n")
        journalctl = tmp_path / "bin" / "journalctl"
        journalctl.write_text(FAKE_JOURNALCTL.replace("{python}", sys.executable))
        journalctl.chmod(0o755)
        self.journal = []
        self.machine(machine)
        self.out = tmp_path / "textfile" / "vllm-fleet-gpu.prom"
        self.state = tmp_path / "state" / "xid-state.json"

    def machine(self, machine):
        (self.root / "machine.json").write_text(json.dumps(machine))

    def log(self, *messages):
        for message in messages:
            self.journal.append([f"s=c{len(self.journal)}", 1_795_934_000 + len(self.journal), message])
        (self.root / "journal" / "journal.json").write_text(json.dumps(self.journal))

    def calls(self):
        return [json.loads(line) for line in (self.root / "journal" / "calls").read_text().splitlines()]

    def run(self, *args, expected_count=8, state=True):
        env = {**os.environ, "PYTHONPATH": str(self.root / "lib"), "FAKE_NVML_MACHINE": str(self.root / "machine.json"),
               "FAKE_JOURNAL": str(self.root / "journal"), "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}"}
        # -S: no site-packages, so a pynvml installed here cannot stand in for the stand-in.
        command = [sys.executable, "-S", str(GPU_PROBE), "metrics", "--out", str(self.out),
                   "--expected-count", str(expected_count), *(["--state", str(self.state)] if state else []), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    def series(self):
        return parse_exposition(self.out.read_text())


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path, eight_gpu_host())
    h.log(*KERNEL_LOG[:3])
    return h


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


def test_the_textfile_is_replaced_whole(host):
    host.out.write_text("# stale\n")
    before = host.out.stat().st_ino
    done = host.run()
    assert done.returncode == 0, done.stderr
    assert host.out.stat().st_ino != before, "written in place: the node exporter could read half a file"
    assert stat.S_IMODE(host.out.stat().st_mode) == 0o644  # the node exporter's user reads it
    assert stat.S_IMODE(host.state.stat().st_mode) == 0o600
    assert sorted(p.name for p in host.out.parent.iterdir()) == ["vllm-fleet-gpu.prom"]
    assert sorted(p.name for p in host.state.parent.iterdir()) == ["xid-state.json"]
    assert value(host.series(), f"{P}count") == 8


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "vllm-fleet-gpu.prom"
    target.write_text("old\n")

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(gpu_probe.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        gpu_probe.write_atomically(str(target), "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["vllm-fleet-gpu.prom"]
    monkeypatch.undo()
    gpu_probe.write_atomically(str(target), "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["vllm-fleet-gpu.prom"]


# Two ways a host has no NVML: the release venv has no nvidia-ml-py, or no driver library (what
# nvidia-ml-py 13.615.71 raises on this machine, which has no NVIDIA driver).
NO_NVML = ["No module named 'pynvml'", "NVML Shared Library Not Found"]


def without_nvml(host, how):
    if how.startswith("No module"):
        (host.root / "lib" / "pynvml.py").write_text(f"raise ModuleNotFoundError({how!r})\n")
    else:
        host.machine({"nvml_error": f"NVMLError_LibraryNotFound: {how}"})


@pytest.mark.parametrize("how", NO_NVML)
def test_a_cpu_host_writes_nothing_and_does_not_fail(host, how):
    without_nvml(host, how)
    host.out.write_text("# left from when this host had GPUs\n")
    done = host.run(expected_count=0)
    assert done.returncode == 0, done.stderr
    assert not host.out.exists() and list(host.out.parent.iterdir()) == []
    assert "no NVIDIA GPU to report" in done.stderr and how in done.stderr
    assert not (host.root / "journal" / "calls").exists()


@pytest.mark.parametrize("how", NO_NVML)
def test_a_gpu_host_without_nvml_reports_zero_gpus(host, how):
    """Where the inventory expects GPUs, no NVML is a fault to alert on (a driver gone after an
    upgrade), not a CPU host: 0 GPUs of 8, so `count < expected_count` fires."""
    without_nvml(host, how)
    done = host.run()
    assert done.returncode == 0, done.stderr
    series = host.series()
    assert (value(series, f"{P}count"), value(series, f"{P}expected_count"), value(series, f"{P}nvml_up")) == (0, 8, 0)
    assert "reports 0 of 8 GPUs" in done.stderr
    assert not set(PER_GPU) & names(series)


def test_readings_still_reports_torch_and_metrics_never_loads_it(host):
    """The gate's `readings` loads torch (it checks torch's CUDA against the driver); `metrics`
    runs every scrape interval and must not pay for it."""
    assert host.run().returncode == 0
    assert not (host.root / "torch-imported").exists()
    env = {**os.environ, "PYTHONPATH": str(host.root / "lib"), "FAKE_NVML_MACHINE": str(host.root / "machine.json")}
    done = subprocess.run([sys.executable, "-S", str(GPU_PROBE), "readings"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    readings = json.loads(done.stdout)
    assert (host.root / "torch-imported").exists() and "stand-in" in readings["torch"]["error"]
    assert [g["pci_bus_id"] for g in readings["gpus"]] == [f"00000000:{b}:00.0" for b in HGX_BUSES]


def test_without_a_state_file_no_xid_metrics(host):
    done = host.run(state=False)
    assert done.returncode == 0, done.stderr
    assert not any(n.startswith(f"{P}xid") for n in names(host.series()))
    assert not (host.root / "journal" / "calls").exists()
