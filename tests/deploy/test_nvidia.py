"""The NVIDIA role on simulated fresh Ubuntu 22.04, Ubuntu 24.04 and Debian 12 GPU hosts: the
exact repository, pin, packages and hold it applies, reboots only when the loaded module is not
the pinned one, Secure Boot and missing GPUs stop the host before any change, NVSwitch hosts get
a fabric manager of the driver's version, and the NVML gate replays readings recorded on a real
H200."""

import copy
import hashlib
import json
from pathlib import Path

import pytest

from roles import paths, site
from tests.deploy.fakehost import changed, fleet_plan, plan
from tests.deploy.sim_gpu import GpuState
from tests.deploy.simhost import SimulatedHost, debian, ubuntu

FIXTURES = Path(__file__).parents[1] / "fixtures" / "gpu"
READINGS = json.loads((FIXTURES / "h200-readings.json").read_text())
BURNIN = json.loads((FIXTURES / "h200-burnin.json").read_text())
REPO = "https://cuda-mirror.example/compute/cuda/repos"

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")


def h200_data(host_data, releases_dir, **overrides) -> dict:
    """An H200 host's data (``host_data``, the conftest fixture), on the NVIDIA release in ``releases_dir``."""
    return host_data(**{
        "vllm_releases_dir": str(releases_dir), "vllm_release": "nvidia-vllm-0.32.0",
        "vllm_accelerator": "nvidia", "vllm_gpu_type": "h200", "vllm_gpu_count": 1,
        "vllm_instances": [{"name": "a", "port": 8001}], "nvidia_repo_url": REPO, **overrides})


@pytest.fixture
def gpu_data(host_data, nvidia_releases):
    return lambda **overrides: h200_data(host_data, nvidia_releases, **overrides)


def gpu_host(distro, **state):
    return SimulatedHost(distro, gpu=GpuState(pci_gpus=state.pop("pci_gpus", 1), readings=copy.deepcopy(READINGS),
                                              burnin=dict(BURNIN), **state))


def run(data, sim, name="g1", deploy=site.serve):
    if sim.distro["major"] == 24:  # the lock is for Python 3.11; on 24.04 the operator provides it
        data = {**data, "vllm_python": "/opt/python3.11/bin/python3.11"}
    fleet = fleet_plan([(name, data)], [("lb", {"ssh_hostname": "10.9.0.2"})])
    return plan(deploy, fleet, host_name=name, host_data=data, sim=sim)


def commands(ops):
    return [c for op in ops for c in op.commands]


def rebooted(run_):
    return any("&& reboot )" in c for c in run_)


def stops(run_):
    """The commands that stop a host with a reason."""
    return [c for c in run_ if c.startswith("echo ") and c.endswith("exit 1")]


