"""The running lab's hosts: real systemd with their own identity, and apt through the lab's proxy."""

import subprocess
import sys
from pathlib import Path

import pytest

from roles.lab.config import STATE_DIR, load_state
from roles.lab.hosts import ssh_command

REPO = Path(__file__).resolve().parents[2]


def lab_state() -> dict:
    if not (STATE_DIR / "lab.json").exists():
        pytest.skip(f"lab is not up ({STATE_DIR / 'lab.json'} absent): run `vllm-fleet lab up`")
    return load_state()


def on_host(state: dict, name: str, command: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ssh_command(name, state) + [command], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.lab
def test_hosts_run_systemd_with_own_identity():
    state = lab_state()
    for host in state["hosts"]:
        result = on_host(state, host["name"],
                         "systemctl is-system-running; systemctl --failed --no-legend --plain; "
                         "hostname; ip -4 -o addr show dev eth0")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] in ("running", "degraded"), result.stdout
        failed = [line for line in lines[1:-2] if line.strip()]
        assert failed == [], f"{host['name']}: failed units {failed}"
        assert lines[-2] == host["name"]
        assert f" {host['address']}/" in lines[-1]


@pytest.mark.lab
def test_hosts_reach_apt_proxy():
    state = lab_state()
    for host in state["hosts"]:
        result = on_host(state, host["name"], "apt-get update -q")
        assert result.returncode == 0, f"{host['name']}: {result.stdout}{result.stderr}"


@pytest.mark.lab
def test_lab_inventory_plans():
    """The one inventory that needs the running lab (its addresses and key): planned here."""
    lab_state()
    result = subprocess.run([str(Path(sys.executable).with_name("vllm-fleet")), "plan", "inventories/lab.py"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()[2:5]] == [["lab1", "a"], ["lab1", "b"], ["lab2", "a"]]
