"""Is this NVIDIA host healthy enough to serve? Decisions on the raw readings of gpu_probe.py.

The probe runs on the host and only measures; everything here is pure, so CI replays readings
recorded on a real H200 (tests/fixtures/gpu/) through exactly the code a deploy uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from roles.common import gib

MEMORY_TOLERANCE = 0.01  # NVML totals differ slightly between boards and drivers of one model

# Burn-in references per GPU name as NVML reports it. The H200 figures were measured on the
# H200 behind this project's `device` tool (bf16 8192^3 matmul on random data, device copy
# counting bytes read plus written, pinned host-to-device copy over PCIe gen5 x16).
# H100 figures: same chip as the H200 (same matmul rate), copy scaled by the memory bandwidth
# ratio 3.35/4.8; not measured here.
BURNIN_REFERENCE: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"matmul_bf16_tflops": 790.0, "device_copy_tb_s": 4.3, "h2d_gb_s": 55.0},
    "NVIDIA H100 80GB HBM3": {"matmul_bf16_tflops": 790.0, "device_copy_tb_s": 3.0, "h2d_gb_s": 55.0},
}
BURNIN_THRESHOLD = 0.85  # a host below 85% of the reference on any measurement fails

# All-reduce bus bandwidth in GB/s (nccl-tests convention, at the probe's largest size) per GPU
# name, for hosts whose GPUs of that name all talk over NVLink. SXM Hopper boards (H100, H200) on
# NVSwitch: NCCL gets ~370 GB/s of NVLink 4's 450 GB/s line rate with the ring algorithm, and a
# peak of ~480 GB/s with NVLink SHARP on 8 GPUs (NCCL's maintainer in NVIDIA/nccl-tests#212;
# 475 GB/s measured on 8x H200 in NVIDIA/nccl-tests#272). The reference is the ring figure
# rounded down, so any GPU count and algorithm of a healthy board passes, while GPUs that fall
# back to PCIe (at most ~50 GB/s at gen5 x16) or to copies through host memory fail by far.
# Not measured here: the lent machines have one GPU. PCIe-only boards need their own measured entry.
ALLREDUCE_REFERENCE: dict[str, float] = {
    "NVIDIA H200": 350.0,
    "NVIDIA H100 80GB HBM3": 350.0,
}


@dataclass(frozen=True)
class GpuExpectation:
    """What the inventory says the host has."""

    count: int
    model: str  # matched as a substring of the NVML name, e.g. "H200"
    memory_bytes: int | None = None
    pcie_gen: int | None = None  # None: the GPU's own maximum
    pcie_width: int | None = None
    mig: bool = False


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    gpu: int | None = None


def _unsupported(value: Any) -> bool:
    return isinstance(value, Mapping) and "error" in value


def _cuda_number(version: str) -> int:
    """'13.0' -> 13000, NVML's encoding of CUDA versions."""
    major, minor = (int(p) for p in version.split(".")[:2])
    return major * 1000 + minor * 10


def gpu_checks(gpu: Mapping[str, Any], expect: GpuExpectation) -> list[Check]:
    i = gpu["index"]
    if "error" in gpu:
        # NVML counts the GPU but cannot open it (fallen off the bus, XID 79): nothing else to read.
        return [Check("readable", False, f"NVML cannot read it: {gpu['error']}", i)]
    checks = [Check("model", expect.model in gpu["name"], f"{gpu['name']} (expected {expect.model})", i)]
    if expect.memory_bytes:
        off = abs(gpu["memory_total_bytes"] - expect.memory_bytes) / expect.memory_bytes
        checks.append(Check("memory", off <= MEMORY_TOLERANCE,
                            f"{gib(gpu['memory_total_bytes'])} (inventory: {gib(expect.memory_bytes)})", i))
    checks.append(Check("ecc mode", gpu["ecc_mode"] == 1, "on" if gpu["ecc_mode"] == 1 else f"off ({gpu['ecc_mode']})", i))
    for key in ("ecc_uncorrected_volatile", "ecc_uncorrected_aggregate"):
        value = gpu[key]
        checks.append(Check(key.replace("_", " "), not _unsupported(value) and value == 0,
                            "not reported" if _unsupported(value) else str(value), i))
    pending = gpu["retired_pages_pending"]
    # Hopper replaced page retirement with row remapping: "not supported" is the healthy answer there.
    checks.append(Check("retired pages pending", _unsupported(pending) or pending == 0,
                        "not applicable (row remapping GPU)" if _unsupported(pending) else str(pending), i))
    rows = gpu["remapped_rows"]
    if not _unsupported(rows):
        checks.append(Check("remapped rows", rows["pending"] == 0 and rows["failure"] == 0,
                            f"pending {rows['pending']}, failure {rows['failure']}, "
                            f"uncorrectable {rows['uncorrectable']}", i))
    checks.append(Check("persistence mode", gpu["persistence_mode"] == 1,
                        "on" if gpu["persistence_mode"] == 1 else "off", i))
    want_gen = expect.pcie_gen or gpu["pcie_gen_max"]
    want_width = expect.pcie_width or gpu["pcie_width_max"]
    checks.append(Check("pcie link", gpu["pcie_gen"] >= want_gen and gpu["pcie_width"] >= want_width,
                        f"gen {gpu['pcie_gen']} x{gpu['pcie_width']} (expected gen {want_gen} x{want_width})", i))
    mig_on = gpu["mig_mode"] == 1
    checks.append(Check("mig mode", mig_on == expect.mig, f"{'on' if mig_on else 'off'} (expected "
                                                          f"{'on' if expect.mig else 'off'})", i))
    procs = gpu["processes"] if not _unsupported(gpu["processes"]) else []
    checks.append(Check("foreign processes", not procs,
                        "none" if not procs else ", ".join(f"pid {p['pid']} holds {gib(p['used_memory_bytes'])}"
                                                           for p in procs), i))
    return checks


