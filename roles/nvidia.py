"""The NVIDIA role: driver from NVIDIA's CUDA apt repository, pinned and held, then proof of health.

Order on a host: refuse what cannot work before any change (no NVIDIA GPU on the PCI bus,
Secure Boot without a module signing key), install the pinned driver, reboot only when the
loaded module is not the pinned one (and only if the inventory allows it), then the NVML
health checks and, on first onboarding or on request, the burn-in (with an NCCL all-reduce
across the GPUs of a multi-GPU host). A failing check stops that host with its table; the rest
of the fleet goes on.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from io import StringIO
from pathlib import Path

from pyinfra import host, state
from pyinfra.api import StringCommand, deploy, operation
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Command, KernelVersion, LinuxDistribution
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from roles import apt_repository, paths
from roles.errors import FleetConfigError
from roles.facts import NvidiaModuleVersion, PciNvidia, SecureBoot
from roles.gates import failure, stop_host
from roles.plan import settings
from roles.plan.fleet import HostPlan
from roles.plan.gpu_health import GpuExpectation, allreduce_checks, burnin_checks, health_checks, table
from roles.platform import APT_INSTALL_ARGS
from roles.release.manifest import Driver

ALLREDUCE_TIMEOUT_S = 180


# ---- what differs between distributions: all of it here ----------------------------------------

@dataclass(frozen=True)
class DriverPlatform:
    repo_path: str  # folder of the CUDA repository for this distribution
    packages: tuple[str, ...]
    fabric_manager: str


def driver_platform(host_name: str, distro: dict, driver: Driver) -> DriverPlatform:
    """Package names of NVIDIA's CUDA repository per distribution, for one driver branch."""
    b, open_ = driver.branch, driver.kernel_modules == "open"
    name, major, minor = distro.get("name"), distro.get("major"), distro.get("minor")
    if name == "Ubuntu" and (major, minor) in ((22, 4), (24, 4)):
        flavour = "-open" if open_ else ""
        # Server (headless) packages: no X, no desktop; DKMS builds the module for each kernel.
        return DriverPlatform(repo_path=f"ubuntu{major}{int(minor):02d}",
                              packages=(f"nvidia-headless-{b}{flavour}", f"nvidia-utils-{b}",
                                        f"nvidia-dkms-{b}{flavour}"),
                              fabric_manager=f"nvidia-fabricmanager-{b}")
    if name == "Debian" and major == 12:
        return DriverPlatform(repo_path="debian12",
                              packages=("nvidia-driver-cuda", "nvidia-persistenced",
                                        "nvidia-kernel-open-dkms" if open_ else "nvidia-kernel-dkms"),
                              fabric_manager="nvidia-fabricmanager")
    raise FleetConfigError(f"host {host_name}", f"runs {name} {major}.{minor}: the NVIDIA role supports "
                                                "Ubuntu 22.04, Ubuntu 24.04 and Debian 12.",
                           "use one of those for GPU hosts.")


def repo_folder(repo_url: str, repo_path: str) -> str:
    """The folder of NVIDIA's flat CUDA repository for one distribution: its packages and its key."""
    return f"{repo_url.rstrip('/')}/{repo_path}/x86_64/"


def pin_file(driver: Driver) -> str:
    """Pin every NVIDIA driver package to the release's exact version (any packaging suffix)."""
    return apt_repository.pin_file("nvidia-* libnvidia-* libxnvctrl*", f"{driver.version}-*",
                                   "the driver of the pinned release, nothing newer or older.")


def reboot_reason(loaded: str | None, driver: Driver, nouveau_loaded: bool) -> str | None:
    """Why the new driver needs a reboot to take effect, or None."""
    if loaded == driver.version:
        return None
    if loaded is not None:
        return f"the running kernel has nvidia {loaded} loaded; {driver.version} takes effect after a reboot"
    if nouveau_loaded:
        return "nouveau holds the GPUs; the blacklist takes effect after a reboot"
    return None  # nothing loaded: modprobe loads the new module without a reboot


# ---- facts at execute time ------------------------------------------------------------------------

def _loaded_module() -> str | None:
    return host.get_fact(NvidiaModuleVersion)


