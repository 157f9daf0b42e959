"""The GPU health and burn-in decisions, replayed on readings recorded on a real H200
(tests/fixtures/gpu/, from roles/files/gpu_probe.py run through the `device` tool), and on
copies edited to fail in one way each."""

import copy
import json
from pathlib import Path

import pytest

from roles.plan.gpu_health import GpuExpectation, burnin_checks, health_checks, table

FIXTURES = Path(__file__).parents[1] / "fixtures" / "gpu"
H200 = GpuExpectation(count=1, model="H200", memory_bytes=143771 * 2**20)


@pytest.fixture
def readings():
    return json.loads((FIXTURES / "h200-readings.json").read_text())


def failing(checks):
    return {c.name for c in checks if not c.ok}


def test_recorded_h200_passes(readings):
    checks = health_checks(readings, H200)
    assert failing(checks) == set(), table("h200", checks)
    assert "retired pages pending: not applicable" in table("h200", checks)


def test_uncorrectable_ecc_error_fails(readings):
    bad = copy.deepcopy(readings)
    bad["gpus"][0]["ecc_uncorrected_volatile"] = 3
    assert failing(health_checks(bad, H200)) == {"ecc uncorrected volatile"}


def test_a_gpu_nvml_cannot_open_fails_without_a_crash(readings):
    bad = copy.deepcopy(readings)
    bad["gpus"][0] = {"index": 0, "error": "GPU is lost"}
    checks = health_checks(bad, H200)
    assert failing(checks) == {"readable"} and "GPU is lost" in table("h200", checks)


def test_wrong_gpu_count_fails(readings):
    assert failing(health_checks(readings, GpuExpectation(count=2, model="H200"))) == {"gpu count"}


def test_driver_too_old_for_torch_cuda_fails(readings):
    bad = copy.deepcopy(readings)
    bad["cuda_driver_version"] = 12040  # a 550-series driver: CUDA 12.4 at most
    checks = health_checks(bad, H200)
    assert failing(checks) == {"driver supports torch's CUDA"}
    assert "built for CUDA 13.0; the driver supports up to 12.4" in table("h", checks)


@pytest.mark.parametrize("field, value, check", [
    ("persistence_mode", 0, "persistence mode"),
    ("mig_mode", 1, "mig mode"),
    ("pcie_width", 8, "pcie link"),
    ("remapped_rows", {"correctable": 0, "uncorrectable": 1, "pending": 1, "failure": 0}, "remapped rows"),
    ("processes", [{"pid": 4242, "used_memory_bytes": 8 << 30}], "foreign processes"),
    ("memory_total_bytes", 80 * 2**30, "memory"),
])
def test_each_gpu_fault_fails_its_own_check(readings, field, value, check):
    bad = copy.deepcopy(readings)
    bad["gpus"][0][field] = value
    assert failing(health_checks(bad, H200)) == {check}


def test_host_without_nvidia_gpu():
    checks = health_checks({"nvml_error": "NVMLError_LibraryNotFound: NVML Shared Library Not Found"}, H200)
    assert not checks[0].ok and "NVML did not load" in checks[0].detail


def test_recorded_burnin_passes_and_a_slow_gpu_fails():
    for name in ("h200-burnin.json", "h200-burnin-2.json"):
        result = json.loads((FIXTURES / name).read_text())
        assert all(c.ok for c in burnin_checks(result)), table(name, burnin_checks(result))
        assert result["seconds"] < 60
    slow = dict(result, matmul_bf16_tflops=600.0)
    assert failing(burnin_checks(slow)) == {"burn-in matmul_bf16_tflops"}
