"""The host firewall of an instance group's hosts (one vLLM instance over several hosts): the
group's ports (the leader's rendezvous and API port, every host's ephemeral range) open to the
group's other hosts only, in the plan, in the rendered rules, in the role (the host's own range
read at deploy time) and, where this machine allows it, for real packets in network namespaces.
The helpers are tests/unit/test_firewall.py's."""

from __future__ import annotations

import json

import pytest

from roles import firewall, paths
from roles.errors import FleetConfigError
from roles.facts import LocalPortRange
from roles.plan.firewall import for_fleet, peer_addresses
from roles.plan.fleet import plan_fleet
from tests.deploy.simhost import SimulatedHost, debian
from tests.unit.test_firewall import IPV6, LB, _host_and_peer, _kernel_or_skip, _rules_file, firewall_run, lines_of

GROUP = [{"name": "tiny", "hosts": ["lab1", "lab2", "lab3"], "port": 8001, "master_port": 29511}]
GROUP_ADDRESSES = {"lab1": "10.9.0.11", "lab2": "10.9.0.12", "lab3": "2001:db8::13"}


# ---- the plan ------------------------------------------------------------------------------------

@pytest.fixture
def group_fleet(host_data, model_dir):
    """``make(addresses, **data_by_host)``: a fleet of one CPU instance over the three hosts of
    ``GROUP`` (lab1 leads; the tiny model given three layers, one per stage) at ``addresses``
    (``GROUP_ADDRESSES``), and solo, a host of two instances of its own; with each host's data."""
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))

    def make(addresses: dict[str, str] = GROUP_ADDRESSES, **data_by_host):
        data = {name: host_data(vllm_instances=None, vllm_instance_groups=GROUP, ssh_hostname=address,
                                **data_by_host.get(name, {})) for name, address in addresses.items()}
        data["solo"] = host_data(ssh_hostname="10.9.0.20")
        return plan_fleet(data.items(), ["lb1"]), data
    return make


def test_group_leader_opens_its_rendezvous_api_port_and_ephemeral_range_to_the_group_only(group_fleet):
    fleet, data = group_fleet()
    fw = for_fleet(fleet, "lab1", data["lab1"], LB)
    # Its API port serves the load balancers as any instance's does...
    assert fw.instance_ports == (8001,) and fw.sources_v4 == ("10.9.0.2",)
    # ...and, with the rendezvous and the ephemeral range, the group's other hosts.
    assert fw.group == "tiny" and fw.group_ports == ("8001", "29511", "32768-60999")
    assert fw.group_sources_v4 == ("10.9.0.12",) and fw.group_sources_v6 == ("2001:db8::13",)
    assert [(s.host, s.role) for s in fw.group_sources] == [("lab2", "instance group member"),
                                                            ("lab3", "instance group member")]


def test_group_follower_opens_the_ephemeral_range_to_the_other_hosts_and_not_its_port(group_fleet):
    fleet, data = group_fleet()
    for follower, v4, v6 in (("lab2", ("10.9.0.11",), ("2001:db8::13",)), ("lab3", ("10.9.0.11", "10.9.0.12"), ())):
        fw = for_fleet(fleet, follower, data[follower], LB)
        # A follower runs workers only: nothing listens on the group's port there.
        assert fw.instance_ports == () and fw.sources == ()
        assert fw.group_ports == ("32768-60999",) and fw.group_master_port is None and fw.group_api_port is None
        assert (fw.group_sources_v4, fw.group_sources_v6) == (v4, v6)


def test_host_without_a_group_opens_nothing_for_one(group_fleet):
    fleet, data = group_fleet()
    for name, host_data in (("solo", data["solo"]), ("lb1", {"ssh_hostname": "10.9.0.2"})):
        fw = for_fleet(fleet, name, host_data, LB)
        assert fw.group is None and fw.group_ports == () and fw.group_sources == ()
        assert fw.with_local_port_range(40000, 50000) == fw
        assert "instance group" not in firewall.render_rules(fw)
    assert for_fleet(fleet, "solo", data["solo"], LB).instance_ports == (8001, 8002)


