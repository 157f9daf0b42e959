"""Monitoring deployed with the fleet, against simulated Debian 12 hosts: h1 is the load balancer
and runs instances, h2 runs instances and is the monitoring host. Every host gets a node exporter
(systemd and textfile collectors), the load balancer an nginx exporter reading a loopback
stub_status, the monitoring host Prometheus and Alertmanager; their configurations are checked by
promtool before they replace the files in place, the receiver (which may hold a token) is a
private file that amtool checks before it replaces the one in place, and a second run changes
nothing. Without a monitor group none of it is there."""

import re

import pytest
import yaml
from pyinfra.api import StringCommand

from roles import monitor, paths, secrets, site
from roles.plan.monitoring import RULES_FILE, STUB_STATUS_PORT
from tests.deploy.fakehost import fleet_plan, run_fleet
from tests.deploy.simhost import CheckRefused, SimulatedHost, debian

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

WEBHOOK = "https://hooks.example.com/services/T000/B000/s3cr3t-token"
PROMETHEUS_YML = "/etc/prometheus/prometheus.yml"
ALERTMANAGER_YML = "/etc/prometheus/alertmanager.yml"
EXPORTERS = ("prometheus-node-exporter", "prometheus-nginx-exporter")
SERVERS = ("prometheus", "prometheus-alertmanager")
RECEIVER_OP = "Alertmanager receiver (checked with amtool)"


class Fleet:
    """h1 (load balancer, instances a and b) and h2 (instances a and b, the monitor group)."""

    def __init__(self, host_data, tmp_path, monitor_hosts=("h2",), **h2_data):
        self.secrets = tmp_path / "secrets"
        secrets.add_client_key(self.secrets, "alice")
        self.data = {"h1": host_data(), "h2": host_data(ssh_hostname="10.9.0.12", **h2_data)}
        self.sims = {name: SimulatedHost(debian(12)) for name in self.data}
        self.monitor_hosts = monitor_hosts

    def deploy(self):
        fleet = fleet_plan(list(self.data.items()), ["h1"], secrets_dir=self.secrets,
                           monitor_hosts=self.monitor_hosts)
        return run_fleet(site.serve, fleet, hosts={name: (data, self.sims[name]) for name, data in self.data.items()})

    def text(self, host: str, path: str) -> str:
        return "\n".join(self.sims[host].files[path]["lines"])


def commands_of(timeline, host_name) -> list[str]:
    return [c for name, op in timeline if name == host_name for c in op.commands]


def changed_ops(timeline, host_name) -> list[str]:
    return [op.name.split(" | ")[-1] for name, op in timeline if name == host_name and op.commands]


def install_command(run: list[str], package: str) -> str:
    [command] = [c for c in run if "apt-get" in c and " install " in c and package in c.split()]
    return command


def stub_status_server(conf: str) -> list[str]:
    """The server block of nginx's configuration that serves stub_status, line by line."""
    lines = [line.strip() for line in conf.splitlines()]
    status = lines.index("stub_status;")
    start = max(i for i in range(status) if lines[i] == "server {")
    end = next(i for i in range(status, len(lines)) if lines[i] == "}" and lines[i - 1] == "}")
    return lines[start:end + 1]


