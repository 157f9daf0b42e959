"""What the fleet's monitoring scrapes and where it sends alerts (roles/plan/monitoring.py), and
what the host firewalls open for it (roles/plan/firewall.py): Prometheus's targets, planned from
the inventory alone, with the labels the dashboards and alert rules group by; prometheus.yml and
alertmanager.yml as the services' own checkers (promtool, amtool) take them; the exporter ports
open to the monitoring hosts only, and nft accepting the rules in a throwaway network namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from roles import firewall
from roles.errors import FleetConfigError
from roles.plan import alerts
from roles.plan.fleet import plan_fleet, with_edge_and_firewalls
from roles.plan.monitoring import (
    ALERTMANAGER_ADDRESS,
    NGINX_EXPORTER_PORT,
    NODE_EXPORTER_PORT,
    RULES_FILE,
    alertmanager_config,
    plan_monitoring,
    prometheus_config,
)
from tests.deploy.fakehost import session_secrets_dir

LB = ("lb1", {"ssh_hostname": "10.9.0.2"})
MONITOR = ("mon1", {"ssh_hostname": "10.9.0.50"})
WEBHOOK = "https://hooks.example.com/services/T000/B000/XXXX"


class Fleet:
    """Two vLLM hosts (h1: instances a and b, h2: instance a), the load balancer lb1 and the
    monitoring host mon1, as an inventory gives them: the vLLM hosts, the ``lb`` group, every host."""

    def __init__(self, host_data, extra: dict[str, dict] | None = None, lb=LB, monitor=MONITOR):
        self.vllm = [("h1", host_data()),
                     ("h2", host_data(ssh_hostname="10.9.0.12", vllm_instances=[{"name": "a", "port": 8001}]))]
        self.vllm += [(name, host_data(**data)) for name, data in (extra or {}).items()]
        self.lb = (lb[0], {"nginx_secrets_dir": str(session_secrets_dir()), **lb[1]})
        self.others = [self.lb] + ([monitor] if monitor else [])
        self.monitors = [monitor[0]] if monitor else []

    @property
    def everyone(self) -> list[tuple[str, dict]]:
        return self.vllm + self.others

    def capacity(self):
        return plan_fleet(self.vllm, [self.lb[0]])

    def monitoring(self):
        return plan_monitoring(self.capacity(), self.everyone, self.monitors)

    def deploy_plan(self):
        """The plan a deploy runs on: edge, monitoring and every host's firewall."""
        return with_edge_and_firewalls(self.capacity(), [self.lb], self.everyone, Path.cwd(), self.monitors)


def by_host(targets) -> dict[str, list[tuple[str, dict]]]:
    found: dict[str, list[tuple[str, dict]]] = {}
    for target in targets:
        labels = dict(target.labels)
        found.setdefault(labels["host"], []).append((target.address, labels))
    return found


# ---- the scrape targets ------------------------------------------------------------------------------

def test_targets_are_every_instance_every_host_and_the_load_balancers_nginx(host_data):
    plan = Fleet(host_data).monitoring()
    assert plan.hosts == ("mon1",)
    assert [job for job, _ in plan.jobs] == ["vllm", "node", "nginx"]
    vllm = [(t.address, dict(t.labels)) for t in plan.targets("vllm")]
    release = {"model": "tiny", "release": "cpu-vllm-0.32.0"}
    assert vllm == [("10.9.0.11:8001", {"host": "h1", "instance_name": "a", **release}),
                    ("10.9.0.11:8002", {"host": "h1", "instance_name": "b", **release}),
                    ("10.9.0.12:8001", {"host": "h2", "instance_name": "a", **release})]
    # A node exporter on every host of the inventory, vLLM or not, the monitoring host too.
    assert [(t.address, dict(t.labels)) for t in plan.targets("node")] == [
        (f"{address}:{NODE_EXPORTER_PORT}", {"host": name}) for name, address in
        (("h1", "10.9.0.11"), ("h2", "10.9.0.12"), ("lb1", "10.9.0.2"), ("mon1", "10.9.0.50"))]
    # nginx's exporter on the load balancers only.
    assert [(t.address, dict(t.labels)) for t in plan.targets("nginx")] == [
        (f"10.9.0.2:{NGINX_EXPORTER_PORT}", {"host": "lb1"})]


