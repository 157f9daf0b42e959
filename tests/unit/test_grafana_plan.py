"""Grafana's plan (roles/plan/grafana.py), its settings and what the host firewall opens for it: a
``grafana`` host must be a monitor host with Grafana's repository and a pinned version, listens on
loopback unless the inventory names who may reach it, and every refusal comes before any host is
touched, naming the host, the setting, the value and the fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from roles import firewall
from roles.errors import FleetConfigError
from roles.paths import REPO_ROOT
from roles.plan import setting_checks, settings
from roles.plan.fleet import plan_fleet, with_edge_and_firewalls
from tests.deploy.fakehost import session_secrets_dir

MIRROR = "https://mirror.example.internal/grafana"
LB = ("lb1", {"ssh_hostname": "10.9.0.2"})
GRAFANA = {"grafana_repo_url": MIRROR, "grafana_version": "12.1.1"}


class Fleet:
    """h1 (vLLM, instances a and b), the load balancer lb1 and mon1: in the ``monitor`` and
    ``grafana`` groups unless told otherwise, with ``mon1`` as its data."""

    def __init__(self, host_data, mon1=None, monitors=("mon1",), grafanas=("mon1",)):
        self.vllm = [("h1", host_data())]
        self.lb = (LB[0], {"nginx_secrets_dir": str(session_secrets_dir()), **LB[1]})
        self.mon1 = ("mon1", {"ssh_hostname": "10.9.0.50", **(GRAFANA if mon1 is None else mon1)})
        self.monitors, self.grafanas = monitors, grafanas

    def plan(self):
        everyone = list(dict([*self.vllm, self.lb, self.mon1]).items())  # a load balancer may be a vLLM host
        for name, data in everyone:  # as plan_inventory does, for every host whatever its groups
            setting_checks.check_host_data(name, data)
        return with_edge_and_firewalls(plan_fleet(self.vllm, [self.lb[0]]), [self.lb], everyone, Path.cwd(),
                                       self.monitors, self.grafanas)


def refusal(fleet: Fleet) -> FleetConfigError:
    with pytest.raises(FleetConfigError) as refused:
        fleet.plan()
    return refused.value


def rules(fw) -> list[str]:
    return [line.strip() for line in firewall.render_rules(fw).splitlines()
            if line.strip() and not line.strip().startswith("#")]


# ---- who gets Grafana ----------------------------------------------------------------------------------

def test_the_grafana_group_gets_grafana_and_nothing_else_does(host_data):
    assert Fleet(host_data).plan().grafana.hosts == ("mon1",)
    assert Fleet(host_data, grafanas=()).plan().grafana is None
    # Without a grafana group, Grafana's settings change nothing and refuse nothing.
    assert Fleet(host_data, mon1={}, grafanas=()).plan().grafana is None


def test_a_grafana_host_that_is_no_monitor_host_is_refused(host_data):
    error = refusal(Fleet(host_data, monitors=("h1",)))
    assert error.field == "host mon1: inventory group `grafana`"
    assert "not in the `monitor` group" in error.problem and "127.0.0.1:9090" in error.problem
    assert "put mon1 in the `monitor` group" in error.fix
    # No monitor group at all: the same refusal, not a Grafana without Prometheus.
    assert refusal(Fleet(host_data, monitors=())).field == "host mon1: inventory group `grafana`"


def test_a_grafana_host_without_grafanas_repository_is_refused(host_data):
    error = refusal(Fleet(host_data, mon1={"grafana_version": "12.1.1"}))
    assert error.field == "host mon1: `grafana_repo_url`" and "is not set" in error.problem
    assert "https://mirror.example.internal/grafana" in error.fix and "`grafana` group" in error.fix


def test_a_grafana_host_without_a_pinned_version_is_refused(host_data):
    error = refusal(Fleet(host_data, mon1={"grafana_repo_url": MIRROR}))
    assert error.field == "host mon1: `grafana_version`"
    assert "migrates its database one way" in error.problem and "apt-cache policy grafana" in error.fix


@pytest.mark.parametrize("setting, value, form", [
    ("grafana_repo_url", "http://mirror.example.internal/grafana", "an https URL"),
    ("grafana_repo_url", "https://mirror.example.internal/gra fana", "an https URL"),
    ("grafana_repo_url", "mirror.example.internal/grafana", "an https URL"),
    ("grafana_version", "latest", "a Debian package version"),
    ("grafana_version", "1:12.1.1", "a Debian package version"),
    ("grafana_repo_key_fingerprint", "b53ae77badb630a683046005963fa27710458545", "a key fingerprint"),
    ("grafana_repo_key", "../gpg.key", "a file name"),
    ("grafana_repo_suite", "stable main", "an apt suite name"),
    ("grafana_listen_address", "grafana.internal", "an IP address"),
    ("grafana_admin_user", "admin;x", "1 to 64 letters"),
])
def test_values_out_of_form_are_refused_naming_host_setting_and_value(host_data, setting, value, form):
    error = refusal(Fleet(host_data, mon1={**GRAFANA, setting: value}))
    assert error.field == f"host mon1: `{setting}`"
    assert error.problem == f"{value!r} is not {settings.BY_NAME[setting].form.what}." and form in error.problem
    assert f"write `{setting}` in that form" in error.fix


def test_a_privileged_port_is_refused(host_data):
    error = refusal(Fleet(host_data, mon1={**GRAFANA, "grafana_port": 80}))
    assert error.field == "host mon1: `grafana_port`" and "from 1024 to 65535" in error.problem


@pytest.mark.parametrize("port, owner", [(9090, "Prometheus"), (9093, "Alertmanager"), (9100, "the node exporter")])
def test_a_port_another_service_of_the_monitor_host_listens_on_is_refused(host_data, port, owner):
    error = refusal(Fleet(host_data, mon1={**GRAFANA, "grafana_port": port}))
    assert error.field == "host mon1: `grafana_port`"
    assert error.problem == f"is {port}, where {owner} listens on this host." and "3000" in error.fix


def test_a_port_of_an_instance_or_of_nginx_on_the_same_host_is_refused(host_data):
    fleet = Fleet(host_data, monitors=("h1",), grafanas=("h1",))
    fleet.vllm = [("h1", host_data(**GRAFANA, grafana_port=8002))]
    assert refusal(fleet).problem == "is 8002, where instance b listens on this host."
    for port, owner in ((8081, "nginx's stub_status"), (3443, "nginx (nginx_listen_port)")):
        data = host_data(**GRAFANA, grafana_port=port, nginx_listen_port=3443,
                         nginx_secrets_dir=str(session_secrets_dir()))
        fleet.vllm, fleet.lb = [("h1", data)], ("h1", data)
        assert refusal(fleet).problem == f"is {port}, where {owner} listens on this host."


# ---- the settings table ----------------------------------------------------------------------------------

def test_grafanas_settings_are_validated_and_secure_by_default():
    assert "grafana_" in settings.ROLE_PREFIXES
    defaults = {name: settings.BY_NAME[name].default for name in (
        "grafana_repo_url", "grafana_version", "grafana_listen_address", "grafana_port", "grafana_allow_from",
        "grafana_repo_key", "grafana_repo_key_fingerprint", "grafana_repo_suite", "grafana_admin_user")}
    assert defaults == {"grafana_repo_url": None, "grafana_version": None, "grafana_listen_address": "127.0.0.1",
                        "grafana_port": 3000, "grafana_allow_from": [], "grafana_repo_key": "gpg-full.key",
                        "grafana_repo_key_fingerprint": "B53AE77BADB630A683046005963FA27710458545",
                        "grafana_repo_suite": "stable", "grafana_admin_user": "admin"}
    for name in defaults:
        setting = settings.BY_NAME[name]
        assert setting.default is None or setting.form is None or all(
            setting.form.test(str(v)) for v in (setting.default if isinstance(setting.default, list)
                                                else [setting.default])), name


def test_a_misspelt_grafana_setting_is_refused_on_any_host(host_data):
    with pytest.raises(FleetConfigError) as refused:
        setting_checks.check_host_data("lb1", {"grafana_repo_ulr": MIRROR})
    assert refused.value.field == "host lb1: setting `grafana_repo_ulr`" and "grafana_repo_url" in refused.value.fix


def test_no_public_grafana_host_is_named_in_code_templates_or_docs():
    """The operator's mirror is the only place Grafana comes from: no setting, default, template,
    doc or example names Grafana's public hosts."""
    public = re.compile(r"\b(grafana\.(com|net|org)|raintank\.io)\b", re.IGNORECASE)
    found = [f"{path.relative_to(REPO_ROOT)}:{number}"
             for folder in ("roles", "templates", "dashboards", "inventories", "deploys")
             for path in sorted((REPO_ROOT / folder).rglob("*")) if path.is_file() and path.suffix != ".pyc"
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if public.search(line)]
    found += [f"README.md:{n}" for n, line in enumerate((REPO_ROOT / "README.md").read_text().splitlines(), 1)
              if public.search(line)]
    found += [s.name for s in settings.SETTINGS if public.search(f"{s.default} {s.doc}")]
    assert found == []


