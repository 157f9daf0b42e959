"""Facts vllm-fleet reads from hosts that pyinfra does not ship."""

from __future__ import annotations

from pyinfra.api import FactBase

MIB = 1 << 20


def parse_nvidia_smi(lines: list[str]) -> list[dict]:
    """`nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` lines, parsed."""
    gpus = []
    for line in lines:
        name, _, memory = line.rpartition(",")
        if name and memory.strip().isdigit():
            gpus.append({"name": name.strip(), "memory_bytes": int(memory) * MIB})
    return gpus


class NvidiaGpus(FactBase):
    """The host's NVIDIA GPUs as the driver reports them: [{name, memory_bytes}], [] when none."""

    def command(self) -> str:
        # No nvidia-smi (no driver) and a driver that finds no GPU both read as no GPU.
        return ("command -v nvidia-smi >/dev/null 2>&1 && "
                "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null || true")

    def process(self, output: list[str]) -> list[dict]:
        return parse_nvidia_smi(output)