def health_checks(readings: Mapping[str, Any], expect: GpuExpectation) -> list[Check]:
    """Every check of one host; a host passes only if all pass."""
    if "nvml_error" in readings:
        return [Check("nvidia driver", False, f"NVML did not load: {readings['nvml_error']}. "
                                              "Is the driver installed and its module loaded (nvidia-smi)?")]
    gpus = readings.get("gpus", [])
    checks = [Check("nvidia driver", True, f"{readings['driver_version']} (CUDA up to "
                                           f"{readings['cuda_driver_version'] // 1000}.{readings['cuda_driver_version'] % 1000 // 10})")]
    if not gpus:
        return checks + [Check("gpu count", False, "no NVIDIA GPU found")]
    checks.append(Check("gpu count", len(gpus) == expect.count, f"{len(gpus)} (expected {expect.count})"))
    torch = readings.get("torch", {})
    if "cuda" in torch and torch["cuda"]:
        needed = _cuda_number(torch["cuda"])
        checks.append(Check("driver supports torch's CUDA", readings["cuda_driver_version"] >= needed,
                            f"torch {torch['version']} is built for CUDA {torch['cuda']}; the driver supports up to "
                            f"{readings['cuda_driver_version'] // 1000}.{readings['cuda_driver_version'] % 1000 // 10}"))
    for gpu in gpus:
        checks += gpu_checks(gpu, expect)
    return checks


def burnin_checks(result: Mapping[str, Any], reference: Mapping[str, float] | None = None,
                  threshold: float = BURNIN_THRESHOLD) -> list[Check]:
    """Each burn-in measurement against the reference for this GPU model."""
    reference = reference or BURNIN_REFERENCE.get(result["name"])
    if reference is None:
        return [Check("burn-in reference", False, f"no reference for {result['name']}: add one to BURNIN_REFERENCE",
                      result["device"])]
    return [Check(f"burn-in {key}", result[key] >= threshold * ref,
                  f"{result[key]:.1f} = {result[key] / ref:.0%} of {ref:g}", result["device"])
            for key, ref in reference.items()]


def allreduce_checks(result: Mapping[str, Any], reference: float | None = None,
                     threshold: float = BURNIN_THRESHOLD) -> list[Check]:
    """The all-reduce across the host's GPUs (gpu_probe.py allreduce) against the bus bandwidth
    reference for this GPU model: a hang or a failing rank fails, one GPU is not applicable."""
    ranks = f"{result['world_size']} ranks of {result['backend']}"
    if "error" in result:
        return [Check("all-reduce", False, f"{result['error']} ({ranks}). The GPUs cannot all-reduce "
                                           "together: check `nvidia-smi topo -m`, the fabric manager on "
                                           "NVSwitch hosts, and NCCL_P2P_DISABLE in the environment.")]
    if result["world_size"] == 1:
        return [Check("all-reduce", True, "not applicable (one GPU: nothing crosses a link)")]
    name = result["devices"][0]
    if reference is None:
        reference = ALLREDUCE_REFERENCE.get(name)
    if reference is None:
        return [Check("all-reduce reference", False, f"no reference for {name}: add one to ALLREDUCE_REFERENCE")]
    largest = max(result["sizes"], key=lambda s: s["bytes"])
    busbw = largest["busbw_gb_s"]
    return [Check("all-reduce bus bandwidth", busbw >= threshold * reference,
                  f"{busbw:.1f} GB/s = {busbw / reference:.0%} of {reference:g} ({ranks} on {name}, "
                  f"{largest['bytes'] >> 20} MiB of {result['dtype']})")]


def table(host: str, checks: list[Check]) -> str:
    """A readable per-host table: one line per check, failures marked."""
    lines = [f"{host}: {'PASS' if all(c.ok for c in checks) else 'FAIL'}"]
    for c in checks:
        where = f"gpu{c.gpu} " if c.gpu is not None else ""
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {where}{c.name}: {c.detail}")
    return "\n".join(lines)