# ---- the firewall ------------------------------------------------------------------------------------------

def test_on_loopback_nothing_opens_for_grafana(host_data):
    fw = Fleet(host_data).plan().firewall("mon1")
    assert fw.grafana_port is None and fw.grafana_sources == ()
    assert 3000 not in fw.open_tcp and not [r for r in rules(fw) if "3000" in r or "Grafana" in r]


def test_off_loopback_grafana_answers_the_allowed_sources_only(host_data):
    fleet = Fleet(host_data, mon1={**GRAFANA, "grafana_listen_address": "10.9.0.50",
                                   "grafana_allow_from": ["10.20.0.0/24", "10.9.0.7", "2001:DB8:1::/48"]})
    plan = fleet.plan()
    fw = plan.firewall("mon1")
    assert fw.grafana_port == 3000 and fw.grafana_sources == ("10.20.0.0/24", "10.9.0.7/32", "2001:db8:1::/48")
    assert 3000 not in fw.open_tcp
    assert [r for r in rules(fw) if "3000" in r] == [
        'ip saddr { 10.20.0.0/24, 10.9.0.7/32 } tcp dport 3000 accept comment "Grafana: grafana_allow_from only '
        '(IPv4)"',
        'ip6 saddr { 2001:db8:1::/48 } tcp dport 3000 accept comment "Grafana: grafana_allow_from only (IPv6)"']
    # Only the Grafana host opens it.
    assert all(plan.firewall(name).grafana_port is None for name in ("h1", "lb1"))