def test_every_host_runs_a_node_exporter_with_the_systemd_and_textfile_collectors(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    timeline = fleet.deploy()
    for name, sim in fleet.sims.items():
        run = commands_of(timeline, name)
        assert "--no-install-recommends" in install_command(run, "prometheus-node-exporter").split()
        args = fleet.text(name, "/etc/default/prometheus-node-exporter")
        assert "--collector.systemd " in args and f"--collector.systemd.unit-include={monitor.UNITS}" in args
        assert f"--collector.textfile.directory={monitor.TEXTFILE_DIR}" in args
        assert monitor.TEXTFILE_DIR in sim.dirs
        assert "prometheus-node-exporter.service" in sim.running & sim.enabled
        # Restarted on its new arguments (the package started it on its own ones).
        assert run.index("systemctl restart prometheus-node-exporter.service") > \
            run.index("upload <generated> -> /etc/default/prometheus-node-exporter")
    # The units the alerts watch: every instance, nginx and the firewall.
    units = re.compile(monitor.UNITS)
    assert all(units.fullmatch(u) for u in ("vllm@a.service", "nginx.service", f"{paths.FIREWALL_UNIT}"))
    assert not units.fullmatch("ssh.service")


def test_only_the_load_balancer_runs_an_nginx_exporter_on_a_loopback_stub_status(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    timeline = fleet.deploy()
    assert "prometheus-nginx-exporter" in fleet.sims["h1"].packages
    assert "prometheus-nginx-exporter" not in fleet.sims["h2"].packages
    assert not [c for c in commands_of(timeline, "h2") if "nginx" in c]
    assert "prometheus-nginx-exporter.service" in fleet.sims["h1"].running
    args = fleet.text("h1", "/etc/default/prometheus-nginx-exporter")
    assert f'ARGS="--nginx.scrape-uri=http://127.0.0.1:{STUB_STATUS_PORT}/stub_status"' in args.splitlines()
    # Its arguments are in place before the package starts it for the first time.
    run = commands_of(timeline, "h1")
    assert run.index("upload <generated> -> /etc/default/prometheus-nginx-exporter") < \
        run.index(install_command(run, "prometheus-nginx-exporter"))
    # nginx serves its counters on loopback only, to nobody else and without logging the scrapes,
    # and checks the configuration before reloading it.
    server = stub_status_server(fleet.text("h1", paths.NGINX_CONF))
    assert [line for line in server if line.startswith("listen")] == [f"listen 127.0.0.1:{STUB_STATUS_PORT};"]
    assert "access_log off;" in server and "location = /stub_status {" in server
    assert run.index("nginx -t -q") < run.index("systemctl reload nginx.service") < \
        run.index("systemctl restart prometheus-nginx-exporter.service")


def test_only_the_monitoring_host_runs_prometheus_and_alertmanager(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    h1, h2 = fleet.sims["h1"], fleet.sims["h2"]
    assert not {*SERVERS} & set(h1.packages) and not [f for f in h1.files if f.startswith("/etc/prometheus/")]
    assert {*SERVERS} <= set(h2.packages)
    assert {f"{s}.service" for s in SERVERS} <= h2.running & h2.enabled
    # Loopback only: nothing new is open to the network.
    prometheus = fleet.text("h2", "/etc/default/prometheus")
    assert "--web.listen-address=127.0.0.1:9090" in prometheus
    assert "--storage.tsdb.path=/var/lib/prometheus/metrics2" in prometheus
    assert "--storage.tsdb.retention.time=15d" in prometheus
    alertmanager = fleet.text("h2", "/etc/default/prometheus-alertmanager")
    assert "--web.listen-address=127.0.0.1:9093" in alertmanager and '--cluster.listen-address="' in alertmanager
    assert h2.dirs["/var/lib/prometheus/metrics2"] == "prometheus"
    # What it scrapes: every instance, both node exporters, the load balancer's nginx exporter.
    config = yaml.safe_load(fleet.text("h2", PROMETHEUS_YML))
    jobs = {job["job_name"]: [(c["targets"][0], c["labels"]["host"]) for c in job["static_configs"]]
            for job in config["scrape_configs"]}
    assert jobs == {"vllm": [("10.9.0.11:8001", "h1"), ("10.9.0.11:8002", "h1"), ("10.9.0.12:8001", "h2"),
                             ("10.9.0.12:8002", "h2")],
                    "node": [("10.9.0.11:9100", "h1"), ("10.9.0.12:9100", "h2")],
                    "nginx": [("10.9.0.11:9113", "h1")]}


def test_prometheus_files_are_checked_by_promtool_before_they_replace_the_files_in_place(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    timeline = fleet.deploy()
    run, h2 = commands_of(timeline, "h2"), fleet.sims["h2"]
    rules, config = f"{RULES_FILE}.new", f"{PROMETHEUS_YML}.new"
    order = [f"upload <generated> -> {rules}", f"promtool check rules {rules}", f"mv -f {rules} {RULES_FILE}",
             f"upload <generated> -> {config}", f"promtool check config {config}",
             f"mv -f {config} {PROMETHEUS_YML}", "systemctl restart prometheus.service"]
    assert [c for c in run if c in order] == order
    assert h2.promtool == [("rules", rules), ("config", config)]
    assert rules not in h2.files and config not in h2.files
    assert yaml.safe_load(fleet.text("h2", RULES_FILE))["groups"]
    assert fleet.sims["h1"].promtool == []


def test_the_alertmanager_receiver_is_a_private_file_holding_the_webhook_checked_by_amtool(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, monitor_webhook_url=WEBHOOK)
    timeline = fleet.deploy()
    h2, upload = fleet.sims["h2"], f"{ALERTMANAGER_YML}.upload"
    [op] = [op for name, op in timeline if name == "h2" and op.name.endswith(RECEIVER_OP)]
    # Created empty, readable by root and Alertmanager's group only, then written, checked by
    # amtool (its output, which may quote the URL, not shown), then renamed.
    install, written, check, move = op.commands
    assert (install, written, move) == (f"install -m 640 -g prometheus /dev/null {upload}",
                                        f"upload <generated> -> {upload}", f"mv -f {upload} {ALERTMANAGER_YML}")
    assert check.startswith(f"amtool check-config {upload} > /dev/null 2>&1 || {{ echo ")
    [(checked, staged)] = h2.amtool
    assert checked == upload and (staged["mode"], staged["user"], staged["group"]) == (640, "root", "prometheus")
    assert staged["sha256"] == h2.files[ALERTMANAGER_YML]["sha256"]
    receiver = h2.files[ALERTMANAGER_YML]
    assert (receiver["mode"], receiver["user"], receiver["group"]) == (640, "root", "prometheus")
    assert yaml.safe_load(fleet.text("h2", ALERTMANAGER_YML))["receivers"] == [
        {"name": "vllm-fleet", "webhook_configs": [{"url": WEBHOOK, "send_resolved": True}]}]
    # Every upload of the URL landed in a file that was already private; never through files.put,
    # never in a command.
    assert [(dest, mode) for dest, mode, text in h2.uploads if WEBHOOK in text] == [(upload, 640)]
    for name, op in timeline:
        strings = op.commands + [c.get_raw_value() for c in op.raw if isinstance(c, StringCommand)]
        assert not [c for c in strings if "s3cr3t-token" in c], f"the webhook URL in a command of {name}: {op.name}"
    assert not [c for c in commands_of(timeline, "h2") if c.split()[-1] == ALERTMANAGER_YML and not c.startswith("mv ")]
    assert run_index(timeline, "h2", f"mv -f {upload} {ALERTMANAGER_YML}") < \
        run_index(timeline, "h2", "systemctl restart prometheus-alertmanager.service")


def run_index(timeline, host_name, command) -> int:
    return commands_of(timeline, host_name).index(command)


def test_a_receiver_amtool_refuses_never_replaces_the_running_one(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, monitor_webhook_url=WEBHOOK)
    fleet.deploy()
    h2, upload = fleet.sims["h2"], f"{ALERTMANAGER_YML}.upload"
    running = h2.files[ALERTMANAGER_YML]
    fleet.data["h2"]["monitor_webhook_url"] = "https://hooks.example.com/services/T000/B000/other"
    h2.refusing.add("amtool")
    with pytest.raises(CheckRefused, match=f"amtool check-config {upload}"):
        fleet.deploy()
    # The refused file stays beside the live one for the operator to check, as private as it.
    assert h2.files[ALERTMANAGER_YML] == running
    assert (h2.files[upload]["mode"], h2.files[upload]["group"]) == (640, "prometheus")
    assert "/other" in "\n".join(h2.files[upload]["lines"])


def test_without_a_webhook_the_receiver_sends_nowhere(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    config = yaml.safe_load(fleet.text("h2", ALERTMANAGER_YML))
    assert config["receivers"] == [{"name": "vllm-fleet"}]


def test_the_exporters_and_instances_answer_the_monitoring_host(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    rules = {name: [line.strip() for line in sim.files[paths.FIREWALL_RULES]["lines"]]
             for name, sim in fleet.sims.items()}
    assert 'ip saddr { 10.9.0.12 } tcp dport { 9100, 9113 } accept comment "exporters: monitoring hosts only ' \
           '(IPv4)"' in rules["h1"]
    assert 'ip saddr { 10.9.0.12 } tcp dport { 9100 } accept comment "exporters: monitoring hosts only (IPv4)"' \
        in rules["h2"]
    # The monitoring host scrapes /metrics of every instance: allowed with the load balancer.
    for name in ("h1", "h2"):
        assert 'ip saddr { 10.9.0.11, 10.9.0.12 } tcp dport { 8001, 8002 } accept comment "instance ports: ' \
               'allowed sources only (IPv4)"' in rules[name]
        assert not [r for r in rules[name] if "open to everyone" in r and ("9100" in r or "9113" in r)]


def test_a_second_run_changes_nothing(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, monitor_webhook_url=WEBHOOK)
    fleet.deploy()
    timeline = fleet.deploy()
    assert [(name, op.name, op.commands) for name, op in timeline if op.commands] == []


def test_a_new_webhook_rewrites_the_receiver_and_restarts_alertmanager_alone(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, monitor_webhook_url=WEBHOOK)
    fleet.deploy()
    fleet.data["h2"]["monitor_webhook_url"] = "https://hooks.example.com/services/T000/B000/other"
    timeline = fleet.deploy()
    assert [(name, op.name.split(" | ")[-1]) for name, op in timeline if op.commands] == [
        ("h2", RECEIVER_OP), ("h2", "Restart prometheus-alertmanager on its new configuration")]
    assert "/other" in fleet.text("h2", ALERTMANAGER_YML)


def test_a_changed_scrape_interval_rewrites_the_checked_files_and_reloads_prometheus_alone(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    fleet.data["h2"]["monitor_scrape_interval"] = 30
    timeline = fleet.deploy()
    assert changed_ops(timeline, "h1") == []
    assert changed_ops(timeline, "h2") == ["Alert rules (checked with promtool)",
                                           "Prometheus scrape targets (checked with promtool)",
                                           "Reload prometheus on its new configuration"]
    assert yaml.safe_load(fleet.text("h2", PROMETHEUS_YML))["global"]["scrape_interval"] == "30s"


def test_without_a_monitor_group_no_monitoring_is_deployed(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, monitor_hosts=())
    timeline = fleet.deploy()
    for name, sim in fleet.sims.items():
        assert not [p for p in sim.packages if p.startswith("prometheus")], name
        assert not [c for c in commands_of(timeline, name) if "prometheus" in c or "promtool" in c], name
        assert not [r for r in sim.files[paths.FIREWALL_RULES]["lines"] if "9100" in r or "9113" in r]
        assert sim.promtool == []
    conf = fleet.text("h1", paths.NGINX_CONF)
    assert "stub_status" not in conf and str(STUB_STATUS_PORT) not in conf
    assert 'ip saddr { 10.9.0.11 } tcp dport { 8001, 8002 }' in " ".join(fleet.sims["h2"].files[
        paths.FIREWALL_RULES]["lines"])


def test_every_monitoring_service_runs_in_a_sandbox_that_restarts_it_when_changed(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    timeline = fleet.deploy()
    expected = {"h1": ("prometheus-node-exporter", "prometheus-nginx-exporter"),
                "h2": ("prometheus-node-exporter", "prometheus", "prometheus-alertmanager")}
    for host, units in expected.items():
        drop_ins = sorted(p for p in fleet.sims[host].files if p.endswith(".d/vllm-fleet-hardening.conf"))
        assert drop_ins == sorted(f"/etc/systemd/system/{u}.service.d/vllm-fleet-hardening.conf" for u in units)
        for path in drop_ins:
            text = fleet.text(host, path)
            assert "ProtectSystem=strict" in text and "CapabilityBoundingSet=" in text
            # Only Prometheus and Alertmanager write, each its own folder; the node exporter sees /proc/1.
            writable = [line for line in text.splitlines() if line.startswith("ReadWritePaths=")]
            assert writable == {"prometheus": ["ReadWritePaths=/var/lib/prometheus/metrics2"],
                                "prometheus-alertmanager": ["ReadWritePaths=/var/lib/prometheus/alertmanager"]
                                }.get(path.split("/")[4].removesuffix(".service.d"), [])
            assert ("ProtectProc=invisible" in text) != ("node-exporter" in path)
    run = commands_of(timeline, "h2")
    assert run.index("systemctl daemon-reload") < run.index("systemctl restart prometheus.service")
    # A second run leaves the sandboxes, and so the services, alone.
    assert "systemctl restart prometheus.service" not in commands_of(fleet.deploy(), "h2")


def test_a_stopped_service_with_a_new_configuration_starts_once_on_it(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    fleet.sims["h2"].running.discard("prometheus.service")
    fleet.data["h2"]["monitor_scrape_interval"] = 30
    run = commands_of(fleet.deploy(), "h2")
    assert "systemctl start prometheus.service" in run and "systemctl restart prometheus.service" not in run
    assert run.index("mv -f /etc/prometheus/prometheus.yml.new /etc/prometheus/prometheus.yml") < \
        run.index("systemctl start prometheus.service")
