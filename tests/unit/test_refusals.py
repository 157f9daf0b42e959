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
        plan_fleet([("h1", host_data(nginx_listen_port=8001))], ["h1"])


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


# ---- issue 10's classes through `vllm-fleet plan`: one paragraph, exit 2, no traceback ------------

VLLM_FLEET = Path(sys.executable).with_name("vllm-fleet")


def plan_cli(tmp_path: Path, vllm: list, lb: list, **groups) -> subprocess.CompletedProcess:
    inventory = tmp_path / "inventory.py"
    inventory.write_text("".join(f"{name} = {hosts!r}\n" for name, hosts in {"vllm": vllm, "lb": lb, **groups}.items()))
    return subprocess.run([str(VLLM_FLEET), "plan", str(inventory)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def two_hosts(host_data, **second):
    return [("h1", host_data()), ("h2", host_data(**{"ssh_hostname": "10.9.0.12", **second}))]


# class: (vllm hosts, lb hosts, other groups, field, problem (with the value), fix), each from host_data
CLI_CASES = {
    "2 ranges: max_model_len 0": (
        lambda d: [("h1", d(vllm_max_model_len=0))], ["h1"], {},
        "host h1: `vllm_max_model_len`", "0 is outside the allowed range (at least 1)", "a value at least 1"),
    "2 ranges: a privileged instance port": (
        lambda d: [("h1", d(vllm_instances=[{"name": "a", "port": 443}]))], ["h1"], {},
        "host h1: instance a: vllm_instances[0]: `port`", "443 is outside the allowed range (from 1024 to 65535)",
        "runs unprivileged"),
    "3 a load balancer's misspelt setting": (
        lambda d: [("h1", d())], [("lb1", {"nginx_listen_prot": 8080})], {},
        "host lb1: setting `nginx_listen_prot`", "is not a vllm-fleet setting", "did you mean `nginx_listen_port`?"),
    "3 a load balancer's port out of range": (
        lambda d: [("h1", d())], [("lb1", {"nginx_listen_port": 70000})], {},
        "host lb1: `nginx_listen_port`", "70000 is outside the allowed range (from 1 to 65535)", "from 1 to 65535"),
    "3 a host of another group": (
        lambda d: [("h1", d())], ["h1"], {"monitoring": [("mon1", {"vllm_max_modle_len": 1})]},
        "host mon1: setting `vllm_max_modle_len`", "is not a vllm-fleet setting", "`vllm_max_model_len`"),
    "4 a flag a setting owns": (
        lambda d: [("h1", d(vllm_extra_args=["--max-model-len=99999"]))], ["h1"], {},
        "host h1: instance a: `vllm_extra_args`", "'--max-model-len=99999' sets --max-model-len",
        "set `vllm_max_model_len` instead"),
    "4 an API key on the command line": (
        lambda d: [("h1", d(vllm_extra_args=["--api-key", "s3cret"]))], ["h1"], {},
        "`vllm_extra_args`", "'--api-key' puts a secret on the command line",
        "every instance already requires the fleet's internal key"),
    "4 two hosts on one address": (
        lambda d: two_hosts(d, ssh_hostname="10.9.0.11"), ["h1"], {},
        "host h2: `vllm_advertise_address`", "'10.9.0.11' (from ssh_hostname) is also host h1's address",
        "give every host its own address"),
    "4 loopback instances behind another host": (
        lambda d: [("h1", d(vllm_listen_address="127.0.0.1"))], [("lb1", {"ssh_hostname": "10.9.0.2"})], {},
        "host h1: `vllm_listen_address`", "'127.0.0.1' is a loopback address, but the load balancer lb1",
        "leave vllm_listen_address unset (it follows vllm_advertise_address)"),
    "4 a malformed model id": (
        lambda d: [("h1", d(vllm_model_path=None, vllm_model_id="acme/../chat", vllm_model_revision="0" * 40))],
        ["h1"], {}, "host h1: `vllm_model_id`", "'acme/../chat' is not a Hugging Face repository id",
        "e.g. 'meta-llama/Llama-3.3-70B-Instruct'"),
    "5 a path with a command in it": (
        lambda d: [("h1", d(vllm_install_dir="/opt/$(touch /tmp/pwned)"))], ["h1"], {},
        "host h1: `vllm_install_dir`", "'/opt/$(touch /tmp/pwned)' is not an absolute path of letters",
        "e.g. '/opt/vllm-fleet'"),
    "5 a user name with a space": (
        lambda d: [("h1", d(vllm_user="vllm svc"))], ["h1"], {},
        "host h1: `vllm_user`", "'vllm svc' is not a POSIX user name", "e.g. 'vllm'"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_plan_cli_refuses_each_class_with_field_value_and_fix(host_data, tmp_path, case):
    vllm, lb, groups, field, problem, fix = CLI_CASES[case]
    result = plan_cli(tmp_path, vllm(host_data), lb, **groups)
    err = result.stderr
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert lines[0].startswith("refused: ") and field in lines[0], err
    assert lines[1].startswith("  problem: ") and problem in lines[1], err
    assert lines[2].startswith("  fix: ") and fix in lines[2], err


def test_pyinfra_refuses_a_load_balancers_misspelt_setting_before_any_operation(host_data, tmp_path):
    inventory = tmp_path / "inventory.py"
    inventory.write_text(textwrap.dedent(f"""
        vllm = [("@fake/h1", {{**{host_data()!r}, "fake_delay": 0}})]
        lb = [("@fake/lb1", {{"nginx_read_timout": 60}})]
    """))
    result = subprocess.run([str(PYINFRA), "-y", str(inventory), "deploys/vllm.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYINFRA_FAKE_DELAY": "0"})
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in out, out
    assert "host @fake/lb1: setting `nginx_read_timout`" in out and "did you mean `nginx_read_timeout`?" in out, out
    assert "Starting operation" not in out and "Success" not in out, out