def test_off_loopback_without_allowed_sources_is_refused(host_data):
    for address in ("10.9.0.50", "0.0.0.0", "::"):
        error = refusal(Fleet(host_data, mon1={**GRAFANA, "grafana_listen_address": address}))
        assert error.field == "host mon1: `grafana_listen_address`"
        assert f"is {address}, off loopback, but grafana_allow_from is empty" in error.problem
        assert "ssh -L" in error.fix


def test_off_loopback_without_the_firewall_is_refused(host_data):
    error = refusal(Fleet(host_data, mon1={**GRAFANA, "grafana_listen_address": "10.9.0.50",
                                           "grafana_allow_from": ["10.20.0.0/24"], "firewall_enabled": False}))
    assert error.field == "host mon1: `grafana_listen_address`" and "firewall_enabled is false" in error.problem


def test_allowed_sources_with_a_loopback_grafana_are_refused(host_data):
    error = refusal(Fleet(host_data, mon1={**GRAFANA, "grafana_allow_from": ["10.20.0.0/24"]}))
    assert error.field == "host mon1: `grafana_allow_from`" and "listens on loopback (127.0.0.1)" in error.problem


@pytest.mark.parametrize("source", ["10.20.0.1/24", "bastion.internal", "fe80::1%eth0", "10.20.0.0/33"])
def test_allowed_sources_are_addresses_or_networks(host_data, source):
    error = refusal(Fleet(host_data, mon1={**GRAFANA, "grafana_listen_address": "10.9.0.50",
                                           "grafana_allow_from": [source]}))
    assert error.field == "host mon1: `grafana_allow_from`[0]" and repr(source) in error.problem


def test_nft_accepts_grafanas_rules(host_data, tmp_path):
    if os.geteuid() != 0 or not (shutil.which("nft") and shutil.which("unshare")):
        pytest.skip("needs root, nft and unshare: nft -c checks the rules in a throwaway network namespace")
    fw = Fleet(host_data, mon1={**GRAFANA, "grafana_listen_address": "::", "grafana_port": 3001,
                                "grafana_allow_from": ["10.20.0.0/24", "2001:db8:1::/48"]}).plan().firewall("mon1")
    path = tmp_path / "mon1.nft"
    path.write_text(firewall.render_rules(fw))
    result = subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
