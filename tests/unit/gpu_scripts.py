"""Shared by the tests of roles/files/gpu_metrics.py (test_gpu_metrics_exposition.py,
test_gpu_xid_events.py): the host scripts loaded as hosts load them, stand-ins for NVML and
journalctl, the recorded and synthetic GPU hosts, and an independent parser of Prometheus' text
exposition format. Not a test module.

gpu_metrics.py imports its siblings gpu_probe.py and textfile.py as the top-level modules
``gpu_probe`` and ``textfile`` (on a host all sit in /usr/local/lib/vllm-fleet, the script's
sys.path[0]); here roles/files/ goes on sys.path the same way, so the tests import the very
modules a host runs (never ``roles.files.gpu_probe``: another module object than the one
gpu_metrics.py calls)."""

import copy
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from roles.paths import GPU_METRICS, HOST_SCRIPTS

if str(HOST_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(HOST_SCRIPTS))

import gpu_metrics  # noqa: E402  (both from roles/files/, as on a host)
import gpu_probe  # noqa: E402

__all__ = ["gpu_metrics", "gpu_probe"]

FIXTURES = Path(__file__).parents[1] / "fixtures" / "gpu"


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

# What the recorded H200 readings predate: the readings added for gpu_metrics.py (utilization,
# temperature, power, clocks event reasons, corrected ECC, PCI address). For the synthetic hosts
# below they are taken from an idle H100 80GB HBM3 on the same driver (h100-readings.json, recorded
# with `gpu_probe.py readings` on 2026-12-07; the project's GPU machine was an H100 that day).
NOT_RECORDED_KEYS = ("pci_bus_id", "utilization_gpu_percent", "temperature_gpu_c", "power_usage_mw",
                     "clock_event_reasons", "ecc_corrected_volatile", "ecc_corrected_aggregate")


def recorded_h100():
    return json.loads((FIXTURES / "h100-readings.json").read_text())


NOT_RECORDED = {key: recorded_h100()["gpus"][0][key] for key in NOT_RECORDED_KEYS}
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


# ---- kernel log lines, a stand-in for journalctl, a host to run gpu_metrics.py on ----------------

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
    """A GPU host for gpu_metrics.py: the stand-in NVML on PYTHONPATH, the stand-in journalctl on
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
        command = [sys.executable, "-S", str(GPU_METRICS), "--out", str(self.out),
                   "--expected-count", str(expected_count), *(["--state", str(self.state)] if state else []), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    def series(self):
        return parse_exposition(self.out.read_text())


def gpu_host(tmp_path):
    """The tests' `host` fixture: the eight-GPU host, its journal with this boot's first kernel
    lines (none an XID)."""
    h = Host(tmp_path, eight_gpu_host())
    h.log(*KERNEL_LOG[:3])
    return h