def test_group_host_known_by_a_name_is_refused_where_a_firewall_needs_it(group_fleet):
    fleet, data = group_fleet({**GROUP_ADDRESSES, "lab2": "lab2.internal"})
    with pytest.raises(FleetConfigError) as refused:
        for_fleet(fleet, "lab1", data["lab1"], LB)
    error = refused.value
    assert error.field == "host lab2: `vllm_advertise_address`"
    assert "'lab2.internal' (from ssh_hostname), a name, not an IP address: the firewall of host lab1" in error.problem
    assert "the ports of instance group tiny" in error.problem and "nft resolves a name only once" in error.problem
    assert error.fix.startswith("set vllm_advertise_address to lab2's IP address (IPv4 or IPv6) on the instance "
                                "group member host lab2: the address its connections to lab1 come from.")
    # lab2's own firewall needs the others' addresses only; lab1's none without a firewall.
    assert for_fleet(fleet, "lab2", data["lab2"], LB).group_sources_v4 == ("10.9.0.11",)
    assert for_fleet(fleet, "lab1", {**data["lab1"], "firewall_enabled": False}, LB) is None


def test_rendezvous_open_to_everyone_is_refused_on_the_leader(group_fleet):
    fleet, data = group_fleet()
    with pytest.raises(FleetConfigError) as refused:
        for_fleet(fleet, "lab1", {**data["lab1"], "firewall_allow_tcp": [29511]}, LB)
    assert refused.value.field == "host lab1: `firewall_allow_tcp`"
    assert "the rendezvous (master_port) of instance group tiny" in refused.value.problem
    # A follower listens on neither the rendezvous nor the group's port: its operator may open them.
    assert for_fleet(fleet, "lab2", {**data["lab2"], "firewall_allow_tcp": [29511, 8001]}, LB).open_tcp == (8001, 29511)


def test_the_hosts_own_ephemeral_range_replaces_the_linux_default(group_fleet):
    fleet, data = group_fleet()
    fw = for_fleet(fleet, "lab1", data["lab1"], LB)
    assert fw.group_port_range == (32768, 60999)
    assert fw.with_local_port_range(40000, 50000).group_ports == ("8001", "29511", "40000-50000")
    # A port inside the range is in it already: an nft set takes no overlapping items.
    assert fw.with_local_port_range(20000, 30000).group_ports == ("8001", "20000-30000")



# ---- the rendered rules -----------------------------------------------------------------------------

def test_group_rules_let_the_group_hosts_in_to_the_group_ports_only(group_fleet):
    fleet, data = group_fleet()
    text = firewall.render_rules(for_fleet(fleet, "lab1", data["lab1"], LB))
    rules = lines_of(text)
    group_rules = [r for r in rules if "29511" in r or "32768" in r]
    assert group_rules == [
        ('ip saddr { 10.9.0.12 } tcp dport { 8001, 29511, 32768-60999 } accept '
         'comment "instance group tiny: its hosts only (IPv4)"'),
        ('ip6 saddr { 2001:db8::13 } tcp dport { 8001, 29511, 32768-60999 } accept '
         'comment "instance group tiny: its hosts only (IPv6)"')]
    ssh = rules.index('tcp dport { 22 } accept comment "SSH: before anything that could drop"')
    assert ssh < rules.index(group_rules[0]) < rules.index('counter comment "dropped by the policy"')
    # The comment says what each port is for, and who is let in.
    assert "#   29511: the rendezvous (torch's TCPStore, master_port), which the followers join;" in text
    assert "#   8001: the leader's API port, whose /health the followers' watchdog polls;" in text
    assert "#   32768-60999: the kernel's ephemeral ports (net.ipv4.ip_local_port_range," in text
    assert "#   10.9.0.12: lab2 (instance group member)" in text
    assert "#   2001:db8::13: lab3 (instance group member)" in text

    follower = firewall.render_rules(for_fleet(fleet, "lab3", data["lab3"], LB))
    assert [r for r in lines_of(follower) if "instance group" in r or "8001" in r] == [
        ('ip saddr { 10.9.0.11, 10.9.0.12 } tcp dport { 32768-60999 } accept '
         'comment "instance group tiny: its hosts only (IPv4)"')]
    assert "rendezvous" not in follower and "API port" not in follower



