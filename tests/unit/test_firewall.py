"""The host firewall: what it opens to whom (roles.plan.firewall), the nftables table it renders,
the role's operations against simulated hosts, and, where this machine allows it (root, nft), the
rules loaded by the kernel in throwaway network namespaces: `nft -c` accepts them, loading is
idempotent, and real packets are let in or dropped as planned."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from roles import firewall, paths
from roles.errors import FleetConfigError
from roles.plan.firewall import TABLE, PeerAddress, for_fleet, peer_addresses, plan_firewall
from roles.plan.fleet import plan_fleet
from tests.deploy.fakehost import changed, plan
from tests.deploy.simhost import SimulatedHost, debian, ubuntu

LB = peer_addresses([("lb1", {"ssh_hostname": "10.9.0.2"})])


def lines_of(text: str) -> list[str]:
    """The rendered rules without comments and blank lines."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


# ---- the plan ------------------------------------------------------------------------------------

def test_load_balancer_opens_its_edge_ports_to_everyone():
    fw = plan_firewall("lb1", {"nginx_http_redirect_port": 80}, is_lb=True)
    assert fw.ssh_ports == (22,)
    assert fw.open_tcp == (80, 443)
    assert fw.instance_ports == () and fw.sources == ()


def test_instance_host_opens_instance_ports_to_the_load_balancers_only():
    fw = plan_firewall("h1", {"nginx_http_redirect_port": 80}, is_lb=False, instance_ports=[8002, 8001],
                       lb_addresses=LB)
    # Not a load balancer: nginx's ports stay closed here, whatever its data says.
    assert fw.open_tcp == ()
    assert fw.instance_ports == (8001, 8002)
    assert fw.sources_v4 == ("10.9.0.2",) and fw.sources_v6 == ()
    assert fw.sources[0].host == "lb1" and fw.sources[0].role == "load balancer"


def test_ipv6_load_balancer_is_allowed_by_its_ipv6_address():
    lbs = peer_addresses([("lb6", {"vllm_advertise_address": "2001:DB8:0:0::2"}),
                          ("lb4", {"vllm_advertise_address": "::ffff:10.9.0.3"})])
    fw = plan_firewall("h1", {}, is_lb=False, instance_ports=[8001], lb_addresses=lbs)
    assert fw.sources_v6 == ("2001:db8::2",)
    # An IPv4-mapped address is an IPv4 connection: the inet table sees it as IPv4.
    assert fw.sources_v4 == ("10.9.0.3",)


def test_load_balancer_known_by_a_name_is_refused_where_a_firewall_needs_it():
    lbs = peer_addresses([("lb-01.internal", {"ssh_user": "deploy"})])
    with pytest.raises(FleetConfigError) as refused:
        plan_firewall("gpu-01", {}, is_lb=False, instance_ports=[8001], lb_addresses=lbs)
    error = refused.value
    assert error.field == "host lb-01.internal: `vllm_advertise_address`"
    assert "'lb-01.internal' (from the host name)" in error.problem and "nft resolves a name only once" in error.problem
    assert "set vllm_advertise_address to lb-01.internal's IP address" in error.fix
    # A host without instances, or without a firewall, needs no load balancer address.
    assert plan_firewall("lb-01.internal", {}, is_lb=True, lb_addresses=lbs).sources == ()
    assert plan_firewall("gpu-01", {"firewall_enabled": False}, is_lb=False, instance_ports=[8001],
                         lb_addresses=lbs) is None


def test_disabled_firewall_has_no_plan():
    assert plan_firewall("h1", {"firewall_enabled": False}, is_lb=True, instance_ports=[8001], lb_addresses=LB) is None
    assert plan_firewall("h1", {"firewall_enabled": True}, is_lb=True) is not None


