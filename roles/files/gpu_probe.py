#!/usr/bin/env python3
"""Raw GPU readings, run ON an NVIDIA host with the release venv's python (nvidia-ml-py, torch).

    gpu_probe.py readings      NVML and torch facts of every GPU, as JSON
    gpu_probe.py metrics --out FILE.prom --expected-count N [--state FILE]
                               NVML readings and the kernel log's XID events in Prometheus' text
                               format, for the node exporter's textfile collector (run by a timer)
    gpu_probe.py burnin        bf16 matmul, device copy and host-to-device bandwidth, as JSON
    gpu_probe.py allreduce --backend nccl --world-size N --timeout S
                               all-reduce bandwidth across N GPUs (or CPU processes with gloo), as JSON

It only measures and reports: what counts as healthy is decided on the control node
(roles/plan/gpu_health.py) and, for `metrics`, by the monitor's alert rules, so the same
decisions replay recorded readings in CI. A reading the driver does not support is recorded as
{"error": "..."} rather than failing the probe (and left out of the metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial


def _read(fn, *args):
    try:
        value = fn(*args)
    except Exception as e:  # NVMLError_NotSupported and friends: record, never crash
        return {"error": f"{type(e).__name__}: {e}"}
    return value.decode() if isinstance(value, bytes) else value


def _clock_event_reasons(nv, h) -> int:
    """The clocks event (throttle) reasons bitmask. NVML renamed the call: drivers and bindings
    before the rename only have the throttle one, which is to go in CUDA 14."""
    try:
        return nv.nvmlDeviceGetCurrentClocksEventReasons(h)
    except Exception as e:
        if not isinstance(e, AttributeError) and type(e).__name__ != "NVMLError_FunctionNotFound":
            raise
    return nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)


def _gpu(nv, index: int) -> dict:
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:  # a GPU the driver counts but cannot open (fallen off the bus: XID 79)
        return {"index": index, "error": f"{type(e).__name__}: {e}"}
    mem = _read(nv.nvmlDeviceGetMemoryInfo, h)
    remapped = _read(nv.nvmlDeviceGetRemappedRows, h)
    procs = _read(nv.nvmlDeviceGetComputeRunningProcesses, h)
    utilization = _read(nv.nvmlDeviceGetUtilizationRates, h)
    ecc = partial(_read, nv.nvmlDeviceGetTotalEccErrors, h)
    return {
        "index": index,
        "name": _read(nv.nvmlDeviceGetName, h),
        "uuid": _read(nv.nvmlDeviceGetUUID, h),
        "pci_bus_id": _read(lambda: nv.nvmlDeviceGetPciInfo(h).busId),  # e.g. 00000000:18:00.0
        "memory_total_bytes": mem if isinstance(mem, dict) else mem.total,
        "memory_used_bytes": mem if isinstance(mem, dict) else mem.used,
        "utilization_gpu_percent": utilization if isinstance(utilization, dict) else utilization.gpu,
        "temperature_gpu_c": _read(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
        "power_usage_mw": _read(nv.nvmlDeviceGetPowerUsage, h),
        "clock_event_reasons": _read(_clock_event_reasons, nv, h),
        "persistence_mode": _read(nv.nvmlDeviceGetPersistenceMode, h),
        "ecc_mode": _read(lambda: nv.nvmlDeviceGetEccMode(h)[0]),
        "ecc_uncorrected_volatile": ecc(nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC),
        "ecc_uncorrected_aggregate": ecc(nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_AGGREGATE_ECC),
        "ecc_corrected_volatile": ecc(nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_VOLATILE_ECC),
        "ecc_corrected_aggregate": ecc(nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_AGGREGATE_ECC),
        "retired_pages_pending": _read(nv.nvmlDeviceGetRetiredPagesPendingStatus, h),
        "remapped_rows": remapped if isinstance(remapped, dict) else dict(
            zip(("correctable", "uncorrectable", "pending", "failure"), remapped)),
        "pcie_gen": _read(nv.nvmlDeviceGetCurrPcieLinkGeneration, h),
        "pcie_gen_max": _read(nv.nvmlDeviceGetMaxPcieLinkGeneration, h),
        "pcie_width": _read(nv.nvmlDeviceGetCurrPcieLinkWidth, h),
        "pcie_width_max": _read(nv.nvmlDeviceGetMaxPcieLinkWidth, h),
        "mig_mode": _read(lambda: nv.nvmlDeviceGetMigMode(h)[0]),
        "processes": procs if isinstance(procs, dict) else [
            {"pid": p.pid, "used_memory_bytes": p.usedGpuMemory} for p in procs],
    }


def nvml_readings() -> dict:
    """Every NVML reading of every GPU: the one reader behind both `readings` (the onboarding
    gate) and `metrics` (the node exporter's textfile). A host without NVML (no nvidia-ml-py, no
    driver library: a CPU host) or whose driver does not answer gets {"nvml_error": ...}."""
    out: dict = {"time": time.time()}
    try:
        import pynvml as nv

        nv.nvmlInit()
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        out["nvml_error"] = f"{type(e).__name__}: {e}"
        return out
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception as e:
        out["nvml_error"] = f"{type(e).__name__}: {e}"
        return out
    out["driver_version"] = _read(nv.nvmlSystemGetDriverVersion)
    out["cuda_driver_version"] = _read(nv.nvmlSystemGetCudaDriverVersion)  # e.g. 13000 for CUDA 13.0
    out["gpus"] = [_gpu(nv, index) for index in range(count)]
    return out


def readings() -> dict:
    out = nvml_readings()
    if "nvml_error" in out:
        return out
    try:
        import torch
        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "device_count": torch.cuda.device_count()}
    except Exception as e:
        out["torch"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ---- metrics: NVML readings and XID counts for prometheus-node-exporter's textfile collector ----

PREFIX = "vllm_fleet_gpu_"

# NVML's clocks event (throttle) reasons, bit by bit, as nvml.h and nvidia-ml-py name them.
# gpu_idle, applications_clocks_setting and sync_boost are normal operation; the slowdowns and
# the power cap are what cost throughput.
THROTTLE_REASONS: dict[str, int] = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
    "board_limit": 0x200,
    "reliability": 0x400,
}

# XIDs that NVIDIA's XID catalog lists as hardware, driver or fabric faults: 48 double-bit ECC,
# 61/62 internal micro-controller breakpoint/halt, 63/64 row remapping (or page retirement)
# event/failure, 74 NVLink, 79 fallen off the bus, 92 high single-bit ECC rate, 94/95 contained/
# uncontained ECC, 119/120 GSP timeout/error, 140 unrecovered ECC, 154 recovery action (reset or
# reboot) needed; the monitor's critical-XID alert (roles/plan/alerts.py) uses the same set. Their
# counters are written at 0 from the start, so that an alert's increase() sees the first one (a
# series that appears at 1 has no increase). Any other XID gets its series when it first happens.
SEEDED_XIDS = (48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140, 154)

_ECC = "NVML's total ECC error count of the GPU's memory"


def _plain(key):
    return lambda gpu: gpu.get(key)


def _scaled(key, divisor):
    return lambda gpu: None if _missing(gpu.get(key)) else gpu[key] / divisor


def _remapped(key):
    return lambda gpu: None if _missing(gpu.get("remapped_rows")) else gpu["remapped_rows"][key]


# Per GPU: name (without PREFIX), type, help, and what to read from the GPU's readings (None or an
# {"error": ...}: left out).
PER_GPU: tuple[tuple[str, str, str, object], ...] = (
    ("utilization_ratio", "gauge", "Share of the last sample period (1/6 s to 1 s) in which a kernel ran on the GPU.",
     _scaled("utilization_gpu_percent", 100)),
    ("memory_used_bytes", "gauge", "GPU memory in use (NVML, driver reservations included).",
     _plain("memory_used_bytes")),
    ("memory_total_bytes", "gauge", "GPU memory in all.", _plain("memory_total_bytes")),
    ("temperature_celsius", "gauge", "GPU core temperature.", _plain("temperature_gpu_c")),
    ("power_watts", "gauge", "Power the board draws.", _scaled("power_usage_mw", 1000)),
    ("throttle_reasons", "gauge", "Bitmask of NVML's current clocks event (throttle) reasons; 0: none.",
     _plain("clock_event_reasons")),
    ("ecc_uncorrected_volatile_total", "counter", f"{_ECC}: uncorrected, since the driver loaded or the GPU was reset.",
     _plain("ecc_uncorrected_volatile")),
    ("ecc_uncorrected_aggregate_total", "counter", f"{_ECC}: uncorrected, over the GPU's life.",
     _plain("ecc_uncorrected_aggregate")),
    ("ecc_corrected_volatile_total", "counter", f"{_ECC}: corrected, since the driver loaded or the GPU was reset.",
     _plain("ecc_corrected_volatile")),
    ("ecc_corrected_aggregate_total", "counter", f"{_ECC}: corrected, over the GPU's life.",
     _plain("ecc_corrected_aggregate")),
    ("remapped_rows_pending", "gauge", "1 when a row remapping waits for a GPU reset to take effect.",
     _remapped("pending")),
    ("remapped_rows_failed", "gauge", "1 when a row remapping failed: the GPU needs service.", _remapped("failure")),
    ("remapped_rows_correctable", "gauge", "Memory rows remapped after correctable errors.",
     _remapped("correctable")),
    ("remapped_rows_uncorrectable", "gauge", "Memory rows remapped after uncorrectable errors.",
     _remapped("uncorrectable")),
    ("pcie_link_width", "gauge", "PCIe link width now (lanes).", _plain("pcie_width")),
    ("pcie_link_width_max", "gauge", "Widest PCIe link the GPU and its slot allow (lanes).", _plain("pcie_width_max")),
    ("pcie_link_generation", "gauge", "PCIe link generation now (its speed: gen 5 is 32 GT/s per lane); an idle GPU "
     "may train down to save power.",
     _plain("pcie_gen")),
    ("pcie_link_generation_max", "gauge", "Highest PCIe generation the GPU and its slot allow.",
     _plain("pcie_gen_max")),
)


def _missing(value) -> bool:
    """Not read (a reading from an older probe) or not readable: NVMLError_NotSupported and the
    like are recorded as {"error": ...} and left out of the metrics, never written as 0."""
    return value is None or isinstance(value, dict) and "error" in value


def _present(gpu: dict) -> bool:
    """A GPU that NVML can open and name; one it counts but cannot open is not counted."""
    return "error" not in gpu and isinstance(gpu.get("uuid"), str)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    return str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))


def _sample(name: str, labels: dict[str, str], value) -> str:
    inside = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
    return f"{PREFIX}{name}{{{inside}}} {_number(value)}" if inside else f"{PREFIX}{name} {_number(value)}"


def exposition(readings: dict, expected_count: int, xids: dict | None = None, xid_source_up: bool = True) -> str:
    """The Prometheus text exposition of one host's NVML readings (nvml_readings()) and XID counts
    (the state of count_xids(); None: not collected). Pure, so recorded readings replay through it.

    Each family is written whole (HELP, TYPE, then its samples); a family without samples is left
    out, and so is a reading NVML did not give for a GPU."""
    families: list[tuple[str, str, str, list[str]]] = []

    def family(name, kind, help_text, samples):
        if samples:
            families.append((name, kind, help_text, samples))

    gpus = [g for g in readings.get("gpus", []) if _present(g)]
    nvml_up = "nvml_error" not in readings
    family("nvml_up", "gauge", "1 when NVML answered; 0 when the driver or its library did not (see the unit's log).",
           [_sample("nvml_up", {}, int(nvml_up))])
    family("count", "gauge", "GPUs that NVML sees and can open.", [_sample("count", {}, len(gpus))])
    family("expected_count", "gauge", "GPUs the inventory says this host has.",
           [_sample("expected_count", {}, expected_count)])
    ids = {g["index"]: {"gpu": str(g["index"]), "uuid": g["uuid"],
                        "model": g["name"] if isinstance(g.get("name"), str) else ""} for g in gpus}
    for name, kind, help_text, read in PER_GPU:
        samples = []
        for gpu in gpus:
            value = read(gpu)
            if not _missing(value):
                samples.append(_sample(name, ids[gpu["index"]], value))
        family(name, kind, help_text, samples)
        if name == "throttle_reasons":  # and the same bitmask, one 0/1 series per known reason
            active = []
            for gpu in gpus:
                mask = gpu.get("clock_event_reasons")
                if not _missing(mask):
                    active += [_sample("throttle_active", {**ids[gpu["index"]], "reason": reason},
                                       int(bool(mask & bit))) for reason, bit in THROTTLE_REASONS.items()]
            family("throttle_active", "gauge", "1 while NVML reports this clocks event (throttle) reason.", active)
    if xids is not None:
        family("xid_source_up", "gauge", "1 when the kernel log was read for XID events on this run.",
               [_sample("xid_source_up", {}, int(xid_source_up))])
        counts: dict[str, dict[str, int]] = xids.get("counts", {})
        indexes = sorted({str(i) for i in ids} | set(counts), key=int)
        samples = []
        for index in indexes:
            seen = counts.get(index, {})
            for xid in sorted({str(x) for x in SEEDED_XIDS} | set(seen), key=int):
                samples.append(_sample("xid_events_total", {"gpu": index, "xid": xid}, seen.get(xid, 0)))
        family("xid_events_total", "counter", "NVIDIA XID events of the GPU in the kernel log (NVRM: Xid).", samples)
        family("xid_last", "gauge", "The XID of the GPU's most recent XID event.", [
            _sample("xid_last", {"gpu": index}, xid)
            for index, xid in sorted(xids.get("last", {}).items(), key=lambda item: int(item[0]))])
    lines = []
    for name, kind, help_text, samples in families:
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", *samples]
    return "\n".join(lines) + "\n"


# XIDs come from the kernel log, not from an NVML event set: an event set only delivers what
# happens while a process waits on it, so a timer run every scrape interval would miss whatever
# came between two runs (and a GPU that fell off the bus, XID 79, may not deliver it at all).
# The kernel logs every XID; journald keeps it across runs and reboots, and a journal cursor kept
# in the state file resumes exactly after the last line read: no line lost, none counted twice.
# journalctl rather than dmesg: dmesg has no position that survives a reboot, its ring buffer
# wraps, and it needs CAP_SYSLOG where kernel.dmesg_restrict=1 (Ubuntu's default).
_XID_LINE = re.compile(r"\bNVRM: Xid \((?:PCI:)?([0-9a-fA-F]{1,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})"
                       r"(?:\.[0-7])?\): (\d+)\b")


def pci_key(bus_id: str) -> str:
    """One spelling for a GPU's PCI address: the kernel's 0000:18:00 and NVML's 00000000:18:00.0
    both become 0000:18:00 (domain:bus:device)."""
    domain, bus, device = bus_id.split(".")[0].split(":")[-3:]
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}"


def parse_xid_lines(lines) -> list[tuple[str, int]]:
    """(PCI key, XID) of each NVRM Xid line among kernel log lines (journalctl -o cat, or dmesg's
    with its [seconds] prefix); every other line (NVSwitch SXids included) is skipped."""
    events = []
    for line in lines:
        match = _XID_LINE.search(line)
        if match:
            domain, bus, device, xid = match.groups()
            events.append((pci_key(f"{domain}:{bus}:{device}"), int(xid)))
    return events


def count_xids(state: dict, events: list[tuple[str, int]], readings: dict) -> dict:
    """The state with these events counted per GPU index. The PCI address of a GPU maps to its
    index through NVML now, else through the state's last known map (a GPU that fell off the bus
    is gone from NVML, and its XID 79 still counts); an address of neither is not a GPU of this
    host and is skipped. Counts only go up."""
    pci = dict(state.get("pci", {}))
    pci.update({pci_key(g["pci_bus_id"]): g["index"] for g in readings.get("gpus", [])
                if _present(g) and isinstance(g.get("pci_bus_id"), str)})
    counts = {gpu: dict(seen) for gpu, seen in state.get("counts", {}).items()}
    last = dict(state.get("last", {}))
    for address, xid in events:
        if address not in pci:
            continue
        gpu = str(pci[address])
        counts.setdefault(gpu, {})
        counts[gpu][str(xid)] = counts[gpu].get(str(xid), 0) + 1
        last[gpu] = xid
    return {**state, "pci": pci, "counts": counts, "last": last}


class KernelLogError(Exception):
    pass


def read_kernel_log(cursor: str | None, since: float | None) -> tuple[list[str], str | None]:
    """Kernel log lines after the cursor (first run: those of this boot) and the cursor of the
    last one (None when there was no new line). _TRANSPORT=kernel, not -k: -k means this boot
    only, and the lines logged between the last run and a reboot would be lost."""
    base = ["journalctl", "--no-pager", "--output=cat", "--show-cursor", "_TRANSPORT=kernel"]
    attempts = [base + ["--after-cursor", cursor]] if cursor else []
    # A cursor journalctl refuses (a journal rebuilt): from the time of the last read instead.
    attempts.append(base + (["--since", f"@{int(since)}"] if since else ["--boot"]))
    for command in attempts:
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelLogError(f"{command[0]}: {e}") from e
        # Without access to the system journal journalctl still exits 0, with a hint on stderr.
        denied = "not seeing messages from other users and the system" in done.stderr
        if done.returncode == 0 and not denied:
            lines = done.stdout.splitlines()
            if lines and lines[-1].startswith("-- cursor: "):
                return lines[:-1], lines[-1].removeprefix("-- cursor: ")
            return lines, None
    raise KernelLogError(f"{shlex.join(command)}: exit {done.returncode}: {done.stderr.strip()[-300:]}")


def load_state(path: str) -> dict:
    """The XID state of the last run; a missing or unreadable file starts from nothing (Prometheus
    takes the counters' drop as a reset)."""
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"gpu_probe: {path} unreadable ({e}): XID counts start again from 0", file=sys.stderr)
        return {}
    return state if isinstance(state, dict) else {}


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``: a reader sees the old
    file or the new one, never half of one. The temporary name does not end in .prom, so the
    node exporter (which reads *.prom) never reads it; the mode lets its user read the result."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def metrics(out: str, expected_count: int, state_path: str | None) -> int:
    """Read NVML (and the kernel log's XIDs when there is a state file), write the textfile."""
    readings = nvml_readings()
    if "nvml_error" in readings and expected_count == 0:
        # A CPU host: nothing to report, and nothing to fail the timer for. A stale file from
        # when the host had GPUs would report GPUs it no longer has: removed.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        print(f"gpu_probe: no NVIDIA GPU to report ({readings['nvml_error']}); {out} not written", file=sys.stderr)
        return 0
    state, source_up = None, True
    if state_path:
        state = load_state(state_path)
        try:
            lines, cursor = read_kernel_log(state.get("cursor"), state.get("time"))
        except KernelLogError as e:
            source_up = False
            print(f"gpu_probe: XID events not read: {e}", file=sys.stderr)
        else:
            state = count_xids(state, parse_xid_lines(lines), readings)
            state.update(cursor=cursor or state.get("cursor"), time=readings["time"])
        # The state first: if the run dies between the two writes, the next run re-reads nothing
        # twice and the textfile catches up.
        write_atomically(state_path, json.dumps(state, indent=1, sort_keys=True) + "\n", mode=0o600)
    write_atomically(out, exposition(readings, expected_count, state, source_up))
    if "nvml_error" in readings:
        print(f"gpu_probe: NVML did not answer ({readings['nvml_error']}): {out} reports 0 of "
              f"{expected_count} GPUs", file=sys.stderr)
    return 0