def _nouveau_loaded() -> bool:
    return host.get_fact(Command, command="test -d /sys/module/nouveau && echo yes || echo no") == "yes"


@operation()
def driver_loaded(driver: Driver, allow_reboot: bool):
    """Make the pinned module the loaded one: modprobe when nothing is loaded, else a reboot if
    the inventory allows it, else stop with the reason."""
    if not state.is_executing:
        return
    loaded = _loaded_module()
    reason = reboot_reason(loaded, driver, _nouveau_loaded())
    if reason is None:
        if loaded != driver.version:
            yield StringCommand("modprobe nvidia && nvidia-smi -L")
        else:
            host.noop(f"nvidia {driver.version} is loaded")
        return
    if not allow_reboot:
        message = (f"{reason}. Fix: reboot the host in a maintenance window and re-run, or set "
                   "nvidia_allow_reboot = True to let the deploy reboot it.")
        yield failure(message)
        return
    yield from server.reboot._inner(delay=5, interval=5, reboot_timeout=900)


@operation()
def gpu_health(expect: GpuExpectation, python: str, burnin: bool, record_dir: str):
    """NVML health checks (and the burn-in when asked or never done): pass quietly, or stop the host
    with the table. The readings and verdicts are kept as JSON on the control node, the burn-in
    result on the host (it marks the host as onboarded)."""
    if not state.is_executing:
        return
    readings = json.loads(host.get_fact(Command, command=shlex.join([python, paths.GPU_PROBE_PATH, "readings"])))
    checks = health_checks(readings, expect)
    record = f"{record_dir}/burnin.json"
    if all(c.ok for c in checks) and (burnin or host.get_fact(FileContents, path=record) is None):
        result = json.loads(host.get_fact(Command, command=shlex.join([python, paths.GPU_PROBE_PATH, "burnin"])))
        checks += burnin_checks(result)
        records = {record: result}
        if expect.count > 1:  # tensor parallelism needs the GPUs to all-reduce together at NVLink speed
            allreduce = json.loads(host.get_fact(Command, command=shlex.join([
                python, paths.GPU_PROBE_PATH, "allreduce", "--backend", "nccl", "--world-size", str(expect.count),
                "--timeout", str(ALLREDUCE_TIMEOUT_S)])))
            checks += allreduce_checks(allreduce)
            records[f"{record_dir}/allreduce.json"] = allreduce
        yield StringCommand(f"mkdir -p {shlex.quote(record_dir)} && " + " && ".join(
            f"echo {shlex.quote(json.dumps(value))} > {shlex.quote(path)}" for path, value in records.items()))
    report = table(host.name, checks)
    write_record(host.name, readings, checks)
    if not all(c.ok for c in checks):
        yield failure(report)
        return
    host.log(report)


def write_record(host_name: str, readings: dict, checks) -> Path:
    """The host's readings and verdicts as JSON on the control node (not on the host: a record
    there would change at every run)."""
    path = paths.LOCAL_GPU_RECORDS / f"{host_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host_name, "ok": all(c.ok for c in checks), "readings": readings,
                                "checks": [asdict(c) for c in checks]}, indent=1) + "\n")
    return path


# ---- the role ---------------------------------------------------------------------------------------