def test_allow_tcp_and_ssh_port():
    fw = plan_firewall("h1", {"firewall_allow_tcp": [9100, 22, 9100], "ssh_port": "2222"}, is_lb=False)
    assert fw.ssh_ports == (2222,) and fw.open_tcp == (22, 9100)
    # The ports the host's sshd serves join the SSH rule, and leave the open-to-everyone one.
    assert fw.with_ssh_ports([22]).ssh_ports == (22, 2222) and fw.with_ssh_ports([22]).open_tcp == (9100,)
    for bad in ("ssh", 0, 70000, True):
        with pytest.raises(FleetConfigError, match="host h1: `ssh_port`"):
            plan_firewall("h1", {"ssh_port": bad}, is_lb=False)
    # What reaches the rules file is a number, even from data the settings table has not checked.
    with pytest.raises(FleetConfigError, match="host h1: `firewall_allow_tcp`.*'80; flush ruleset' is not a TCP port"):
        plan_firewall("h1", {"firewall_allow_tcp": ["80; flush ruleset"]}, is_lb=False)


def test_host_names_reach_the_rules_in_comments_only():
    fw = plan_firewall("h1\ntcp dport 1-65535 accept", {}, is_lb=False, instance_ports=[8001],
                       lb_addresses=peer_addresses([("lb1\nflush ruleset", {"ssh_hostname": "10.9.0.2"})]))
    rules = lines_of(firewall.render_rules(fw))
    assert not [r for r in rules if "1-65535" in r or "flush" in r]


@pytest.mark.parametrize("data, setting", [
    ({"firewall_allow_tcp": [8001]}, "firewall_allow_tcp"),
    ({"nginx_http_redirect_port": 8001}, "nginx_http_redirect_port"),
    ({"ssh_port": 8001}, "ssh_port"),
])
def test_instance_port_open_to_everyone_is_refused(data, setting):
    with pytest.raises(FleetConfigError) as refused:
        plan_firewall("h1", data, is_lb=True, instance_ports=[8001], lb_addresses=LB)
    assert refused.value.field == f"host h1: `{setting}`" and "past the load balancer" in refused.value.problem


def test_monitoring_hosts_are_allowed_to_the_instance_ports_too():
    monitor = (PeerAddress("mon1", "10.9.0.50", "vllm_advertise_address"),)
    fw = plan_firewall("h1", {}, is_lb=False, instance_ports=[8001], lb_addresses=LB, monitor_sources=monitor)
    assert fw.sources_v4 == ("10.9.0.2", "10.9.0.50") and fw.sources[1].role == "monitoring host"


def test_plan_of_a_fleet_host(host_data):
    data = host_data()
    fleet = plan_fleet([("h1", data)], ["lb1"])
    fw = for_fleet(fleet, "h1", data, LB)
    assert fw.instance_ports == (8001, 8002) and fw.open_tcp == () and fw.sources_v4 == ("10.9.0.2",)
    lb = for_fleet(fleet, "lb1", {"ssh_hostname": "10.9.0.2"}, LB)
    assert lb.instance_ports == () and lb.open_tcp == (443,)


# ---- the rendered rules -----------------------------------------------------------------------------