def _seconds_per_call(fn, repeats: int, cuda: bool = True) -> float:
    """Seconds per call after one warm-up call: on CUDA events for GPU work (queued, so the wall
    clock would time the queueing), on the wall clock for CPU work (done when the call returns)."""
    import torch

    fn()
    if not cuda:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def burnin(device: int) -> dict:
    """Three short measurements, a few seconds each (the whole burn-in stays well under a minute)."""
    import torch

    t0 = time.monotonic()
    torch.cuda.set_device(device)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_s = _seconds_per_call(lambda: a @ b, repeats=200)
    a = b = None  # free the matrices before the copy test allocates 4 GiB
    src = torch.empty(2 << 30, device="cuda", dtype=torch.uint8)  # 2 GiB, far past L2
    dst = torch.empty_like(src)
    copy_s = _seconds_per_call(lambda: dst.copy_(src), repeats=50)
    src = dst = None
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dev = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    h2d_s = _seconds_per_call(lambda: dev.copy_(host, non_blocking=True), repeats=20)
    return {
        "device": device,
        "name": torch.cuda.get_device_name(device),
        "matmul_bf16_tflops": 2 * n**3 / matmul_s / 1e12,
        "device_copy_tb_s": 2 * (2 << 30) / copy_s / 1e12,  # bytes read plus bytes written
        "h2d_gb_s": (1 << 30) / h2d_s / 1e9,
        "seconds": time.monotonic() - t0,
    }


