#!/usr/bin/env python3
"""Raw GPU readings, run ON an NVIDIA host with the release venv's python (nvidia-ml-py, torch).

    gpu_probe.py readings      NVML and torch facts of every GPU, as JSON
    gpu_probe.py burnin        bf16 matmul, device copy and host-to-device bandwidth, as JSON

It only measures and prints: what counts as healthy is decided on the control node
(roles/gpu_health.py), so the same decision code replays recorded readings in CI. A reading
the driver does not support is recorded as {"error": "..."} rather than failing the probe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _read(fn, *args):
    try:
        value = fn(*args)
    except Exception as e:  # NVMLError_NotSupported and friends: record, never crash
        return {"error": f"{type(e).__name__}: {e}"}
    return value.decode() if isinstance(value, bytes) else value


def readings() -> dict:
    import pynvml as nv

    out: dict = {"time": time.time()}
    try:
        nv.nvmlInit()
    except Exception as e:
        out["nvml_error"] = f"{type(e).__name__}: {e}"
        return out
    out["driver_version"] = _read(nv.nvmlSystemGetDriverVersion)
    out["cuda_driver_version"] = _read(nv.nvmlSystemGetCudaDriverVersion)  # e.g. 13000 for CUDA 13.0
    out["gpus"] = []
    for index in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = _read(nv.nvmlDeviceGetMemoryInfo, h)
        remapped = _read(nv.nvmlDeviceGetRemappedRows, h)
        procs = _read(nv.nvmlDeviceGetComputeRunningProcesses, h)
        out["gpus"].append({
            "index": index,
            "name": _read(nv.nvmlDeviceGetName, h),
            "uuid": _read(nv.nvmlDeviceGetUUID, h),
            "memory_total_bytes": mem if isinstance(mem, dict) else mem.total,
            "memory_used_bytes": mem if isinstance(mem, dict) else mem.used,
            "persistence_mode": _read(nv.nvmlDeviceGetPersistenceMode, h),
            "ecc_mode": _read(lambda: nv.nvmlDeviceGetEccMode(h)[0]),
            "ecc_uncorrected_volatile": _read(nv.nvmlDeviceGetTotalEccErrors, h,
                                              nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC),
            "ecc_uncorrected_aggregate": _read(nv.nvmlDeviceGetTotalEccErrors, h,
                                               nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_AGGREGATE_ECC),
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
        })
    try:
        import torch
        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "device_count": torch.cuda.device_count()}
    except Exception as e:
        out["torch"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _time_cuda(fn, repeats: int) -> float:
    """Seconds per call, on CUDA events, after one warm-up call."""
    import torch

    fn()
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
    matmul_s = _time_cuda(lambda: a @ b, repeats=200)
    a = b = None  # free the matrices before the copy test allocates 4 GiB
    src = torch.empty(2 << 30, device="cuda", dtype=torch.uint8)  # 2 GiB, far past L2
    dst = torch.empty_like(src)
    copy_s = _time_cuda(lambda: dst.copy_(src), repeats=50)
    src = dst = None
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dev = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    h2d_s = _time_cuda(lambda: dev.copy_(host, non_blocking=True), repeats=20)
    return {
        "device": device,
        "name": torch.cuda.get_device_name(device),
        "matmul_bf16_tflops": 2 * n**3 / matmul_s / 1e12,
        "device_copy_tb_s": 2 * (2 << 30) / copy_s / 1e12,  # bytes read plus bytes written
        "h2d_gb_s": (1 << 30) / h2d_s / 1e9,
        "seconds": time.monotonic() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("readings")
    b = sub.add_parser("burnin")
    b.add_argument("--device", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(readings() if args.command == "readings" else burnin(args.device), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