def test_rules_keep_ssh_before_anything_that_drops_and_instance_ports_for_the_sources():
    lbs = peer_addresses([("lb1", {"ssh_hostname": "10.9.0.2"}), ("lb6", {"vllm_advertise_address": "2001:db8::2"})])
    fw = plan_firewall("h1", {"firewall_allow_tcp": [9100]}, is_lb=True, instance_ports=[8001, 8002], lb_addresses=lbs)
    text = firewall.render_rules(fw)
    rules = lines_of(text)
    # The idempotent idiom, on vllm-fleet's own table only: nothing flushes the ruleset.
    assert rules[:3] == [f"table {TABLE}", f"delete table {TABLE}", f"table {TABLE} {{"]
    assert not [r for r in rules if "flush" in r or "table" in r and TABLE not in r]
    assert "type filter hook input priority filter; policy drop;" in rules
    ssh = rules.index('tcp dport { 22 } accept comment "SSH: before anything that could drop"')
    # Before the SSH rule nothing drops a new connection (invalid packets belong to none).
    assert [r for r in rules[:ssh] if "drop" in r and "policy drop" not in r] == [
        'ct state invalid drop comment "not part of any connection"']
    assert rules.index('ct state established,related accept comment "replies and accepted connections"') < ssh
    # Every rule of the chain says what it is for.
    chain = rules[rules.index("type filter hook input priority filter; policy drop;") + 1:-2]
    assert chain and all(' comment "' in r for r in chain)
    assert 'tcp dport { 443, 9100 } accept comment "open to everyone"' in rules
    # The instance ports appear in these two rules only, each behind its sources.
    instance_rules = [r for r in rules if "8001" in r]
    assert instance_rules == [
        'ip saddr { 10.9.0.2 } tcp dport { 8001, 8002 } accept comment "instance ports: allowed sources only (IPv4)"',
        'ip6 saddr { 2001:db8::2 } tcp dport { 8001, 8002 } accept '
        'comment "instance ports: allowed sources only (IPv6)"']
    assert ssh < rules.index(instance_rules[0]) < rules.index('counter comment "dropped by the policy"')
    assert "#   10.9.0.2: lb1 (load balancer)" in text and "#   2001:db8::2: lb6 (load balancer)" in text


def test_rules_without_instances_or_open_ports_have_no_empty_sets():
    text = firewall.render_rules(plan_firewall("h1", {}, is_lb=False))
    assert "{  }" not in text and "{ }" not in text
    assert not [r for r in lines_of(text) if "saddr {" in r or "open to everyone" in r]


def test_unit_loads_the_rules_after_nftables_service_and_deletes_only_its_table():
    unit = firewall.render_unit()
    lines = unit.splitlines()
    assert "Type=oneshot" in lines and "RemainAfterExit=yes" in lines
    assert f"ExecStart=/usr/sbin/nft -f {paths.FIREWALL_RULES}" in lines
    assert f"ExecStop=-/usr/sbin/nft delete table {TABLE}" in lines
    assert "Before=network-pre.target shutdown.target" in lines and "After=nftables.service" in lines
    assert "WantedBy=multi-user.target" in lines


# ---- the role, against simulated hosts -----------------------------------------------------------------

def firewall_run(fw, sim: SimulatedHost) -> list:
    return plan(firewall.host_firewall, fw, host_name="h1", host_data={}, sim=sim)


def commands(ops) -> list[str]:
    return [c for op in ops for c in op.commands]


@pytest.mark.parametrize("distro", [debian(12), ubuntu(22, 4), ubuntu(24, 4)])
def test_fresh_host_gets_the_checked_rules_and_the_unit_then_a_second_run_changes_nothing(distro):
    fw = plan_firewall("h1", {}, is_lb=False, instance_ports=[8001], lb_addresses=LB)
    sim = SimulatedHost(distro, sshd=["port 22", "port 2222", "connection 10.9.0.1 50000 10.9.0.11 2222"])
    run = commands(firewall_run(fw, sim))
    install = next(c for c in run if "apt-get" in c and " install " in c)
    assert "nftables" in install.split()
    staged = f"{paths.FIREWALL_RULES}.new"
    # The new rules reach their file only after nft -c accepted them; then they are applied.
    order = [f"upload <generated> -> {staged}", f"/usr/sbin/nft -c -f {staged}",
             f"mv -f {staged} {paths.FIREWALL_RULES}", f"systemctl reload-or-restart {paths.FIREWALL_UNIT}",
             f"systemctl enable {paths.FIREWALL_UNIT}"]
    assert [c for c in run if c in order] == order
    assert sim.checked == [staged] and sim.table and paths.FIREWALL_UNIT in sim.enabled
    rules = sim.files[paths.FIREWALL_RULES]["lines"]
    # sshd's own port joins the inventory's.
    assert 'tcp dport { 22, 2222 } accept comment "SSH: before anything that could drop"' in [r.strip() for r in rules]
    assert "".join(sim.files[paths.FIREWALL_UNIT_FILE]["lines"]).count("nft -f") == 2

    assert [(op.name, op.commands) for op in changed(firewall_run(fw, sim))] == []