ALLREDUCE_REPEATS = 20  # a steady mean; 20 all-reduces of 2 GiB take well under a second over NVLink


def _allreduce_worker(rank: int, backend: str, world_size: int, init_method: str, sizes_mb: list[int],
                      stall_rank: int | None, results) -> None:
    """One rank: join the group, then time an in-place sum all-reduce of each size."""
    import torch
    import torch.distributed as dist

    if rank == stall_rank:
        time.sleep(1e6)  # a rank that never joins: what a hung GPU or link looks like to the others
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # CPU ranks of one machine talk over loopback
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    # bf16 is what tensor-parallel vLLM all-reduces on GPUs; gloo reduces fp32 on CPUs.
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.all_reduce(torch.zeros(1, device=device, dtype=dtype))  # communicator setup, kept out of the timing
    seconds = []
    for mb in sizes_mb:
        tensor = torch.zeros((mb << 20) // dtype.itemsize, device=device, dtype=dtype)
        seconds.append(_seconds_per_call(partial(dist.all_reduce, tensor), ALLREDUCE_REPEATS, cuda))
    results.put({"rank": rank, "device": torch.cuda.get_device_name(rank) if cuda else "cpu",
                 "dtype": str(dtype).removeprefix("torch."), "seconds": seconds})
    dist.destroy_process_group()


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allreduce(backend: str, world_size: int, sizes_mb: list[int], timeout: float,
              stall_rank: int | None = None) -> dict:
    """All-reduce bandwidth of ``world_size`` ranks of this host, one process per GPU (nccl) or CPU
    processes (gloo, the same path without GPUs), rendezvous on loopback.

    Per size: algbw = bytes / time of the slowest rank; busbw = algbw * 2(n-1)/n, the nccl-tests
    convention that makes busbw comparable with link bandwidth at any n. With one rank nothing
    crosses a link: the time is that of a local no-op, and busbw is 0 by that same factor.
    A hang or a failing rank does not hang the probe: after ``timeout`` seconds the ranks are
    killed and the result carries an "error", like any other reading for the control node.
    """
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    t0 = time.monotonic()
    out: dict = {"backend": backend, "world_size": world_size, "torch": torch.__version__}
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        return {**out, "error": f"world size {world_size} but torch sees {torch.cuda.device_count()} GPUs"}
    results = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(_allreduce_worker, nprocs=world_size, join=False, start_method="spawn",
                               args=(backend, world_size, f"tcp://127.0.0.1:{_free_loopback_port()}", sizes_mb,
                                     stall_rank, results))
    try:
        while not ranks.join(timeout=max(0.0, t0 + timeout - time.monotonic()), grace_period=1):
            if time.monotonic() >= t0 + timeout:
                for process in ranks.processes:
                    process.kill()
                    process.join()
                return {**out, "error": f"timeout after {timeout:g} s", "seconds": time.monotonic() - t0}
    except ProcessException as e:  # a rank raised or died: its last line says why
        return {**out, "error": f"rank {e.error_index}: {str(e).strip().splitlines()[-1]}",
                "seconds": time.monotonic() - t0}
    per_rank = sorted((results.get() for _ in range(world_size)), key=lambda r: r["rank"])
    sizes = []
    for i, mb in enumerate(sizes_mb):
        slowest = max(r["seconds"][i] for r in per_rank)
        algbw = (mb << 20) / slowest / 1e9
        sizes.append({"bytes": mb << 20, "seconds": slowest, "algbw_gb_s": algbw,
                      "busbw_gb_s": algbw * 2 * (world_size - 1) / world_size})
    return {**out, "dtype": per_rank[0]["dtype"], "devices": [r["device"] for r in per_rank],
            "repeats": ALLREDUCE_REPEATS, "sizes": sizes, "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("readings")
    m = sub.add_parser("metrics")
    m.add_argument("--out", required=True,
                   help="the .prom file to (re)write, in the node exporter's textfile directory")
    m.add_argument("--expected-count", type=int, required=True,
                   help="GPUs the inventory gives this host. 0: a host without GPUs, where no NVML means "
                        "nothing to write (with 1 or more, no NVML is reported as 0 GPUs)")
    m.add_argument("--state", help="where XID counts and the kernel log position persist between runs; "
                                   "without it no XID metrics are written")
    b = sub.add_parser("burnin")
    b.add_argument("--device", type=int, default=0)
    a = sub.add_parser("allreduce")
    a.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    a.add_argument("--world-size", type=int, required=True)
    # Peak bus bandwidth needs large messages: on NVSwitch boards it is reached around 1-2 GiB.
    a.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 256, 2048], help="message sizes in MiB")
    a.add_argument("--timeout", type=float, required=True, help="seconds before the ranks are killed")
    a.add_argument("--stall-rank", type=int, help=argparse.SUPPRESS)  # tests: a rank that never joins
    args = parser.parse_args(argv)
    if args.command == "metrics":
        return metrics(args.out, args.expected_count, args.state)
    if args.command == "readings":
        result = readings()
    elif args.command == "burnin":
        result = burnin(args.device)
    else:
        result = allreduce(args.backend, args.world_size, args.sizes_mb, args.timeout, args.stall_rank)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
