"""The instance environment file has one writer (roles/plan/engine.py) and one reader
(fleet_probe.env_values, used on hosts for the API key and by the InstanceModels fact)."""

from roles.files.fleet_probe import env_values, read_api_key
from roles.plan.engine import env_file


def test_what_the_engine_writes_reads_back_unchanged():
    env = {"ENGINE_ARGS": "--model /var/lib/vllm-fleet/models/tiny-62d543373470 --served-model-name a|b,c",
           "CUDA_VISIBLE_DEVICES": "0,1", "VLLM_API_KEY": 'k"e\\y=$1'}
    assert env_values(env_file(env).splitlines()) == env


def test_api_key_is_read_from_the_instance_file_and_absent_without_one(tmp_path):
    (tmp_path / "a.env").write_text(env_file({"ENGINE_ARGS": "--model /m", "VLLM_API_KEY": 's3"cret'}))
    (tmp_path / "b.env").write_text(env_file({"ENGINE_ARGS": "--model /m"}))
    assert read_api_key(str(tmp_path), "a") == 's3"cret'
    assert read_api_key(str(tmp_path), "b") is None
    assert read_api_key(str(tmp_path), "missing") is None
