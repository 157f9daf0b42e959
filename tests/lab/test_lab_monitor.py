"""Monitoring on the lab: Prometheus and Alertmanager on the monitor host (lab2) scrape every
instance, every host's node exporter and the load balancer's nginx exporter, with the fleet's
alert rules loaded, all checked by promtool on the host.

Traffic goes only to the lab's own hosts; queries go to Prometheus on the monitor host's
loopback, through ssh.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.lab.labkit import deployed_lab, run_deploy, ssh

pytestmark = pytest.mark.lab

QUERY = ("import json, sys, urllib.parse, urllib.request as u; "
         "print(u.urlopen('http://127.0.0.1:9090/api/v1/' + sys.argv[1], timeout=30).read().decode())")


@pytest.fixture(scope="module")
def monitor_host():
    return deployed_lab()["hosts"][-1]["name"]


def api(host: str, path: str) -> dict:
    return json.loads(ssh(host, f"python3 -c \"{QUERY}\" '{path}'"))["data"]


def test_every_target_is_scraped_and_up(monitor_host):
    deadline = time.monotonic() + 120  # a first scrape after (re)start takes up to one interval
    while True:
        targets = api(monitor_host, "targets?state=active")["activeTargets"]
        down = [(t["labels"]["job"], t["scrapeUrl"], t.get("lastError")) for t in targets if t["health"] != "up"]
        if not down or time.monotonic() > deadline:
            break
        time.sleep(5)
    jobs = sorted(t["labels"]["job"] for t in targets)
    print(f"\nPrometheus on {monitor_host}: {len(targets)} targets, {len(targets) - len(down)} up: "
          + ", ".join(f"{job} {jobs.count(job)}" for job in sorted(set(jobs))))
    assert down == [], down
    assert {job: jobs.count(job) for job in set(jobs)} == {"vllm": 3, "node": 2, "nginx": 1}
    vllm = [t["labels"] for t in targets if t["labels"]["job"] == "vllm"]
    assert all({"host", "instance_name", "model", "release"} <= set(labels) for labels in vllm), vllm


def test_the_deployed_configuration_and_rules_pass_promtool(monitor_host):
    print("\n" + ssh(monitor_host, "promtool check config /etc/prometheus/prometheus.yml"))
    rules = api(monitor_host, "rules")["groups"]
    names = [rule["name"] for group in rules for rule in group["rules"]]
    print(f"{len(names)} alert rules loaded: {', '.join(names)}")
    assert len(names) >= 15


def test_monitoring_services_are_sandboxed_and_exporters_answer_the_monitor_only(monitor_host):
    import socket

    from roles.lab.config import load_state

    lab = load_state()
    scores = {}
    for host in (h["name"] for h in lab["hosts"]):
        for unit in ssh(host, "systemctl list-units --plain --no-legend 'prometheus*' | cut -d' ' -f1").split():
            report = ssh(host, f"systemd-analyze security {unit} | tail -1")
            scores[f"{host} {unit}"] = float(report.split("exposure level for")[1].split(":")[1].split()[0])
    print("\n" + "\n".join(f"  {unit}: {score}" for unit, score in scores.items()))
    # Node exporters on both hosts, the nginx exporter on lab1, Prometheus and Alertmanager on lab2.
    assert len(scores) == 5 and all(score <= 2.5 for score in scores.values()), scores
    for host in lab["hosts"]:  # from the control node: dropped by the hosts' firewalls
        with pytest.raises(OSError):
            socket.create_connection((host["address"], 9100), timeout=3).close()


def test_the_release_metrics_list_matches_a_live_instance(monitor_host):
    """inventories/releases/NAME.metrics, which the plan checks the alert rules against, is what
    an instance of the release serves now: a stale capture fails here."""
    from roles.lab.config import load_state
    from roles.plan.metrics import exposed_names
    from roles.release.metrics import release_metrics
    from tests.lab.labkit import REPO

    lb = load_state()["hosts"][0]
    release = ssh(lb["name"], "cat /opt/vllm-fleet/instances/a/.release")
    page = ssh(lb["name"], "python3 -c \"import urllib.request as u; "
                           f"print(u.urlopen('http://{lb['address']}:8001/metrics', timeout=30).read().decode())\"")
    live = {name for name in exposed_names(page) if name.startswith("vllm:")}
    listed = release_metrics(release, REPO / "inventories" / "releases")
    print(f"\n{release}: {len(live)} vLLM sample names served, {len(listed)} listed")
    assert live == listed, (sorted(live - listed), sorted(listed - live))


class Receiver:
    """Alertmanager's webhook receiver for the test: an HTTP server on the control node's lab
    bridge address (the lab hosts reach it; nothing else does), keeping each notification."""

    def __init__(self):
        import http.server
        import threading

        from roles.lab.config import bridge_address

        notes = self.notes = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                notes.append((time.monotonic(), json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((bridge_address(), 0), Handler)
        self.url = f"http://{bridge_address()}:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, alert: str, status: str, labels: dict, timeout: float) -> float:
        """Seconds until a notification holds ``alert`` in ``status`` with ``labels``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            for at, note in list(self.notes):
                if at >= start and any(a["labels"].get("alertname") == alert and a["status"] == status
                                       and labels.items() <= a["labels"].items() for a in note["alerts"]):
                    return at - start
            time.sleep(1)
        raise AssertionError(f"no {status} {alert} {labels} within {timeout:.0f}s: {self.notes[-3:]}")


