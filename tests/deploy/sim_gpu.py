"""The NVIDIA side of a simulated host (tests/deploy/simhost.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GpuState:
    """The NVIDIA side of a simulated host: hardware, firmware, what the kernel has loaded."""

    pci_gpus: int
    nvswitches: int = 0
    secure_boot: bool = False
    loaded: str | None = None  # version of the loaded nvidia module
    nouveau_loaded: bool = True  # a fresh install: the in-tree driver has the GPUs
    installed: str | None = None  # driver version the packages put on disk
    holds: set = field(default_factory=set)
    readings: dict = field(default_factory=dict)  # what gpu_probe.py readings prints
    burnin: dict = field(default_factory=dict)