def test_changed_rules_are_checked_then_reloaded_and_a_missing_table_is_loaded_again():
    sim = SimulatedHost(debian(12))
    firewall_run(plan_firewall("h1", {}, is_lb=False, instance_ports=[8001], lb_addresses=LB), sim)
    more = plan_firewall("h1", {}, is_lb=False, instance_ports=[8001, 8002], lb_addresses=LB)
    ops = changed(firewall_run(more, sim))
    assert [op.name.split(" | ")[-1] for op in ops] == [
        "Render the firewall rules (checked with nft -c first)", "Apply the firewall rules"]
    assert any("8001, 8002" in line for line in sim.files[paths.FIREWALL_RULES]["lines"])
    # Someone flushed the ruleset: the unit still says active, the table is reloaded.
    sim.table = False
    ops = changed(firewall_run(more, sim))
    assert [(op.name.split(" | ")[-1], op.commands) for op in ops] == [
        ("Apply the firewall rules", [f"systemctl reload-or-restart {paths.FIREWALL_UNIT}"])]
    assert sim.table and changed(firewall_run(more, sim)) == []


def test_disabled_firewall_is_taken_off_the_host_once():
    sim = SimulatedHost(debian(12))
    firewall_run(plan_firewall("h1", {}, is_lb=True), sim)
    assert sim.table and paths.FIREWALL_UNIT in sim.running
    ops = changed(firewall_run(None, sim))
    assert commands(ops) == [f"systemctl stop {paths.FIREWALL_UNIT}", f"systemctl disable {paths.FIREWALL_UNIT}"]
    assert not sim.table and paths.FIREWALL_UNIT not in sim.running | sim.enabled
    assert changed(firewall_run(None, sim)) == []
    # A table left behind without the unit (loaded by hand) is deleted too.
    sim.table = True
    assert commands(changed(firewall_run(None, sim))) == [f"nft delete table {TABLE}"]
    # A host that never had vllm-fleet's firewall is not touched.
    fresh = SimulatedHost(debian(12))
    assert changed(firewall_run(None, fresh)) == []


def test_ssh_ports_fact_reads_sshd_and_the_connection():
    fact = firewall.SshPorts()
    assert fact.process(["port 22", "port 2222", "listenaddress [::]:2200", "listenaddress 0.0.0.0:22",
                         "connection 10.0.0.1 5555 10.0.0.2 2022", "connection "]) == [22, 2022, 2200, 2222]
    assert fact.process(["connection "]) == []


# ---- the kernel: throwaway network namespaces -------------------------------------------------------------

def _kernel_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the rules are loaded in throwaway network namespaces")
    for tool in ("nft", "ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} on this machine (apt-get install nftables iproute2 util-linux)")


def _rules_file(tmp_path: Path, fw) -> Path:
    path = tmp_path / "firewall.nft"
    path.write_text(firewall.render_rules(fw))
    return path


