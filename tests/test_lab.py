"""Tests of the nspawn lab: its pure parts (fast, no root) and, marked `lab`, the running lab."""

import ipaddress
import subprocess

import pytest

from roles import lab

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_first_uri():
    assert lab.mirror_from_deb822(DEB822) == "http://deb.debian.org/debian"


def test_deb822_skips_disabled_and_source_only_stanzas():
    text = (
        "Types: deb\nEnabled: no\nURIs: http://disabled.example/debian\nSuites: bookworm\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb-src deb\nURIs:\n http://mirror.example/debian\n http://other.example/debian\n"
        "Suites: bookworm\n"
    )
    assert lab.mirror_from_deb822(text) == "http://mirror.example/debian"


def test_deb822_without_deb_stanza():
    assert lab.mirror_from_deb822("Types: deb-src\nURIs: http://x.example/debian\n") is None


def test_one_line_first_deb():
    text = (
        "# comment\n"
        "deb-src http://src.example/debian bookworm main\n"
        "#deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian bookworm main\n"
        "deb http://second.example/debian bookworm main\n"
    )
    assert lab.mirror_from_one_line(text) == "http://mirror.example/debian"


def test_one_line_without_deb():
    assert lab.mirror_from_one_line("# nothing here\n\n") is None


def test_addresses():
    assert lab.bridge_address() == "10.213.7.1"
    assert [lab.host_address(i) for i in (1, 2, 3)] == ["10.213.7.11", "10.213.7.12", "10.213.7.13"]
    with pytest.raises(lab.LabError):
        lab.host_address(0)
    with pytest.raises(lab.LabError):
        lab.host_address(245)  # 10 + 245 = .255, the broadcast address


def test_no_collision_with_this_machines_routes():
    routes = [
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
        {"dst": "192.0.2.0/24", "dev": "eth0"},
        {"dst": "10.213.7.0/24", "dev": lab.BRIDGE},  # the lab's own bridge
    ]
    assert lab.colliding_routes(routes) == []


def test_collisions_found():
    routes = [{"dst": "10.0.0.0/8", "dev": "tun0"}, {"dst": "10.213.7.128/25", "dev": "eth1"},
              {"dst": "10.213.8.0/24", "dev": "eth2"}]
    assert lab.colliding_routes(routes) == ["10.0.0.0/8 dev tun0", "10.213.7.128/25 dev eth1"]
    assert lab.colliding_routes(routes, subnet=ipaddress.ip_network("172.31.0.0/24")) == []


def test_lab_document(tmp_path):
    key = tmp_path / "id_ed25519"
    doc = lab.lab_document(2, key)
    assert doc == {
        "hosts": [{"name": "lab1", "address": "10.213.7.11"}, {"name": "lab2", "address": "10.213.7.12"}],
        "ssh_user": "root",
        "ssh_key": str(key),
        "control_address": "10.213.7.1",
        "apt_proxy": "http://10.213.7.1:3142",
    }


def test_ssh_command_and_missing_host(tmp_path):
    state = lab.lab_document(1, tmp_path / "k")
    argv = lab.ssh_command("lab1", state)
    assert argv[0] == "ssh" and argv[-1] == "root@10.213.7.11" and "BatchMode=yes" in argv
    with pytest.raises(lab.LabError, match="no lab host named 'lab9'"):
        lab.ssh_command("lab9", state)


def test_load_state_when_down(monkeypatch, tmp_path):
    monkeypatch.setattr(lab, "STATE_DIR", tmp_path)
    with pytest.raises(lab.LabError, match="lab is not up: run `python -m roles.lab up`"):
        lab.load_state()


# ---------------------------------------------------------------- against the running lab

def lab_state() -> dict:
    if not (lab.STATE_DIR / "lab.json").exists():
        pytest.skip(f"lab is not up ({lab.STATE_DIR / 'lab.json'} absent): run `python -m roles.lab up`")
    return lab.load_state()


def on_host(state: dict, name: str, command: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(lab.ssh_command(name, state) + [command], capture_output=True,
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
