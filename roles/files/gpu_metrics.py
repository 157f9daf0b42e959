#!/usr/bin/env python3
"""NVML readings and the kernel log's XID events in Prometheus' text format, for the node
exporter's textfile collector; run ON an NVIDIA host (by a timer) with the release venv's python.

    gpu_metrics.py --out FILE.prom --expected-count N [--state FILE]

It only reports: what counts as healthy is decided by the monitor's alert rules. A reading the
driver does not support is left out of the metrics, never written as 0. NVML is read by
gpu_probe.py's reader (the one behind `gpu_probe.py readings`), and the textfile written by
textfile.py, which both sit beside this script on the host and in roles/files/: imported as the
top-level modules ``gpu_probe`` and ``textfile``, never as ``roles.files.gpu_probe`` (scripts
copied to hosts import nothing of the project).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys

# The script's folder is sys.path[0] when it is run as a script, unless python runs with -I, -P or
# PYTHONSAFEPATH: then it is put there, so that gpu_probe.py and textfile.py beside it are found
# either way.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import gpu_probe  # noqa: E402  (after the path: the sibling scripts, not a package)
import textfile  # noqa: E402

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


def exposition(readings: dict, expected_count: int, xids: dict | None = None, xid_source_up: bool = True) -> str:
    """The Prometheus text exposition of one host's NVML readings (gpu_probe.nvml_readings()) and
    XID counts (the state of count_xids(); None: not collected). Pure, so recorded readings replay
    through it.

    Each family is written whole (HELP, TYPE, then its samples); a family without samples is left
    out, and so is a reading NVML did not give for a GPU."""
    gpus = [g for g in readings.get("gpus", []) if _present(g)]
    nvml_up = "nvml_error" not in readings
    families: list[textfile.Family] = [
        ("nvml_up", "gauge", "1 when NVML answered; 0 when the driver or its library did not (see the unit's log).",
         [({}, int(nvml_up))]),
        ("count", "gauge", "GPUs that NVML sees and can open.", [({}, len(gpus))]),
        ("expected_count", "gauge", "GPUs the inventory says this host has.", [({}, expected_count)])]
    ids = {g["index"]: {"gpu": str(g["index"]), "uuid": g["uuid"],
                        "model": g["name"] if isinstance(g.get("name"), str) else ""} for g in gpus}
    for name, kind, help_text, read in PER_GPU:
        samples = []
        for gpu in gpus:
            value = read(gpu)
            if not _missing(value):
                samples.append((ids[gpu["index"]], value))
        families.append((name, kind, help_text, samples))
        if name == "throttle_reasons":  # and the same bitmask, one 0/1 series per known reason
            active = []
            for gpu in gpus:
                mask = gpu.get("clock_event_reasons")
                if not _missing(mask):
                    active += [({**ids[gpu["index"]], "reason": reason}, int(bool(mask & bit)))
                               for reason, bit in THROTTLE_REASONS.items()]
            families.append(("throttle_active", "gauge", "1 while NVML reports this clocks event (throttle) reason.",
                             active))
    if xids is not None:
        families.append(("xid_source_up", "gauge", "1 when the kernel log was read for XID events on this run.",
                         [({}, int(xid_source_up))]))
        counts: dict[str, dict[str, int]] = xids.get("counts", {})
        indexes = sorted({str(i) for i in ids} | set(counts), key=int)
        samples = []
        for index in indexes:
            seen = counts.get(index, {})
            for xid in sorted({str(x) for x in SEEDED_XIDS} | set(seen), key=int):
                samples.append(({"gpu": index, "xid": xid}, seen.get(xid, 0)))
        families += [
            ("xid_events_total", "counter", "NVIDIA XID events of the GPU in the kernel log (NVRM: Xid).", samples),
            ("xid_last", "gauge", "The XID of the GPU's most recent XID event.", [
                ({"gpu": index}, xid) for index, xid in sorted(xids.get("last", {}).items(), key=lambda i: int(i[0]))])]
    return textfile.exposition(PREFIX, families)


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


def metrics(out: str, expected_count: int, state_path: str | None) -> int:
    """Read NVML (and the kernel log's XIDs when there is a state file), write the textfile."""
    readings = gpu_probe.nvml_readings()
    if "nvml_error" in readings and expected_count == 0:
        # A CPU host: nothing to report, and nothing to fail the timer for. A stale file from
        # when the host had GPUs would report GPUs it no longer has: removed.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        print(f"gpu_metrics: no NVIDIA GPU to report ({readings['nvml_error']}); {out} not written", file=sys.stderr)
        return 0
    state, source_up = None, True
    if state_path:
        state = textfile.load_state(state_path, "gpu_metrics", "XID counts start again from 0")
        try:
            lines, cursor = read_kernel_log(state.get("cursor"), state.get("time"))
        except KernelLogError as e:
            source_up = False
            print(f"gpu_metrics: XID events not read: {e}", file=sys.stderr)
        else:
            state = count_xids(state, parse_xid_lines(lines), readings)
            state.update(cursor=cursor or state.get("cursor"), time=readings["time"])
        # The state first: if the run dies between the two writes, the next run re-reads nothing
        # twice and the textfile catches up.
        textfile.save_state(state_path, state)
    textfile.write_atomically(out, exposition(readings, expected_count, state, source_up))
    if "nvml_error" in readings:
        print(f"gpu_metrics: NVML did not answer ({readings['nvml_error']}): {out} reports 0 of "
              f"{expected_count} GPUs", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True,
                        help="the .prom file to (re)write, in the node exporter's textfile directory")
    parser.add_argument("--expected-count", type=int, required=True,
                        help="GPUs the inventory gives this host. 0: a host without GPUs, where no NVML means "
                             "nothing to write (with 1 or more, no NVML is reported as 0 GPUs)")
    parser.add_argument("--state", help="where XID counts and the kernel log position persist between runs; "
                                        "without it no XID metrics are written")
    args = parser.parse_args(argv)
    return metrics(args.out, args.expected_count, args.state)


if __name__ == "__main__":
    sys.exit(main())