@pytest.mark.parametrize("distro, repo_path, packages", [
    (ubuntu(22, 4), "ubuntu2204", ["nvidia-headless-580-open", "nvidia-utils-580", "nvidia-dkms-580-open"]),
    (ubuntu(24, 4), "ubuntu2404", ["nvidia-headless-580-open", "nvidia-utils-580", "nvidia-dkms-580-open"]),
    (debian(12), "debian12", ["nvidia-driver-cuda", "nvidia-persistenced", "nvidia-kernel-open-dkms"]),
])
def test_fresh_gpu_host_gets_the_pinned_driver(gpu_data, distro, repo_path, packages):
    sim = gpu_host(distro)
    ops = run(gpu_data(nvidia_allow_reboot=True), sim)
    run_ = commands(ops)
    text = "\n".join(run_)
    assert f"{REPO}/{repo_path}/x86_64/3bf863cc.pub" in text
    check = next(i for i, c in enumerate(run_) if "grep -q '^fpr:*EB693B3035CD5710E231E123A4B469963BF863CC:'" in c)
    # What fetches and checks the key is there first (a minimal Debian has neither curl nor gpg).
    fetchers = next(i for i, c in enumerate(run_) if " install " in c and {"curl", "gpg"} <= set(c.split()))
    assert fetchers < next(i for i, c in enumerate(run_) if "3bf863cc.pub" in c) < check
    assert sim.files["/etc/apt/sources.list.d/nvidia-cuda.sources"]["lines"] == [
        "Types: deb", f"URIs: {REPO}/{repo_path}/x86_64/", "Suites: /",
        "Signed-By: /usr/share/keyrings/nvidia-cuda-archive.gpg"]
    assert "Pin: version 580.159.04-*" in sim.files["/etc/apt/preferences.d/nvidia-driver"]["lines"]
    install = next(c for c in run_ if "install" in c and "dkms" in c)
    assert install.split()[-4:] == ["linux-headers-6.8.0-45-generic", "dkms", *packages][-4:]
    assert f"apt-mark hold {' '.join(sorted(packages))}" in run_
    assert "update-initramfs -u" in run_
    # nouveau had the GPUs: the new driver needs a reboot, which the inventory allows.
    assert rebooted(run_)
    assert "systemctl start nvidia-persistenced.service" in run_
    assert not any("fabricmanager" in c for c in run_)
    # First onboarding: the NVML gate passed and the burn-in ran, its record kept on the host.
    assert "/var/lib/vllm-fleet/gpu/burnin.json" in sim.files
    # Order: driver, then the release venv, then the GPU gate, then the instances.
    names = [op.name for op in changed(ops)]
    assert names.index(next(n for n in names if "Install the NVIDIA 580" in n)) < \
        names.index(next(n for n in names if "venv" in n)) < \
        names.index(next(n for n in names if "NVML checks" in n)) < \
        names.index(next(n for n in names if "Start vllm@a" in n))


