import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A stand-in model directory: the plan only reads config.json and checksums the files."""
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
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
