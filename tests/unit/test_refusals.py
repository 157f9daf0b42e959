"""Bad input is refused before any host is changed, with a message naming the field and the fix.

Each case is checked on the plan (the message) and through the real pyinfra CLI against
@fake hosts (one paragraph, no traceback, no operation run)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from roles.errors import FleetConfigError
from roles.plan.fleet import plan_fleet

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")


def bad_release_file(tmp_path: Path) -> Path:
    """A copy of the real releases folder whose torch pin is a range, not a version."""
    releases = tmp_path / "releases"
    releases.mkdir()
    for f in (REPO / "inventories" / "releases").iterdir():
        (releases / f.name).write_text(f.read_text())
    manifest = releases / "cpu-vllm-0.32.0.yml"
    manifest.write_text(manifest.read_text().replace('torch: "2.13.0+cpu"', 'torch: ">=2.13"'))
    return releases


CASES = {
    # name: (data overrides, expected field, expected fix)
    "misspelt setting": ({"vllm_max_modle_len": 2048}, "vllm_max_modle_len", "did you mean `vllm_max_model_len`?"),
    "misspelt instance setting": (
        {"vllm_instances": [{"name": "a", "port": 8001, "max_num_seq": 4}]}, "vllm_instances[0]: `max_num_seq`",
        "did you mean `max_num_seqs`?"),
    "missing model": ({"vllm_model_path": None}, "vllm_model_path", "set vllm_model_path to a model directory"),
    "model directory absent": ({"vllm_model_path": "/nonexistent/model"}, "vllm_model_path",
                               "vllm-fleet lab model"),
    "duplicate port": ({"vllm_instances": [{"name": "a", "port": 8001}, {"name": "b", "port": 8001}]},
                       "vllm_instances[1].port", "give every instance on a host its own port"),
    "unknown release": ({"vllm_release": "cpu-vllm-9.9.9"}, "cpu-vllm-9.9.9", "cpu-vllm-0.32.0"),
    "wrong type": ({"vllm_max_num_seqs": "16"}, "vllm_max_num_seqs", "set `vllm_max_num_seqs` to a int"),
    "accelerator mismatch": ({"vllm_accelerator": "nvidia"}, "vllm_accelerator", "pin a release for nvidia hosts"),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_refuses(host_data, case):
    overrides, field, fix = CASES[case]
    with pytest.raises(FleetConfigError) as err:
        plan_fleet([("h1", host_data(**overrides))], ["h1"])
    message = str(err.value)
    assert field in message and "Fix:" in message and fix in message, message


def test_plan_refuses_malformed_version_pin(host_data, tmp_path):
    data = host_data(vllm_releases_dir=str(bad_release_file(tmp_path)))
    with pytest.raises(FleetConfigError) as err:
        plan_fleet([("h1", data)], ["h1"])
    assert "packages.torch" in str(err.value) and "2.13.0" in str(err.value)


def test_plan_refuses_same_port_as_load_balancer(host_data):
    with pytest.raises(FleetConfigError, match="nginx_listen_port"):
        plan_fleet([("h1", host_data(vllm_instances=[{"name": "a", "port": 80}]))], ["h1"])


def test_plan_refuses_fleet_serving_two_names(host_data):
    with pytest.raises(FleetConfigError, match="different names"):
        plan_fleet([("h1", host_data()), ("h2", host_data(vllm_served_model_name="other"))], ["h1"])


def run_cli(tmp_path: Path, data: dict) -> subprocess.CompletedProcess:
    inventory = tmp_path / "inventory.py"
    inventory.write_text(textwrap.dedent(f"""
        data = {data!r}
        vllm = [("@fake/h1", {{**data, "fake_delay": 0}})]
        lb = ["@fake/h1"]
    """))
    return subprocess.run([str(PYINFRA), "-y", str(inventory), "deploys/vllm.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYINFRA_FAKE_DELAY": "0"})


@pytest.mark.parametrize("case", ["misspelt setting", "missing model", "duplicate port", "unknown release"])
def test_cli_stops_before_any_operation(host_data, tmp_path, case):
    overrides, field, fix = CASES[case]
    data = {k: v for k, v in host_data(**overrides).items() if v is not None}
    result = run_cli(tmp_path, data)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert field in out and fix in out, out
    assert "Traceback" not in out, out
    # Nothing reached the (fake) host: no operation was even prepared.
    assert "Starting operation" not in out and "Success" not in out, out


def test_cli_stops_on_malformed_pin(host_data, tmp_path):
    result = run_cli(tmp_path, host_data(vllm_releases_dir=str(bad_release_file(tmp_path))))
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "packages.torch" in out and "Traceback" not in out, out