def test_nginx_targets_follow_the_lb_group_when_a_vllm_host_is_the_load_balancer(host_data):
    fleet = Fleet(host_data)
    capacity = plan_fleet(fleet.vllm, ["h1"])
    plan = plan_monitoring(capacity, fleet.vllm + [MONITOR], ["mon1"])
    assert [t.address for t in plan.targets("nginx")] == [f"10.9.0.11:{NGINX_EXPORTER_PORT}"]
    assert len(plan.targets("node")) == 3


def test_no_monitor_group_no_monitoring(host_data):
    fleet = Fleet(host_data, monitor=None)
    assert fleet.monitoring() is None
    assert fleet.deploy_plan().monitoring is None


def test_ipv6_addresses_are_bracketed(host_data):
    fleet = Fleet(host_data, extra={"h6": {"vllm_advertise_address": "2001:db8::16"}},
                  lb=("lb6", {"vllm_advertise_address": "2001:db8::2"}))
    plan = fleet.monitoring()
    assert [a for a, _ in by_host(plan.targets("vllm"))["h6"]] == ["[2001:db8::16]:8001", "[2001:db8::16]:8002"]
    assert by_host(plan.targets("node"))["h6"] == [(f"[2001:db8::16]:{NODE_EXPORTER_PORT}", {"host": "h6"})]
    assert [t.address for t in plan.targets("nginx")] == [f"[2001:db8::2]:{NGINX_EXPORTER_PORT}"]
    # And Prometheus takes them so (its own check is below).
    config = yaml.safe_load(prometheus_config(plan, {}))
    assert ["[2001:db8::16]:8001"] in [c["targets"] for job in config["scrape_configs"] for c in job["static_configs"]]


def test_adding_a_host_adds_exactly_its_targets_and_leaves_the_others_as_they_were(host_data):
    before = Fleet(host_data).monitoring()
    after = Fleet(host_data, extra={"h3": {"ssh_hostname": "10.9.0.13"}}).monitoring()
    for job in ("vllm", "node", "nginx"):
        old, new = before.targets(job), after.targets(job)
        kept = tuple(t for t in new if dict(t.labels)["host"] != "h3")
        assert kept == old, job
        added = {t.address for t in new if dict(t.labels)["host"] == "h3"}
        assert added == {"vllm": {"10.9.0.13:8001", "10.9.0.13:8002"}, "node": {f"10.9.0.13:{NODE_EXPORTER_PORT}"},
                         "nginx": set()}[job]
    # In prometheus.yml too: the old targets' entries unchanged, the new ones added.
    old_entries = {job["job_name"]: job["static_configs"] for job in yaml.safe_load(prometheus_config(before, {}))[
        "scrape_configs"]}
    new_entries = {job["job_name"]: job["static_configs"] for job in yaml.safe_load(prometheus_config(after, {}))[
        "scrape_configs"]}
    for job, entries in old_entries.items():
        assert [e for e in new_entries[job] if e["labels"]["host"] != "h3"] == entries


# ---- prometheus.yml --------------------------------------------------------------------------------------

def test_prometheus_config_scrapes_every_target_with_its_labels(host_data):
    plan = Fleet(host_data).monitoring()
    text = prometheus_config(plan, {"monitor_scrape_interval": 30})
    assert text.startswith("# Managed by vllm-fleet")
    config = yaml.safe_load(text)
    assert config["global"] == {"scrape_interval": "30s", "evaluation_interval": "30s"}
    assert config["rule_files"] == [RULES_FILE]
    assert config["alerting"] == {"alertmanagers": [{"static_configs": [{"targets": [ALERTMANAGER_ADDRESS]}]}]}
    assert ALERTMANAGER_ADDRESS == "127.0.0.1:9093"
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert list(jobs) == ["vllm", "node", "nginx"]
    assert jobs["vllm"][2] == {"targets": ["10.9.0.12:8001"], "labels": {
        "host": "h2", "instance_name": "a", "model": "tiny", "release": "cpu-vllm-0.32.0"}}
    assert [e["targets"] for e in jobs["node"]] == [[f"{a}:{NODE_EXPORTER_PORT}"] for a in (
        "10.9.0.11", "10.9.0.12", "10.9.0.2", "10.9.0.50")]
    # The default interval is the setting's default.
    assert yaml.safe_load(prometheus_config(plan, {}))["global"]["scrape_interval"] == "15s"


