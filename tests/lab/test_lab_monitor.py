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

from tests.lab.labkit import bring_up_lab, run_deploy, ssh

pytestmark = pytest.mark.lab

QUERY = ("import json, sys, urllib.parse, urllib.request as u; "
         "print(u.urlopen('http://127.0.0.1:9090/api/v1/' + sys.argv[1], timeout=30).read().decode())")


@pytest.fixture(scope="module")
def monitor_host():
    lab = bring_up_lab()
    deploy = run_deploy()
    assert deploy.returncode == 0, deploy.output[-5000:]
    return lab["hosts"][-1]["name"]


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
    from roles.plan.metrics import exposed_names, release_metrics
    from tests.lab.labkit import REPO

    lb = load_state()["hosts"][0]
    release = ssh(lb["name"], "cat /opt/vllm-fleet/instances/a/.release")
    page = ssh(lb["name"], "python3 -c \"import urllib.request as u; "
                           f"print(u.urlopen('http://{lb['address']}:8001/metrics', timeout=30).read().decode())\"")
    live = {name for name in exposed_names(page) if name.startswith("vllm:")}
    listed = release_metrics(release, REPO / "inventories" / "releases")
    print(f"\n{release}: {len(live)} vLLM sample names served, {len(listed)} listed")
    assert live == listed, (sorted(live - listed), sorted(listed - live))
