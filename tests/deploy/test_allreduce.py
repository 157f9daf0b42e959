"""The all-reduce acceptance of multi-GPU hosts: `gpu_probe.py allreduce` run for real with torch's
gloo backend on CPU processes (the path NCCL takes on GPUs, without GPUs), its timeout on a rank
that never joins, runs recorded on the H200 behind the `device` tool (tests/fixtures/gpu/) and
copies edited to a multi-GPU host replayed through allreduce_checks, and the NVIDIA role running
it on multi-GPU hosts."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roles import site
from roles.nvidia import ALLREDUCE_TIMEOUT_S
from roles.paths import GPU_PROBE
from roles.plan.gpu_health import ALLREDUCE_REFERENCE, allreduce_checks, table
from tests.deploy import test_nvidia
from tests.deploy.sim_gpu import GpuState
from tests.deploy.simhost import SimulatedHost, ubuntu
from tests.deploy.test_nvidia import BURNIN, READINGS, commands, run, stops

# The NVIDIA role tests' fixture, shared: an H200 host's inventory data.
h200_host_data = test_nvidia.gpu_data

FIXTURES = Path(__file__).parents[1] / "fixtures" / "gpu"


def recorded(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def torch_python():
    """A python with torch: GPU_PROBE_PYTHON (`make test` sets it to a venv with the lab release's
    torch, installed from its wheelhouse), else the running one."""
    python = os.environ.get("GPU_PROBE_PYTHON", sys.executable)
    if subprocess.run([python, "-c", "import torch.distributed"], capture_output=True).returncode:
        pytest.fail(f"{python} cannot import torch: run the tests with `make test` (or `make unit`), "
                    "or set GPU_PROBE_PYTHON to a python that has torch")
    return python


def probe(python, *args, env=None):
    # The probe's stdout is also its workers' stdout: a worker it failed to kill would hold the
    # pipe open, and the run would hit this timeout instead of returning.
    done = subprocess.run([python, str(GPU_PROBE), "allreduce", "--backend", "gloo", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_allreduce_on_cpu_processes(torch_python, world_size):
    result = probe(torch_python, "--world-size", str(world_size), "--sizes-mb", "1", "4", "--timeout", "60")
    assert "error" not in result, result
    assert (result["backend"], result["world_size"], result["dtype"]) == ("gloo", world_size, "float32")
    assert result["devices"] == ["cpu"] * world_size
    assert [s["bytes"] for s in result["sizes"]] == [1 << 20, 4 << 20]
    for size in result["sizes"]:
        assert size["algbw_gb_s"] == pytest.approx(size["bytes"] / size["seconds"] / 1e9)
        assert size["busbw_gb_s"] == pytest.approx(size["algbw_gb_s"] * 2 * (world_size - 1) / world_size)
        assert size["busbw_gb_s"] > 0
    assert result["seconds"] < 60
    assert all(c.ok for c in allreduce_checks(result, reference=0.001)), table("cpu", allreduce_checks(result, 0.001))
    impossible = allreduce_checks(result, reference=1e6)
    assert [(c.name, c.ok) for c in impossible] == [("all-reduce bus bandwidth", False)]
    assert f"{world_size} ranks of gloo on cpu, 4 MiB of float32" in impossible[0].detail


def test_rank_that_never_joins_times_out(torch_python):
    result = probe(torch_python, "--world-size", "2", "--sizes-mb", "1", "--timeout", "5", "--stall-rank", "1")
    assert result["error"] == "timeout after 5 s"
    assert 5 <= result["seconds"] < 15
    checks = allreduce_checks(result)
    assert not checks[0].ok and checks[0].detail.startswith("timeout after 5 s (2 ranks of gloo)")


def test_rank_that_fails_to_start_says_why(torch_python):
    result = probe(torch_python, "--world-size", "2", "--sizes-mb", "1", "--timeout", "60",
                   env={"GLOO_SOCKET_IFNAME": "no-such-interface"})
    assert result["error"].startswith("rank ") and "no-such-interface" in result["error"]
    assert not allreduce_checks(result)[0].ok


# ---- runs recorded on the H200 ----------------------------------------------------------------------

def test_recorded_single_h200_is_not_applicable():
    result = recorded("h200-allreduce-1gpu.json")
    assert (result["backend"], result["devices"], result["dtype"]) == ("nccl", ["NVIDIA H200"], "bfloat16")
    assert all(s["busbw_gb_s"] == 0 for s in result["sizes"])
    for reference in (None, 1e6):  # one GPU: no bandwidth to judge, whatever the reference
        checks = allreduce_checks(result, reference)
        assert [(c.name, c.ok) for c in checks] == [("all-reduce", True)]
        assert checks[0].detail.startswith("not applicable")


@pytest.mark.parametrize("name, error", [
    ("h200-allreduce-stalled-rank.json", "timeout after 10 s"),
    ("h200-allreduce-2-ranks-on-1gpu.json", "world size 2 but torch sees 1 GPUs"),
])
def test_recorded_failures_fail_with_their_error(name, error):
    checks = allreduce_checks(recorded(name))
    assert [c.ok for c in checks] == [False]
    assert checks[0].detail.startswith(error) and "nvidia-smi topo -m" in checks[0].detail


@pytest.mark.parametrize("name", ["h200-host-cpu-allreduce-gloo-2.json", "h200-host-cpu-allreduce-gloo-4.json"])
def test_recorded_gloo_runs_on_the_h200_host(name):
    result = recorded(name)
    n = result["world_size"]
    for size in result["sizes"]:
        assert size["busbw_gb_s"] == pytest.approx(size["algbw_gb_s"] * 2 * (n - 1) / n)
    # The largest size decides: 64 MiB at ~2.1 GB/s on that host's CPUs.
    assert all(c.ok for c in allreduce_checks(result, reference=2.0))
    assert not any(c.ok for c in allreduce_checks(result, reference=3.0))


def h200s(count, busbw, name="NVIDIA H200"):
    """The recorded H200 run edited into one of ``count`` GPUs reaching ``busbw`` GB/s."""
    result = copy.deepcopy(recorded("h200-allreduce-1gpu.json"))
    result.update(world_size=count, devices=[name] * count)
    for size in result["sizes"]:
        size["busbw_gb_s"] = busbw
    return result


def test_multi_gpu_host_against_the_reference():
    assert all(c.ok for c in allreduce_checks(h200s(8, 0.9 * ALLREDUCE_REFERENCE["NVIDIA H200"])))
    pcie_fallback = allreduce_checks(h200s(8, 40.0))  # what GPUs that lost NVLink get
    assert [(c.name, c.ok) for c in pcie_fallback] == [("all-reduce bus bandwidth", False)]
    assert "40.0 GB/s = 11% of 350 (8 ranks of nccl on NVIDIA H200, 2048 MiB of bfloat16)" in pcie_fallback[0].detail
    unknown = allreduce_checks(h200s(2, 20.0, name="NVIDIA A10G"))
    assert [(c.name, c.ok) for c in unknown] == [("all-reduce reference", False)]


# ---- the NVIDIA role on a multi-GPU host ------------------------------------------------------------

class TwoGpuHost(SimulatedHost):
    """An onboarded-driver host with two H200s whose all-reduce prints ``allreduce``."""

    def __init__(self, allreduce: dict):
        readings = copy.deepcopy(READINGS)
        readings["gpus"].append({**readings["gpus"][0], "index": 1})
        super().__init__(ubuntu(22, 4), gpu=GpuState(pci_gpus=2, loaded="580.159.04", nouveau_loaded=False,
                                                     readings=readings, burnin=dict(BURNIN)))
        self.allreduce = allreduce
        self.asked: list[str] = []

    def _command(self, command: str) -> str:
        if "gpu_probe.py allreduce" in command:
            self.asked.append(command)
            return json.dumps(self.allreduce)
        return super()._command(command)


@pytest.mark.usefixtures("no_wheel_download", "in_tmp")
def test_two_gpu_host_onboards_after_a_healthy_allreduce(h200_host_data):
    sim = TwoGpuHost(h200s(2, 370.0))
    run_ = commands(run(h200_host_data(vllm_gpu_count=2), sim, deploy=site.onboard))
    assert stops(run_) == []
    assert len(sim.asked) == 1
    assert f"allreduce --backend nccl --world-size 2 --timeout {ALLREDUCE_TIMEOUT_S}" in sim.asked[0]
    assert json.loads(sim.files["/var/lib/vllm-fleet/gpu/allreduce.json"]["lines"][0])["world_size"] == 2


@pytest.mark.usefixtures("no_wheel_download", "in_tmp")
def test_two_gpu_host_whose_allreduce_hangs_is_stopped(h200_host_data):
    hung = dict(recorded("h200-allreduce-stalled-rank.json"), world_size=2)
    stop = stops(commands(run(h200_host_data(vllm_gpu_count=2), TwoGpuHost(hung), deploy=site.onboard)))
    assert len(stop) == 1 and "FAIL all-reduce: timeout after 10 s (2 ranks of nccl)" in stop[0]