def test_the_gpu_metrics_script_is_installed_beside_the_modules_it_imports(gpu_data):
    """gpu_metrics.py imports gpu_probe.py and textfile.py as sibling modules: all three land, as
    they are here, in the one host scripts folder (the textfile timer runs the metrics script
    there); the two scripts executable, textfile.py (a module only) not."""
    sim = gpu_host(ubuntu(22, 4))
    run(gpu_data(nvidia_allow_reboot=True), sim)
    for local, remote, mode in ((paths.GPU_PROBE, paths.GPU_PROBE_PATH, 755),
                                (paths.GPU_METRICS, paths.GPU_METRICS_PATH, 755),
                                (paths.TEXTFILE, paths.TEXTFILE_PATH, 644)):
        assert remote.rsplit("/", 1) == [paths.HOST_SCRIPTS_DIR, local.name]
        assert sim.files[remote]["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
        assert sim.files[remote]["mode"] == mode


@pytest.mark.parametrize("distro", [ubuntu(22, 4), ubuntu(24, 4), debian(12)])
def test_second_run_on_an_onboarded_host_changes_nothing(gpu_data, distro):
    sim = gpu_host(distro)
    run(gpu_data(nvidia_allow_reboot=True), sim)
    again = changed(run(gpu_data(nvidia_allow_reboot=True), sim))
    assert [(op.name, op.commands) for op in again] == []


def test_reboot_is_not_done_without_permission(gpu_data):
    sim = gpu_host(ubuntu(22, 4))
    ops = run(gpu_data(), sim)
    stop = stops(commands(ops))
    assert len(stop) == 1 and "nouveau holds the GPUs" in stop[0] and "nvidia_allow_reboot" in stop[0]
    assert not rebooted(commands(ops))


def test_no_reboot_when_the_loaded_module_is_the_pinned_one(gpu_data):
    sim = gpu_host(ubuntu(22, 4), loaded="580.159.04", nouveau_loaded=False)
    run_ = commands(run(gpu_data(), sim))
    assert not rebooted(run_) and not any(c.startswith("modprobe") for c in run_)


def test_older_loaded_module_means_a_reboot(gpu_data):
    sim = gpu_host(ubuntu(24, 4), loaded="570.86.15", nouveau_loaded=False)
    run_ = commands(run(gpu_data(nvidia_allow_reboot=True), sim))
    assert rebooted(run_)


def test_no_module_loaded_and_no_nouveau_loads_without_reboot(gpu_data):
    sim = gpu_host(debian(12), nouveau_loaded=False)
    run_ = commands(run(gpu_data(), sim))
    assert "modprobe nvidia && nvidia-smi -L" in run_ and not rebooted(run_)


def test_secure_boot_without_signing_key_stops_before_any_change(gpu_data):
    ops = run(gpu_data(nvidia_allow_reboot=True), gpu_host(ubuntu(22, 4), secure_boot=True))
    run_ = commands(ops)
    assert len(run_) == 1 and "Secure Boot is on and no DKMS signing key" in run_[0]
    assert "mokutil --import" in run_[0]


def test_nvswitch_host_gets_the_fabric_manager_of_the_driver_version(gpu_data):
    sim = gpu_host(ubuntu(22, 4), nvswitches=4)
    run_ = commands(run(gpu_data(nvidia_allow_reboot=True), sim))
    install = next(c for c in run_ if "install" in c and "dkms" in c)
    assert "nvidia-fabricmanager-580" in install.split()
    # The same pin (every nvidia-* package at 580.159.04) holds the fabric manager to the driver.
    assert "Package: nvidia-* libnvidia-* libxnvctrl*" in sim.files["/etc/apt/preferences.d/nvidia-driver"]["lines"]
    assert "apt-mark hold nvidia-dkms-580-open nvidia-fabricmanager-580 nvidia-headless-580-open nvidia-utils-580" in run_
    assert "systemctl start nvidia-fabricmanager.service" in run_


def test_host_without_nvidia_gpu_stops_before_any_change(gpu_data):
    run_ = commands(run(gpu_data(), gpu_host(debian(12), pci_gpus=0)))
    assert len(run_) == 1 and "no NVIDIA GPU found" in run_[0]


def test_unhealthy_gpu_stops_the_host_before_serving(gpu_data, tmp_path):
    sim = gpu_host(ubuntu(22, 4), loaded="580.159.04", nouveau_loaded=False)
    sim.gpu.readings["gpus"][0]["ecc_uncorrected_volatile"] = 2
    ops = run(gpu_data(), sim)
    failing = [op for op in ops if stops(op.commands)]
    assert [op.name.split(" | ")[-1] for op in failing] == ["NVML checks (and burn-in on first onboarding)"]
    assert "FAIL gpu0 ecc uncorrected volatile: 2" in failing[0].commands[0]
    record = json.loads((tmp_path / ".cache" / "gpu-health" / "g1.json").read_text())
    assert record["ok"] is False and record["readings"]["gpus"][0]["ecc_uncorrected_volatile"] == 2


def test_gpu_deploy_onboards_without_serving(gpu_data):
    sim = gpu_host(ubuntu(22, 4), loaded="580.159.04", nouveau_loaded=False)
    run_ = commands(run(gpu_data(), sim, deploy=site.onboard))
    assert any("-m venv" in c for c in run_) and not any("vllm@" in c for c in run_)
    assert "/var/lib/vllm-fleet/gpu/burnin.json" in sim.files


def test_facts_read_empty_output_as_nothing_found():
    # pyinfra returns a fact's default when its command prints nothing (a host without GPUs).
    from roles.facts import AptHolds, PciNvidia, SecureBoot
    assert PciNvidia().default() == {"gpus": 0, "nvswitches": 0}
    assert SecureBoot().default() is False and AptHolds().default() == []
    assert PciNvidia().process(["0x030200", "0x068000", "0x068000", "0x020000"]) == {"gpus": 1, "nvswitches": 2}


def test_a_tight_fit_is_warned_in_the_deploy(gpu_data, caplog):
    """The plan's tight-fit warning reaches the operator running pyinfra, not only `vllm-fleet plan`:
    2% of an H200 leaves about 0.7 GB of KV cache per GPU after the reserve."""
    with caplog.at_level("WARNING", logger="pyinfra"):
        run(gpu_data(vllm_gpu_memory_utilization=0.02), gpu_host(debian(12)))
    warned = [r.getMessage() for r in caplog.records if "tight fit" in r.getMessage()]
    assert len(warned) == 1 and "instance a: tight fit:" in warned[0] and "of KV cache per GPU" in warned[0], warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="pyinfra"):
        run(gpu_data(), gpu_host(debian(12)))
    assert not [r for r in caplog.records if "tight fit" in r.getMessage()]
