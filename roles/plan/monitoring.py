"""What the fleet's monitoring collects, planned from the inventory alone: Prometheus's scrape
targets (every instance's /metrics, every host's node exporter, every load balancer's nginx
exporter) with the labels dashboards and alert rules group by, and Alertmanager's receiver.

Adding a host or an instance to the inventory adds its targets; nothing here reads a host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import yaml

from roles.common import endpoint
from roles.plan import consistency, settings

if TYPE_CHECKING:
    from roles.plan.fleet import FleetPlan

NODE_EXPORTER_PORT = 9100
NGINX_EXPORTER_PORT = 9113
# nginx's own counters, served on loopback for the nginx exporter.
STUB_STATUS_PORT = 8081
# Prometheus and Alertmanager listen on the monitor host's loopback only: reach them through ssh
# (`ssh -L 9090:127.0.0.1:9090 HOST`) or a proxy of your own; nothing new is open to the network.
PROMETHEUS_ADDRESS = "127.0.0.1:9090"
ALERTMANAGER_ADDRESS = "127.0.0.1:9093"
RULES_FILE = "/etc/prometheus/vllm-fleet-rules.yml"


@dataclass(frozen=True)
class Target:
    address: str  # ADDRESS:PORT as Prometheus scrapes it
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class MonitorPlan:
    hosts: tuple[str, ...]  # the monitor group: where Prometheus and Alertmanager run
    jobs: tuple[tuple[str, tuple[Target, ...]], ...]  # job name -> its targets

    def targets(self, job: str) -> tuple[Target, ...]:
        return dict(self.jobs)[job]


def plan_monitoring(fleet: FleetPlan, hosts: Iterable[tuple[str, Mapping[str, Any]]],
                    monitor_hosts: Iterable[str]) -> MonitorPlan | None:
    """The scrape targets of a fleet whose inventory has a monitor group (None without one).
    ``hosts``: (name, data) of every host of the inventory: each runs a node exporter."""
    monitors = tuple(monitor_hosts)
    if not monitors:
        return None
    hosts = list(hosts)
    vllm = tuple(Target(endpoint(h.address, i.port), (("host", h.name), ("instance_name", i.name),
                                                       ("model", fleet.served_model_name),
                                                       ("release", h.release.name)))
                 for h in fleet.hosts for i in h.serving)
    addresses = {name: consistency.advertised_address(name, data) for name, data in hosts}
    node = tuple(Target(endpoint(address, NODE_EXPORTER_PORT), (("host", name),)) for name, address in addresses.items())
    nginx = tuple(Target(endpoint(addresses[name], NGINX_EXPORTER_PORT), (("host", name),)) for name in fleet.lb_hosts)
    return MonitorPlan(hosts=monitors, jobs=(("vllm", vllm), ("node", node), ("nginx", nginx)))


def prometheus_config(plan: MonitorPlan, data: Mapping[str, Any]) -> str:
    """prometheus.yml for a monitor host with settings ``data``."""
    interval = f"{settings.value(data, 'monitor_scrape_interval')}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [RULES_FILE],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [ALERTMANAGER_ADDRESS]}]}]},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [t.address], "labels": dict(t.labels)} for t in targets]}
            for job, targets in plan.jobs if targets],
    }
    return "# Managed by vllm-fleet (roles/monitor.py), rendered from the inventory.\n" + \
        yaml.safe_dump(config, sort_keys=False)


def alertmanager_config(data: Mapping[str, Any]) -> str:
    """alertmanager.yml: every alert to monitor_webhook_url, or to no receiver (alerts are then
    only listed by Alertmanager itself)."""
    webhook = settings.value(data, "monitor_webhook_url")
    receiver: dict[str, Any] = {"name": "vllm-fleet"}
    if webhook:
        receiver["webhook_configs"] = [{"url": webhook, "send_resolved": True}]
    config = {
        "route": {"receiver": "vllm-fleet", "group_by": ["alertname", "host"], "group_wait": "10s",
                  "group_interval": "1m", "repeat_interval": "4h"},
        "receivers": [receiver],
    }
    return "# Managed by vllm-fleet (roles/monitor.py), rendered from the inventory.\n" + \
        yaml.safe_dump(config, sort_keys=False)


def taken_ports(fleet: FleetPlan, name: str, data: Mapping[str, Any]) -> dict[int, str]:
    """The TCP ports the fleet's services listen on on host ``name``: exporters, Prometheus and
    Alertmanager (on monitor hosts), instances, nginx, the artifact cache."""
    taken = {NODE_EXPORTER_PORT: "the node exporter",
             int(PROMETHEUS_ADDRESS.rsplit(":", 1)[1]): "Prometheus",
             int(ALERTMANAGER_ADDRESS.rsplit(":", 1)[1]): "Alertmanager"}
    host_plan = fleet.host(name)
    taken.update({i.port: f"instance {i.name}" for i in (host_plan.instances if host_plan else ())})
    if name in fleet.lb_hosts:
        taken.update({NGINX_EXPORTER_PORT: "the nginx exporter",
                      STUB_STATUS_PORT: "nginx's stub_status"})
        taken.update({settings.value(data, s): f"nginx ({s})" for s in ("nginx_listen_port", "nginx_http_redirect_port")
                      if settings.value(data, s) is not None})
    if fleet.cache is not None and fleet.cache.host == name:
        taken[fleet.cache.port] = "the artifact cache (cache_port)"
    return taken