def test_an_instance_down_alert_reaches_the_webhook_and_resolves(monitor_host):
    """The instance of lab2 stopped (its engine killed first): VllmInstanceDown (for: 1m) reaches
    the receiver within the rule's `for`, a scrape, an evaluation and Alertmanager's grouping
    wait; it resolves once the instance is back."""
    from roles.lab.config import load_state

    receiver = Receiver()
    try:
        deploy = run_deploy("--data", f"monitor_webhook_url={receiver.url}")
        assert deploy.returncode == 0, deploy.output[-5000:]
        engine = ssh(monitor_host, "pgrep -f 'VLLM::EngineCore' | head -1")
        ssh(monitor_host, f"kill -9 {engine}; systemctl stop vllm@a")
        fired = receiver.wait_for("VllmInstanceDown", "firing", {"host": monitor_host, "instance_name": "a"}, 300)
        address = next(h["address"] for h in load_state()["hosts"] if h["name"] == monitor_host)
        ssh(monitor_host, "systemctl start vllm@a && python3 /usr/local/lib/vllm-fleet/fleet_probe.py wait "
                          f"--unit vllm@a --address {address} --port 8001 --timeout 280")
        resolved = receiver.wait_for("VllmInstanceDown", "resolved", {"host": monitor_host, "instance_name": "a"}, 300)
        print(f"\nVllmInstanceDown (for 1m, scrape 15s) reached the webhook {fired:.0f}s after the stop; "
              f"resolved {resolved:.0f}s after the instance was healthy again")
        assert fired <= 60 + 15 + 15 + 10 + 30  # for, scrape, evaluation, group_wait, slack
    finally:
        receiver.server.shutdown()
        ssh(monitor_host, "systemctl start vllm@a", check=False)
        assert run_deploy().returncode == 0  # the lab's own receiver (none) again


def query(host: str, expr: str) -> list:
    import urllib.parse

    return api(host, "query?query=" + urllib.parse.quote(expr, safe=""))["result"]


def test_every_dashboard_query_and_alert_metric_returns_data_after_traffic(monitor_host):
    """After some requests through the edge, every panel of the dashboard (Grafana's variables
    substituted) returns data from the lab's Prometheus, and every metric an alert rule reads has
    series. GPU panels and rules read what GPU hosts export: they are tested against the recorded
    H200 readings through the textfile format (tests/unit/test_gpu_metrics_exposition.py)."""
    from roles import cli
    from roles.plan import alerts, dashboard
    from tests.lab.labkit import Load

    with Load(cli.lab_endpoint(), workers=1, pause=0.5, max_requests=20, max_seconds=60):
        pass
    time.sleep(40)  # two scrapes and a rule evaluation after the last request
    gpu = ("vllm_fleet_gpu_",)
    substituted = [(title, dashboard.substitute_variables(expr))
                   for title, expr in dashboard.panel_expressions(dashboard.load_dashboard())]
    panels = [(title, expr) for title, expr in substituted
              if not any(m.startswith(gpu) for m in alerts.expression_metrics(expr))]
    empty = [title for title, expr in panels if not query(monitor_host, expr)]
    # The lab's hosts are nspawn containers, whose system call filter denies adjtimex(2) even to
    # root: the node exporter's timex collector (node_timex_*) has nothing to read there.
    not_in_lab = ("node_timex_",)
    metrics = sorted(m for m in alerts.metric_names(alerts.render_rules({})) if not m.startswith(gpu + not_in_lab))
    missing = [m for m in metrics if not query(monitor_host, f'count({{__name__="{m}"}})')]
    print(f"\n{len(panels)} dashboard queries and {len(metrics)} alert-rule metrics checked against Prometheus "
          f"(GPU ones left to the fixtures): {len(empty)} empty panels, {len(missing)} metrics without series")
    assert empty == [] and missing == [], (empty, missing)


def test_the_status_view_shows_every_instance_up_with_its_release(monitor_host):
    import subprocess
    import sys

    from tests.lab.labkit import REPO

    done = subprocess.run([sys.executable, "-m", "roles.cli", "status", "inventories/lab.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    print("\n" + done.stdout)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert sorted(row[0] for row in rows) == ["lab1:a", "lab1:b", "lab2:a"]
    assert all(row[1] == "up" and row[2].startswith("cpu-vllm-") for row in rows), rows


def test_the_direct_status_view_reads_every_instance_on_its_host(monitor_host):
    """--direct: each lab host's instances sampled on the host itself (over ssh), not from Prometheus."""
    import subprocess
    import sys

    from tests.lab.labkit import REPO

    done = subprocess.run([sys.executable, "-m", "roles.cli", "status", "inventories/lab.py", "--direct",
                           "--window", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    print("\n" + done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "straight from the instances, sampled over 5 s:"
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert sorted(row[0] for row in rows) == ["lab1:a", "lab1:b", "lab2:a"]
    assert all(row[1] == "up" and row[2].startswith("cpu-vllm-") and row[3] != "-" for row in rows), rows
