"""The sandbox of vllm@.service: both accelerator variants, rendered from the template the deploy
uploads, and (where this machine's systemd-analyze can score a unit file offline) their exposure."""


import pytest
from jinja2 import Environment, FileSystemLoader, StrictUndefined, UndefinedError
from pyinfra.api.util import get_template

from roles import paths
from tests.unit.systemd_units import offline_exposure, service

TEMPLATE = "vllm@.service.j2"
# What roles/vllm.py passes to files.template (install and data dirs at their defaults).
VARS = {"service_user": "vllm", "env_dir": paths.ENV_DIR, "links_dir": "/opt/vllm-fleet/instances",
        "data_dir": "/var/lib/vllm-fleet", "stop_timeout": 90, "serve_script": None}
ACCELERATORS = ("cpu", "nvidia")
NVIDIA_DEVICES = {"char-nvidia rw", "char-nvidiactl rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"}
EXPOSURE_TARGET = 2.5


def render(accelerator: str, **overrides) -> str:
    # pyinfra's environment for files.template: StrictUndefined, keep_trailing_newline, no trimming.
    env = Environment(loader=FileSystemLoader(paths.TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True)
    return env.get_template(TEMPLATE).render(**{**VARS, **overrides, "accelerator": accelerator})


def test_gpu_variant_opens_the_nvidia_devices_and_nothing_else():
    unit = service(render("nvidia"))
    assert unit.get("DevicePolicy") == ["closed"]
    assert set(unit.get("DeviceAllow", [])) == NVIDIA_DEVICES
    # A private /dev has no /dev/nvidia* at all.
    assert "PrivateDevices" not in unit


def test_cpu_variant_gets_a_private_dev():
    unit = service(render("cpu"))
    assert unit.get("PrivateDevices") == ["yes"]
    assert "DeviceAllow" not in unit


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_writable_executable_memory_and_proc_stay_available(accelerator):
    # oneDNN's JIT needs W+X memory; vLLM, torch and NVML read /proc/cpuinfo, /proc/driver/nvidia.
    unit = service(render(accelerator))
    assert unit.get("MemoryDenyWriteExecute", ["no"])[-1] != "yes"
    assert unit.get("ProcSubset", ["all"])[-1] != "pid"


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_sandbox_keeps_what_vllm_needs(accelerator):
    unit = service(render(accelerator))
    assert unit["ProtectSystem"] == ["strict"] and unit["PrivateTmp"] == ["yes"]
    assert unit["CacheDirectory"] == ["vllm-fleet/%i"]  # the one place it writes, kept writable
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    # sched_setaffinity and mbind (thread and NUMA binding) are in @resources, part of @system-service.
    assert "@system-service" in unit["SystemCallFilter"]
    assert not [f for f in unit["SystemCallFilter"] if f.startswith("~") and "@resources" in f]
    assert unit["SystemCallErrorNumber"] == ["EPERM"]


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_both_variants_keep_the_unit_behaviour(accelerator):
    unit = service(render(accelerator))
    python = "/opt/vllm-fleet/instances/%i/bin/python"
    assert unit["ExecStart"] == [f"{python} -m vllm.entrypoints.openai.api_server $ENGINE_ARGS"]
    assert unit["EnvironmentFile"] == [f"{paths.ENV_DIR}/%i.env"]
    assert unit["User"] == unit["Group"] == ["vllm"]
    assert (unit["KillMode"], unit["Restart"], unit["RestartSec"]) == (["mixed"], ["on-failure"], ["1"])
    assert (unit["TimeoutStartSec"], unit["TimeoutStopSec"]) == (["infinity"], ["90"])
    assert (unit["LimitNOFILE"], unit["LimitMEMLOCK"]) == (["65536"], ["infinity"])
    assert unit["WorkingDirectory"] == ["%C/vllm-fleet/%i"]
    env = " ".join(unit["Environment"])
    for assignment in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1",
                       "HF_HOME=/var/lib/vllm-fleet/hf", "VLLM_CACHE_ROOT=%C/vllm-fleet/%i",
                       "TORCHINDUCTOR_CACHE_DIR=%C/vllm-fleet/%i/inductor", "HOME=%C/vllm-fleet/%i"):
        assert assignment in env.split()


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_a_stage_of_a_multi_host_instance_runs_vllm_serve_in_the_same_sandbox(accelerator):
    plain = service(render(accelerator))
    stage = service(render(accelerator, serve_script=paths.VLLM_SERVE_PATH))
    assert stage["ExecStart"] == [f"/opt/vllm-fleet/instances/%i/bin/python {paths.VLLM_SERVE_PATH} $ENGINE_ARGS"]
    assert {k: v for k, v in stage.items() if k != "ExecStart"} == {k: v for k, v in plain.items() if k != "ExecStart"}


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_paths_come_from_the_settings(accelerator):
    text = render(accelerator, links_dir="/srv/vf/instances", data_dir="/data/vf", env_dir="/etc/vf")
    assert "/opt/vllm-fleet" not in text and "/var/lib/vllm-fleet" not in text
    assert "/srv/vf/instances/%i/bin/python" in text and "HF_HOME=/data/vf/hf" in text


def test_the_accelerator_must_be_passed():
    env = Environment(loader=FileSystemLoader(paths.TEMPLATES), undefined=StrictUndefined)
    with pytest.raises(UndefinedError):
        env.get_template(TEMPLATE).render(**VARS)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_pyinfra_renders_the_same_clean_unit(accelerator):
    text = get_template(str(paths.TEMPLATES / TEMPLATE)).render(**VARS, accelerator=accelerator)
    assert text == render(accelerator)
    assert "{%" not in text and "{{" not in text
    assert "\n\n\n" not in text and not text.startswith("\n") and text.endswith("]\nWantedBy=multi-user.target\n")


def offline_security(accelerator: str, tmp_path) -> tuple[float, str]:
    unit_file = tmp_path / "vllm@a.service"
    unit_file.write_text(render(accelerator))
    return offline_exposure(unit_file)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_exposure_is_within_the_target(accelerator, tmp_path):
    exposure, report = offline_security(accelerator, tmp_path)
    failing = "\n".join(line for line in report.splitlines() if line.startswith("✗"))
    assert exposure <= EXPOSURE_TARGET, f"{accelerator} unit exposure {exposure} > {EXPOSURE_TARGET}:\n{failing}"
