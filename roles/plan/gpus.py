"""The GPUs vllm-fleet can plan for: memory, memory bandwidth and the number formats they compute in.

``memory_bytes`` is the total the driver reports (``nvidia-smi`` / NVML "Total"), not the
marketing size: an "80 GB" H100 reports 81559 MiB, and vLLM's ``--gpu-memory-utilization`` is
a fraction of that figure. Bandwidths are the vendors' datasheet peaks; a decode step reads every
weight once, so bandwidth bounds single-stream speed (see ``roles.plan.capacity``).

``compute_capability`` is NVIDIA's (8.0 for A100): vLLM's kernels are chosen by it, e.g. fp8
weights run natively from 8.9 and weight-only through the Marlin kernel from 7.5 (see
``roles.plan.quantization``).

An inventory adds GPUs or corrects these with ``vllm_gpu_types``:
``{id: {memory_gib, bandwidth_tb_s, bf16, fp8, compute_capability}}`` (``compute_capability``
optional: see ``derived_capability``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from roles.common import GIB
from roles.errors import FleetConfigError

MIB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    """Total memory as the driver reports it."""
    bandwidth_bytes_per_s: float
    """Peak memory bandwidth from the datasheet."""
    bf16: bool
    """Computes in bfloat16 (Ampere and later)."""
    fp8: bool
    """Has FP8 tensor cores (Ada and Hopper and later): fp8 GEMMs and vLLM's fp8 (e4m3) KV cache."""
    compute_capability: float
    nvml_name: str = ""
    """Part of the name the driver (NVML) reports, checked on the host; empty matches any."""


GPUS: dict[str, GpuSpec] = {
    # Hopper
    "h100-sxm": GpuSpec("h100-sxm", 81559 * MIB, 3.35e12, True, True, 9.0, nvml_name="H100 80GB HBM3"),
    "h100-pcie": GpuSpec("h100-pcie", 81559 * MIB, 2.0e12, True, True, 9.0, nvml_name="H100 PCIe"),
    "h200": GpuSpec("h200", 143771 * MIB, 4.8e12, True, True, 9.0, nvml_name="H200"),
    # Ampere
    "a100-80gb": GpuSpec("a100-80gb", 81920 * MIB, 2.039e12, True, False, 8.0, nvml_name="A100"),
    "a100-40gb": GpuSpec("a100-40gb", 40960 * MIB, 1.555e12, True, False, 8.0, nvml_name="A100"),
    "a10g": GpuSpec("a10g", 23028 * MIB, 0.6e12, True, False, 8.6, nvml_name="A10G"),
    # Ada
    "l40s": GpuSpec("l40s", 46068 * MIB, 0.864e12, True, True, 8.9, nvml_name="L40S"),
    "l4": GpuSpec("l4", 23034 * MIB, 0.3e12, True, True, 8.9, nvml_name="L4"),
    "rtx-4090": GpuSpec("rtx-4090", 24564 * MIB, 1.008e12, True, True, 8.9, nvml_name="RTX 4090"),
}
"""name: (name, memory, bandwidth, bf16, fp8, compute capability, NVML name)."""

# Keys of one vllm_gpu_types entry and the types they take.
_EXTRA_KEYS: dict[str, tuple[type, ...]] = {
    "memory_gib": (int, float), "bandwidth_tb_s": (int, float), "bf16": (bool,), "fp8": (bool,),
    "compute_capability": (int, float),
}
_OPTIONAL_KEYS = ("compute_capability",)
_EXAMPLE = "vllm_gpu_types: {my-gpu: {memory_gib: 79.6, bandwidth_tb_s: 3.35, bf16: true, fp8: true}}"


def _from_extra(name: str, entry: Any, base: GpuSpec | None, where: str) -> GpuSpec:
    field = f"{where}vllm_gpu_types: `{name}`"
    if not isinstance(entry, Mapping):
        raise FleetConfigError(field, f"expected a mapping of {', '.join(_EXTRA_KEYS)}, got {entry!r}.",
                               f"write it as in `{_EXAMPLE}`.")
    unknown = sorted(set(entry) - set(_EXTRA_KEYS))
    if unknown:
        raise FleetConfigError(field, f"unknown key(s) {', '.join(map(str, unknown))}.",
                               f"use only {', '.join(_EXTRA_KEYS)}, as in `{_EXAMPLE}`.")
    missing = [key for key in _EXTRA_KEYS if key not in entry and key not in _OPTIONAL_KEYS]
    if base is None and missing:
        raise FleetConfigError(field, f"a new GPU type needs every key; {', '.join(missing)} missing.",
                               f"give all of {', '.join(k for k in _EXTRA_KEYS if k not in _OPTIONAL_KEYS)}, "
                               f"as in `{_EXAMPLE}`.")
    for key, value in entry.items():
        types = _EXTRA_KEYS[key]
        bad_type = not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        if bad_type or (bool not in types and value <= 0):
            kind = "true or false" if bool in types else "a positive number"
            raise FleetConfigError(f"{field}.{key}", f"expected {kind}, got {value!r}.",
                                   f"write it as in `{_EXAMPLE}`.")
    changes: dict[str, Any] = {"name": name}
    if "memory_gib" in entry:
        changes["memory_bytes"] = int(entry["memory_gib"] * GIB)
    if "bandwidth_tb_s" in entry:
        changes["bandwidth_bytes_per_s"] = float(entry["bandwidth_tb_s"]) * 1e12
    for key in ("bf16", "fp8", "compute_capability"):
        if key in entry:
            changes[key] = entry[key]
    if base is None:
        changes.setdefault("compute_capability", derived_capability(entry["bf16"], entry["fp8"]))
        return GpuSpec(**changes)
    return replace(base, **changes)


def derived_capability(bf16: bool, fp8: bool) -> float:
    """The lowest compute capability a GPU with these number formats can have, for a
    ``vllm_gpu_types`` entry that does not give its own: fp8 tensor cores arrived with Ada (8.9),
    bfloat16 with Ampere (8.0); anything older is taken as Volta (7.0). A lower bound, so the plan
    refuses a format the GPU might run rather than accept one it cannot."""
    return 8.9 if fp8 else 8.0 if bf16 else 7.0


def gpu_table(extra: Mapping[str, Any] | None = None, where: str = "") -> dict[str, GpuSpec]:
    """The built-in table with an inventory's ``vllm_gpu_types`` added (partial entries for a
    known id override only the keys they give). ``where`` prefixes the field names in messages
    (e.g. ``"host gpu-01: "``)."""
    table = dict(GPUS)
    for name, entry in (extra or {}).items():
        table[name] = _from_extra(str(name), entry, GPUS.get(name), where)
    return table


def gpu_spec(name: str, extra: Mapping[str, Any] | None = None, where: str = "") -> GpuSpec:
    """The GPU called ``name``, from the built-in table or the inventory's ``vllm_gpu_types``;
    ``where`` as for ``gpu_table``."""
    table = gpu_table(extra, where)
    if name not in table:
        raise FleetConfigError(
            f"{where}`vllm_gpu_type`", f"{name!r} is not a known GPU type; known: {', '.join(sorted(table))}.",
            f"use one of those, or describe it in the inventory with the memory the driver reports "
            f"(`nvidia-smi --query-gpu=memory.total --format=csv`), as in `{_EXAMPLE}`.")
    return table[name]
