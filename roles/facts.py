"""Facts vllm-fleet reads from hosts that pyinfra does not ship."""

from __future__ import annotations

import shlex
from itertools import pairwise

from pyinfra.api import FactBase

from roles.files.fleet_probe import env_values


class PciNvidia(FactBase):
    """NVIDIA devices on the PCI bus, read from sysfs (works with no driver and no pciutils):
    {"gpus": N, "nvswitches": M}."""

    def command(self) -> str:
        return ("for d in /sys/bus/pci/devices/*; do [ \"$(cat $d/vendor 2>/dev/null)\" = 0x10de ] && "
                "cat $d/class; done; true")

    @staticmethod
    def default() -> dict:
        return {"gpus": 0, "nvswitches": 0}  # no output: no NVIDIA device at all

    def process(self, output: list[str]) -> dict:
        classes = [line.strip() for line in output]
        # 0x0300xx VGA, 0x0302xx 3D controller (data-centre GPUs); NVSwitches are 0x0680xx bridges.
        return {"gpus": sum(c.startswith(("0x0300", "0x0302")) for c in classes),
                "nvswitches": sum(c.startswith("0x0680") for c in classes)}


class NvidiaModuleVersion(FactBase):
    """Version of the loaded nvidia kernel module, or None when none is loaded."""

    def command(self) -> str:
        return "cat /sys/module/nvidia/version 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


class SecureBoot(FactBase):
    """Whether UEFI Secure Boot has the kernel refuse unsigned modules (False on legacy boot, with
    shim's validation turned off, or when it cannot be told)."""

    def command(self) -> str:
        return "mokutil --sb-state 2>/dev/null || true"

    default = bool  # no mokutil, legacy boot: nothing refuses unsigned modules

    def process(self, output: list[str]) -> bool:
        lines = {line.strip() for line in output}
        # After `mokutil --disable-validation` the firmware still reports Secure Boot, but shim
        # tells the kernel it is off (MokSBState), and unsigned modules load.
        return "SecureBoot enabled" in lines and "SecureBoot validation is disabled in shim" not in lines


class AptHolds(FactBase):
    """Packages held with apt-mark."""

    default = list

    def command(self) -> str:
        return "apt-mark showhold 2>/dev/null || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]


class CompleteDirs(FactBase):
    """Folders under ``parent`` whose ``marker`` file is written (release venvs, staged models),
    newest first."""

    default = list

    def command(self, parent: str, marker: str) -> str:
        return f"ls -1t {parent}/*/{marker} 2>/dev/null || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.strip().rsplit("/", 1)[0] for line in output if line.strip()]


class InstanceReleases(FactBase):
    """Per instance release link under a folder: the venv it points to and that venv's release."""

    default = dict

    def command(self, links_dir: str) -> str:
        return (f'for l in {links_dir}/*; do [ -L "$l" ] && echo "${{l##*/}} $(readlink "$l") '
                f'$(cat "$l/.release" 2>/dev/null)"; done; true')

    def process(self, output: list[str]) -> dict[str, dict[str, str]]:
        found = {}
        for line in output:
            name, venv, *release = line.split()
            # A link whose venv is gone (removed by hand) has no .release to read: named by its digest.
            found[name] = {"venv": venv, "release": release[0] if release else venv.rsplit("/", 1)[-1]}
        return found


class InstanceModels(FactBase):
    """Model folders the instances' environment files name (--model)."""

    default = set

    def command(self, env_dir: str) -> str:
        # Only the flags line: the files also hold API keys, which fact output must not carry.
        return f"grep -h '^ENGINE_ARGS=' {env_dir}/*.env 2>/dev/null || true"

    def process(self, output: list[str]) -> set[str]:
        models = set()
        for line in output:
            args = env_values([line])["ENGINE_ARGS"].split()
            models.update(value for flag, value in pairwise(args) if flag == "--model")
        return models


class FileSizes(FactBase):
    """The regular files under ``folder`` (paths relative to it) and their sizes in bytes; empty
    where the folder does not exist."""

    default = dict

    def command(self, folder: str) -> str:
        return f"find {shlex.quote(folder)} -type f -printf '%s %P\\n' 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, int]:
        return {path: int(size) for size, path in (line.split(" ", 1) for line in output if " " in line)}


class LocalPortRange(FactBase):
    """The range the kernel picks ephemeral ports from (net.ipv4.ip_local_port_range, which IPv6
    uses too): (low, high), or None where it cannot be read."""

    def command(self) -> str:
        return "cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true"

    def process(self, output: list[str]) -> tuple[int, int] | None:
        words = " ".join(output).split()  # "32768\t60999"
        if len(words) != 2 or not all(word.isdigit() for word in words):
            return None
        low, high = map(int, words)
        return (low, high) if 1 <= low <= high <= 65535 else None