def test_nft_accepts_the_rules_and_loading_them_twice_keeps_one_copy_and_others_tables(tmp_path):
    _kernel_or_skip()
    lbs = peer_addresses([("lb1", {"ssh_hostname": "10.9.0.2"}), ("lb6", {"vllm_advertise_address": "2001:db8::2"})])
    rules = _rules_file(tmp_path, plan_firewall("h1", {"nginx_http_redirect_port": 80, "firewall_allow_tcp": [9100]},
                                                is_lb=True, instance_ports=[8001, 8002], lb_addresses=lbs))
    broken = tmp_path / "broken.nft"
    broken.write_text(rules.read_text().replace("policy drop;", "policy drop;\n\t\ttcp dport 8001 acept", 1))
    script = f"""
set -e
nft -c -f {rules}
if nft -c -f {broken} 2>/dev/null; then echo BROKEN-ACCEPTED; fi
nft add table inet operator
nft add chain inet operator input '{{ type filter hook input priority 10; policy accept; }}'
nft -f {rules}
nft -f {rules}
nft -j list ruleset
echo ---
nft delete table {TABLE}
nft list tables
"""
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded, after_stop = result.stdout.split("---\n")
    assert "BROKEN-ACCEPTED" not in loaded
    objects = [next(iter(o.items())) for o in json.loads(loaded)["nftables"]]
    tables = [v["name"] for k, v in objects if k == "table"]
    assert sorted(tables) == ["operator", "vllm_fleet"]
    ours = [v for k, v in objects if k == "rule" and v["table"] == "vllm_fleet"]
    assert len([r for r in ours if r.get("comment") == "SSH: before anything that could drop"]) == 1
    assert len(ours) == len([r for r in lines_of(rules.read_text()) if ' comment "' in r])
    # ExecStop takes vllm-fleet's table away, and only it.
    assert after_stop.split() == ["table", "inet", "operator"]


def test_addresses_allowed_past_the_edge_reach_the_instance_ports_only(tmp_path):
    lbs = peer_addresses([("lb1", {"ssh_hostname": "10.9.0.2"})])
    allowed = {"firewall_instance_allow_from": ["10.9.0.99", "192.0.2.0/24", "2001:db8::/64", "10.9.0.2/32"]}
    fw = plan_firewall("h1", allowed, is_lb=False, instance_ports=[8001], lb_addresses=lbs)
    # The load balancer once, a single address as an address, networks as networks.
    assert fw.sources_v4 == ("10.9.0.2", "10.9.0.99", "192.0.2.0/24") and fw.sources_v6 == ("2001:db8::/64",)
    assert fw.open_tcp == () and fw.exporter_ports == ()
    # A host without instances opens nothing for them.
    assert plan_firewall("lb1", allowed, is_lb=True, lb_addresses=lbs).sources == ()
    _kernel_or_skip()
    rules = _rules_file(tmp_path, fw)
    result = subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(rules)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ip saddr { 10.9.0.2, 10.9.0.99, 192.0.2.0/24 } tcp dport { 8001 } accept" in rules.read_text()


SERVER = r"""
import select, socket, sys, time
listening = []
for port in map(int, sys.argv[1:]):
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((address, port))
        s.listen(16)
        listening.append(s)
print("ready", flush=True)
end = time.monotonic() + 60  # never outlives the test by much
while time.monotonic() < end:
    for s in select.select(listening, [], [], 0.5)[0]:
        s.accept()[0].close()
"""

CLIENT = r"""
import json, socket, sys
results = {}
for case in json.loads(sys.argv[1]):
    source, target, port = case
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(1.0)
    s.bind((source, 0))
    try:
        s.connect((target, port))
        results[f"{source}>{port}"] = "open"
    except socket.timeout:
        results[f"{source}>{port}"] = "dropped"
    except OSError as error:
        results[f"{source}>{port}"] = f"error {error.errno}"
    finally:
        s.close()
print(json.dumps(results))
"""


IPV6 = Path("/proc/sys/net/ipv6").is_dir()


