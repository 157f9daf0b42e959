"""The nspawn lab's pure parts: mirrors, addresses, route collisions, its description (fast, no root)."""

import ipaddress

import pytest

from roles.errors import LabError
from roles.lab import config as lab
from roles.lab.hosts import ssh_command

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
    with pytest.raises(LabError):
        lab.host_address(0)
    with pytest.raises(LabError):
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
    argv = ssh_command("lab1", state)
    assert argv[0] == "ssh" and argv[-1] == "root@10.213.7.11" and "BatchMode=yes" in argv
    with pytest.raises(LabError, match="no lab host named 'lab9'"):
        ssh_command("lab9", state)


def test_load_state_when_down(monkeypatch, tmp_path):
    monkeypatch.setattr(lab, "STATE_DIR", tmp_path)
    with pytest.raises(LabError, match="lab is not up: run `vllm-fleet lab up`"):
        lab.load_state()