@deploy("NVIDIA driver")
def driver(plan: HostPlan):
    """Refuse what cannot work, then install the pinned driver and get it loaded."""
    drv = plan.release.driver
    pci = host.get_fact(PciNvidia)
    expected = settings.value(plan.data, "vllm_gpu_count")
    if not pci["gpus"]:
        stop_host(f"host {plan.name}: no NVIDIA GPU found on the PCI bus, but the inventory declares "
                  "vllm_accelerator = nvidia. Fix: declare the host vllm_accelerator = cpu with a CPU release, "
                  "or check the hardware.")
        return False
    if expected is not None and pci["gpus"] != expected:
        stop_host(f"host {plan.name}: vllm_gpu_count: {pci['gpus']} NVIDIA GPUs on the PCI bus, the inventory "
                  f"says {expected}. Fix: correct vllm_gpu_count, or check for a GPU that fell off the bus.")
        return False
    if host.get_fact(SecureBoot) and host.get_fact(FileContents, path=paths.DKMS_SIGNING_KEY) is None \
            and _loaded_module() != drv.version:
        stop_host(f"host {plan.name}: Secure Boot is on and no DKMS signing key exists ({paths.DKMS_SIGNING_KEY}), so "
                  "the kernel would refuse an unsigned nvidia module. Fix: create and enroll one (on Ubuntu: "
                  "`update-secureboot-policy --new-key`, then `mokutil --import "
                  f"{paths.DKMS_SIGNING_KEY}`, reboot and confirm in the MOK manager), or turn Secure Boot off; then "
                  "re-run.")
        return False

    repo_url = settings.value(plan.data, "nvidia_repo_url")  # required by the plan on NVIDIA hosts
    plat = driver_platform(plan.name, host.get_fact(LinuxDistribution), drv)
    kernel = host.get_fact(KernelVersion)
    # NVSwitch systems: the fabric manager must be exactly the driver's version (CUDA error 802
    # otherwise); the pin covers it like every nvidia-* package.
    packages = [*plat.packages, *([plat.fabric_manager] if pci["nvswitches"] else [])]

    folder = repo_folder(repo_url, plat.repo_path)
    source = apt_repository.signed_source(
        "NVIDIA CUDA repository", key_url=folder + settings.value(plan.data, "nvidia_repo_key"),
        fingerprint=settings.value(plan.data, "nvidia_repo_key_fingerprint"), keyring=paths.NVIDIA_KEYRING,
        sources=paths.NVIDIA_SOURCES, source_text=apt_repository.deb822_source(folder, "/", paths.NVIDIA_KEYRING))
    pin = files.put(name=f"Pin the driver to {drv.version}", src=StringIO(pin_file(drv)), dest=paths.NVIDIA_PIN_FILE)
    nouveau = files.put(name="Blacklist nouveau", src=StringIO("blacklist nouveau\noptions nouveau modeset=0\n"),
                        dest=paths.NOUVEAU_BLACKLIST)
    server.shell(name="Rebuild the initramfs without nouveau", commands=["update-initramfs -u"], _if=nouveau.did_change)
    apt.update(name="Update package lists", _if=any_changed(source, pin))
    installed = apt.packages(name=f"Install the NVIDIA {drv.branch} driver {drv.version}",
                             packages=[f"linux-headers-{kernel}", "dkms", *packages], no_recommends=True,
                             extra_install_args=APT_INSTALL_ARGS)
    apt_repository.hold("Hold the driver packages (no unattended upgrade may move them)", packages)
    driver_loaded(name="Load the pinned driver (reboot only if needed and allowed)", driver=drv,
                  allow_reboot=settings.value(plan.data, "nvidia_allow_reboot"))
    systemd.service(name="Persistence daemon", service="nvidia-persistenced", running=True, enabled=True)
    if pci["nvswitches"]:
        systemd.service(name=f"Fabric manager {drv.version} (NVSwitch host)", service="nvidia-fabricmanager",
                        running=True, enabled=True, _if=installed.did_succeed)
    return True


@deploy("GPU health")
def health(plan: HostPlan, python: str):
    """The NVML gate before any model is served, and the burn-in on first onboarding."""
    files.put(name="Install the GPU probe", src=str(paths.GPU_PROBE), dest=paths.GPU_PROBE_PATH, mode="755",
              create_remote_dir=True)
    # Beside the probe, whose NVML reader it imports: the node exporter's GPU textfile (run by a timer),
    # and the module it writes the textfile with (a module only: not executable).
    files.put(name="Install the GPU metrics script", src=str(paths.GPU_METRICS), dest=paths.GPU_METRICS_PATH,
              mode="755", create_remote_dir=True)
    files.put(name="Install textfile.py (gpu_metrics.py imports it)", src=str(paths.TEXTFILE),
              dest=paths.TEXTFILE_PATH, mode="644", create_remote_dir=True)
    expect = GpuExpectation(count=settings.value(plan.data, "vllm_gpu_count") or 1, model=plan.gpu.nvml_name,
                            memory_bytes=plan.gpu.memory_bytes)
    gpu_health(name="NVML checks (and burn-in on first onboarding)", expect=expect, python=python,
               burnin=settings.value(plan.data, "nvidia_burnin"), record_dir=paths.GPU_RECORD_DIR)