@contextmanager
def _host_and_peer(rules: Path, peer_ips: list[str], listening: list[int]):
    """Two namespaces joined by a veth pair: the host (192.0.2.1, 2001:db8::1; ``rules`` loaded,
    listeners on ``listening``) and a peer holding ``peer_ips``. Yields ``connect(cases)``, which
    tries each (source, target, port) from the peer and tells "open", "dropped" or the error, and
    the host namespace's name. Nothing leaves them; both are deleted at the end."""
    host_ns, peer_ns = f"vfl-fwtest-{os.getpid()}-host", f"vfl-fwtest-{os.getpid()}-peer"

    def ip(*argv: str) -> None:
        result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, f"ip {' '.join(argv)}: {result.stderr}"

    def connect(cases: list[tuple[str, str, int]]) -> dict[str, str]:
        probe = subprocess.run(["ip", "netns", "exec", peer_ns, sys.executable, "-c", CLIENT, json.dumps(cases)],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        return json.loads(probe.stdout)

    server = None
    try:
        created = subprocess.run(["ip", "netns", "add", host_ns], capture_output=True, text=True, timeout=20)
        if created.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {created.stderr.strip()}")
        ip("netns", "add", peer_ns)
        ip("-n", host_ns, "link", "add", "fw0", "type", "veth", "peer", "name", "fw1", "netns", peer_ns)
        peer_networks = [f"{a}/64" if ":" in a else f"{a}/24" for a in peer_ips]
        for ns, dev, addresses in ((host_ns, "fw0", ["192.0.2.1/24", "2001:db8::1/64"]),
                                   (peer_ns, "fw1", peer_networks)):
            for address in addresses if IPV6 else [a for a in addresses if ":" not in a]:
                ip("-n", ns, "addr", "add", address, "dev", dev, *(["nodad"] if ":" in address else []))
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        loaded = subprocess.run(["ip", "netns", "exec", host_ns, "nft", "-f", str(rules)],
                                capture_output=True, text=True, timeout=20)
        assert loaded.returncode == 0, loaded.stderr

        server = subprocess.Popen(["ip", "netns", "exec", host_ns, sys.executable, "-c", SERVER, *map(str, listening)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert select.select([server.stdout], [], [], 20)[0] and server.stdout.readline().strip() == "ready", \
            server.stderr.read() if server.poll() is not None else "the listeners did not start"
        yield connect, host_ns
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        for ns in (host_ns, peer_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_packets_from_the_load_balancer_reach_an_instance_and_others_do_not(tmp_path):
    _kernel_or_skip()
    lb4, other4, lb6, other6 = "192.0.2.2", "192.0.2.3", "2001:db8::2", "2001:db8::3"
    lbs = peer_addresses([("lb4", {"vllm_advertise_address": lb4}), ("lb6", {"vllm_advertise_address": lb6})])
    rules = _rules_file(tmp_path, plan_firewall("h1", {}, is_lb=True, instance_ports=[8001], lb_addresses=lbs))
    # 22: SSH, 443: the edge, 8001: an instance, 9999: something else listening.
    with _host_and_peer(rules, [lb4, other4, lb6, other6], [22, 443, 8001, 9999]) as (connect, host_ns):
        cases = [(lb4, "192.0.2.1", 8001), (other4, "192.0.2.1", 8001), (other4, "192.0.2.1", 22),
                 (other4, "192.0.2.1", 443), (lb4, "192.0.2.1", 9999)]
        if IPV6:
            cases += [(lb6, "2001:db8::1", 8001), (other6, "2001:db8::1", 8001), (other6, "2001:db8::1", 22)]
        expected = {f"{lb4}>8001": "open", f"{other4}>8001": "dropped", f"{other4}>22": "open",
                    f"{other4}>443": "open", f"{lb4}>9999": "dropped"}
        if IPV6:  # reaching the host over IPv6 at all proves neighbour discovery gets through
            expected |= {f"{lb6}>8001": "open", f"{other6}>8001": "dropped", f"{other6}>22": "open"}
        assert connect(cases) == expected

        counted = subprocess.run(["ip", "netns", "exec", host_ns, "nft", "list", "chain", *TABLE.split(), "input"],
                                 capture_output=True, text=True, timeout=20).stdout
        dropped = re.search(r"counter packets (\d+) bytes \d+ comment \"dropped by the policy\"", counted)
        assert dropped and int(dropped.group(1)) >= len([v for v in expected.values() if v == "dropped"])
