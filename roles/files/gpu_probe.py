#!/usr/bin/env python3
"""Raw GPU readings, run ON an NVIDIA host with the release venv's python (nvidia-ml-py, torch).

    gpu_probe.py readings      NVML and torch facts of every GPU, as JSON
    gpu_probe.py burnin        bf16 matmul, device copy and host-to-device bandwidth, as JSON
    gpu_probe.py allreduce --backend nccl --world-size N --timeout S
                               all-reduce bandwidth across N GPUs (or CPU processes with gloo), as JSON

It only measures and reports: what counts as healthy is decided on the control node
(roles/plan/gpu_health.py), so the same decisions replay recorded readings in CI. A reading the
driver does not support is recorded as {"error": "..."} rather than failing the probe.

Its NVML reader, nvml_readings(), is also that of gpu_metrics.py (the node exporter's textfile,
run by a timer), which sits beside it on the host and imports it as the top-level module
``gpu_probe``: keep this file's top level free of imports beyond the standard library (torch is
imported only where it is used), so that the metrics run every scrape interval stays cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
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
    gate) and gpu_metrics.py (the node exporter's textfile). A host without NVML (no
    nvidia-ml-py, no driver library: a CPU host) or whose driver does not answer gets
    {"nvml_error": ...}."""
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