def promtool() -> str:
    """Debian's and Ubuntu's prometheus package ships it (`make test` installs it): missing, the
    test fails rather than skips, as tests/unit/test_alert_rules.py does."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make test` installs it (apt-get install prometheus).", pytrace=False)
    return found


def test_promtool_accepts_the_config_with_the_rules_it_names(host_data, tmp_path):
    tool = promtool()
    data = {"monitor_scrape_interval": 20}
    fleet = Fleet(host_data, extra={"h6": {"vllm_advertise_address": "2001:db8::16"}})
    config = yaml.safe_load(prometheus_config(fleet.monitoring(), data))
    # The rules file, where this test can write it: the config names it as the deploy writes it.
    rules = tmp_path / Path(RULES_FILE).name
    rules.write_text(alerts.render_rules(data))
    config["rule_files"] = [str(rules)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([tool, "check", "config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr and str(rules) in result.stdout + result.stderr
    # A broken rules file fails the config's check: promtool loads the rules it names.
    rules.write_text("groups: [{name: x, rules: [{alert: X, expr: 'up =='}]}]\n")
    result = subprocess.run([tool, "check", "config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


# ---- alertmanager.yml ------------------------------------------------------------------------------------

def test_alertmanager_sends_every_alert_to_the_webhook_with_resolutions():
    config = yaml.safe_load(alertmanager_config({"monitor_webhook_url": WEBHOOK}))
    assert config["route"]["receiver"] == "vllm-fleet"
    assert config["receivers"] == [{"name": "vllm-fleet",
                                    "webhook_configs": [{"url": WEBHOOK, "send_resolved": True}]}]
    assert config["route"]["group_by"] == ["alertname", "host"]


def test_alertmanager_without_a_webhook_has_a_receiver_that_sends_nowhere():
    text = alertmanager_config({})
    assert text.startswith("# Managed by vllm-fleet")
    config = yaml.safe_load(text)
    assert config["receivers"] == [{"name": "vllm-fleet"}] and config["route"]["receiver"] == "vllm-fleet"
    assert "webhook" not in text


def amtool_check(path: Path) -> subprocess.CompletedProcess:
    """``amtool check-config PATH``, as the deploy runs it on the monitor host. Debian's and Ubuntu's
    prometheus-alertmanager package ships amtool (`make test` installs it): missing, the test
    fails rather than skips, as promtool's do."""
    tool = shutil.which("amtool")
    if tool is None:
        pytest.fail("amtool is missing: `make test` installs it (apt-get install prometheus-alertmanager).",
                    pytrace=False)
    return subprocess.run([tool, "check-config", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("data", [{}, {"monitor_webhook_url": WEBHOOK}], ids=["no-webhook", "webhook"])
def test_amtool_accepts_the_alertmanager_config(tmp_path, data):
    path = tmp_path / "alertmanager.yml"
    path.write_text(alertmanager_config(data))
    result = amtool_check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and " - 1 receivers" in result.stdout


def test_amtool_refuses_a_webhook_receiver_without_a_url(tmp_path):
    """What the deploy's check stops: a receiver Alertmanager would not start with."""
    config = yaml.safe_load(alertmanager_config({"monitor_webhook_url": WEBHOOK}))
    del config["receivers"][0]["webhook_configs"][0]["url"]
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    result = amtool_check(path)
    assert result.returncode != 0 and "missing URL in webhook config" in result.stdout + result.stderr


# ---- the firewalls -------------------------------------------------------------------------------------

def rule_lines(fw) -> list[str]:
    return [line.strip() for line in firewall.render_rules(fw).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_exporters_are_open_to_the_monitoring_hosts_only(host_data):
    plan = Fleet(host_data).deploy_plan()
    expected = {"h1": (NODE_EXPORTER_PORT,), "h2": (NODE_EXPORTER_PORT,), "mon1": (NODE_EXPORTER_PORT,),
                "lb1": (NODE_EXPORTER_PORT, NGINX_EXPORTER_PORT)}
    for name, ports in expected.items():
        fw = plan.firewall(name)
        assert fw.exporter_ports == ports, name
        assert fw.monitor_sources_v4 == ("10.9.0.50",) and fw.monitor_sources_v6 == (), name
        assert {s.host for s in fw.monitor_sources} == {"mon1"}
        assert not set(ports) & set(fw.open_tcp), f"{name} opens an exporter to everyone"
        # The exporter ports appear in one rule only, behind the monitoring host's address.
        dports = ", ".join(map(str, ports))
        assert [r for r in rule_lines(fw) if str(NODE_EXPORTER_PORT) in r] == [
            f'ip saddr {{ 10.9.0.50 }} tcp dport {{ {dports} }} accept '
            'comment "exporters: monitoring hosts only (IPv4)"']
    # The instances answer the load balancer and the monitoring host (which scrapes /metrics).
    for name in ("h1", "h2"):
        fw = plan.firewall(name)
        assert fw.sources_v4 == ("10.9.0.2", "10.9.0.50")
        assert [s.role for s in fw.sources] == ["load balancer", "monitoring host"]
    assert plan.firewall("lb1").instance_ports == () and plan.firewall("mon1").instance_ports == ()


def test_without_a_monitor_group_no_exporter_port_is_open(host_data):
    plan = Fleet(host_data, monitor=None).deploy_plan()
    for name in ("h1", "h2", "lb1"):
        fw = plan.firewall(name)
        assert fw.exporter_ports == () and fw.monitor_sources == ()
        assert not [r for r in rule_lines(fw) if str(NODE_EXPORTER_PORT) in r or str(NGINX_EXPORTER_PORT) in r]
    assert plan.firewall("h1").sources_v4 == ("10.9.0.2",)


def test_an_ipv6_monitoring_host_is_let_in_by_its_ipv6_address(host_data):
    plan = Fleet(host_data, monitor=("mon6", {"vllm_advertise_address": "2001:DB8::50"})).deploy_plan()
    fw = plan.firewall("lb1")
    assert fw.monitor_sources_v6 == ("2001:db8::50",) and fw.monitor_sources_v4 == ()
    assert 'ip6 saddr { 2001:db8::50 } tcp dport { 9100, 9113 } accept comment "exporters: monitoring hosts only ' \
           '(IPv6)"' in rule_lines(fw)
    assert plan.firewall("h1").sources_v6 == ("2001:db8::50",)


def test_a_monitoring_host_known_by_a_name_is_refused(host_data):
    with pytest.raises(FleetConfigError) as refused:
        Fleet(host_data, monitor=("mon.internal", {"ssh_user": "deploy"})).deploy_plan()
    assert refused.value.field == "host mon.internal: `vllm_advertise_address`"
    assert "monitoring host" in refused.value.problem and "a name, not an IP address" in refused.value.problem


def test_a_host_without_a_firewall_has_no_plan_and_the_others_still_open_their_exporters(host_data):
    fleet = Fleet(host_data)
    fleet.others = [fleet.lb, ("mon1", {**MONITOR[1], "firewall_enabled": False})]
    plan = fleet.deploy_plan()
    assert plan.firewall("mon1") is None
    assert plan.firewall("h1").exporter_ports == (NODE_EXPORTER_PORT,)


def test_nft_accepts_the_rules_of_every_host(host_data, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: nft -c checks the rules against the kernel in a throwaway network namespace")
    for tool in ("nft", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} on this machine (apt-get install nftables util-linux)")
    plans = {f"{name}-v4": fw for name, fw in Fleet(host_data).deploy_plan().firewalls}
    plans |= {f"{name}-v6": fw for name, fw in Fleet(
        host_data, monitor=("mon6", {"vllm_advertise_address": "2001:db8::50"})).deploy_plan().firewalls}
    files = []
    for name, fw in plans.items():
        path = tmp_path / f"{name}.nft"
        path.write_text(firewall.render_rules(fw))
        files.append(path)
    script = "set -e\n" + "".join(f"nft -c -f {path}\necho checked {path.stem}\n" for path in files)
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [f"checked {path.stem}" for path in files]