# ---- the role, against a simulated host ------------------------------------------------------------

class HostWithPortRange(SimulatedHost):
    """A simulated host whose kernel picks ephemeral ports from ``local_ports`` (what
    /proc/sys/net/ipv4/ip_local_port_range holds; empty: unreadable)."""

    def __init__(self, distro: dict, local_ports: str):
        super().__init__(distro)
        self.local_ports = local_ports

    def outputs(self):
        return {**super().outputs(), LocalPortRange: lambda: [self.local_ports] if self.local_ports else []}


@pytest.mark.parametrize("local_ports, opened", [("40000\t50000", "40000-50000"), ("", "32768-60999")])
def test_deploy_opens_the_hosts_own_ephemeral_range_to_its_group(group_fleet, local_ports, opened):
    fleet, data = group_fleet()
    sim = HostWithPortRange(debian(12), local_ports)
    firewall_run(for_fleet(fleet, "lab2", data["lab2"], LB), sim)
    rules = [line.strip() for line in sim.files[paths.FIREWALL_RULES]["lines"]]
    # Read from the host where it can be; the Linux default where it cannot.
    assert f'ip saddr {{ 10.9.0.11 }} tcp dport {{ {opened} }} accept comment "instance group tiny: its hosts only ' \
           '(IPv4)"' in rules
    assert f"#   {opened}: the kernel's ephemeral ports (net.ipv4.ip_local_port_range," in rules



# ---- the kernel: throwaway network namespaces -------------------------------------------------------

def test_packets_from_the_group_reach_its_ports_and_others_do_not(tmp_path, group_fleet):
    """The leader at 192.0.2.1, its followers at 192.0.2.2 and 2001:db8::2, the load balancer at
    192.0.2.9; 192.0.2.3 and 2001:db8::3 are none of them. The host's ephemeral range is 40000-40100."""
    _kernel_or_skip()
    lab2, lab3, lb, other4, other6 = "192.0.2.2", "2001:db8::2", "192.0.2.9", "192.0.2.3", "2001:db8::3"
    fleet, data = group_fleet({"lab1": "192.0.2.1", "lab2": lab2, "lab3": lab3})
    fw = for_fleet(fleet, "lab1", data["lab1"], peer_addresses([("lb1", {"ssh_hostname": lb})]))
    rules = _rules_file(tmp_path, fw.with_local_port_range(40000, 40100))
    # 8001: the API port, 29511: the rendezvous, 40050: in the host's range, 50000: in Linux's default only.
    with _host_and_peer(rules, [lab2, lb, other4, lab3, other6], [8001, 29511, 40050, 50000]) as (connect, _):
        cases = [(source, "192.0.2.1", port) for source in (lab2, lb, other4) for port in (8001, 29511, 40050, 50000)]
        if IPV6:
            cases += [(source, "2001:db8::1", port) for source in (lab3, other6) for port in (29511, 40050)]
        expected = {f"{lab2}>8001": "open", f"{lab2}>29511": "open", f"{lab2}>40050": "open",
                    f"{lab2}>50000": "dropped", f"{lb}>8001": "open", f"{lb}>29511": "dropped",
                    f"{lb}>40050": "dropped", f"{lb}>50000": "dropped", f"{other4}>8001": "dropped",
                    f"{other4}>29511": "dropped", f"{other4}>40050": "dropped", f"{other4}>50000": "dropped"}
        if IPV6:
            expected |= {f"{lab3}>29511": "open", f"{lab3}>40050": "open", f"{other6}>29511": "dropped",
                         f"{other6}>40050": "dropped"}
        assert connect(cases) == expected
