"""The monitoring roles, from the distribution's packages: a node exporter on every host, an nginx
exporter on load balancers, Prometheus and Alertmanager on the hosts of the ``monitor`` group.

Nothing here runs without a monitor group: no exporter listens where nobody scrapes it. The
exporters answer the monitoring hosts only (the host firewall); Prometheus and Alertmanager
listen on the monitor host's loopback. Every configuration is checked by the service's own
tool (promtool, amtool) before it replaces the running one.

What no packaged exporter reports is written into the node exporter's textfile directory by the
fleet's own scripts, each run by a sandboxed oneshot service and a timer every scrape interval:
``gpu_metrics.py`` on NVIDIA hosts (NVML readings, XID events), ``edge_metrics.py`` on load
balancers (responses by status from nginx's log, the upstreams' health).
"""

from __future__ import annotations

import shlex
from io import StringIO

import jinja2

from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from roles import paths
from roles.checked_files import checked_file
from roles.plan import alerts, monitoring, settings
from roles.plan.fleet import HostPlan
from roles.plan.monitoring import MonitorPlan
from roles.platform import install_packages
from roles.private_files import private_file
from roles.sandbox import sandboxed_service

TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
# The units the node exporter's systemd collector reports (active, failed...), for the alerts.
UNITS = "(vllm@.+|nginx|vllm-fleet-firewall)[.]service"
# The packaged units run as this user; it reads the configurations.
SERVICE_USER = "prometheus"
# Where Debian's and Ubuntu's Alertmanager keeps silences and notification state.
ALERTMANAGER_DATA = "/var/lib/prometheus/alertmanager"
_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES / "prometheus"), trim_blocks=True,
                                keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
# The textfile scripts' units (NAME.service and NAME.timer), and what each writes where. Each
# keeps its state in a StateDirectory= of its own, under /var/lib.
GPU_METRICS_UNIT = "vllm-fleet-gpu-metrics"
GPU_TEXTFILE = f"{TEXTFILE_DIR}/vllm-fleet-gpu.prom"
GPU_STATE_DIR = "vllm-fleet/gpu-metrics"
GPU_STATE = f"/var/lib/{GPU_STATE_DIR}/xid-state.json"
EDGE_METRICS_UNIT = "vllm-fleet-edge-metrics"
EDGE_TEXTFILE = f"{TEXTFILE_DIR}/vllm-fleet-edge.prom"
EDGE_STATE_DIR = "vllm-fleet/edge-metrics"
EDGE_STATE = f"/var/lib/{EDGE_STATE_DIR}/state.json"
# nginx's access log in the fleet's format (templates/nginx-vllm-fleet.conf.j2), readable by the
# adm group (Debian's and Ubuntu's nginx create it www-data:adm 0640).
EDGE_ACCESS_LOG = "/var/log/nginx/vllm-fleet.access.log"


def _defaults(name: str, args: list[str]) -> str:
    """/etc/default/NAME, which the distribution's unit passes to the daemon as $ARGS."""
    return f'# Managed by vllm-fleet (roles/monitor.py).\nARGS="{" ".join(args)}"\n'


@deploy("Node exporter")
def node_exporter():
    install_packages("Install the node exporter", ["prometheus-node-exporter"], no_recommends=True)
    files.directory(name=f"Directory {TEXTFILE_DIR}", path=TEXTFILE_DIR, mode="755")
    defaults = files.put(name="Node exporter arguments", dest="/etc/default/prometheus-node-exporter",
                         src=StringIO(_defaults("prometheus-node-exporter", [
                             "--collector.systemd", f"--collector.systemd.unit-include={UNITS}",
                             f"--collector.textfile.directory={TEXTFILE_DIR}"])))
    sandboxed_service("prometheus-node-exporter", defaults, hide_processes=False, reads_clock=True)


@deploy("nginx exporter")
def nginx_exporter():
    # The arguments before the package: its maintainer script starts the exporter at once, and with
    # the packaged ARGS="" it asks 127.0.0.1:8080, where nothing answers, so it exits, is restarted
    # by its unit until systemd's start limit stops it, and a `systemctl start` in the next seconds
    # is refused. Already in place, the file is kept by dpkg (--force-confold) and read at that
    # first start. Two dashes: versions before 1.0 (Debian 12, Ubuntu 22.04) parse flags with Go's
    # flag package, which takes one or two; 1.0 and later (Ubuntu 24.04 ships 1.1) take two only.
    defaults = files.put(name="nginx exporter arguments", dest="/etc/default/prometheus-nginx-exporter",
                         src=StringIO(_defaults("prometheus-nginx-exporter", [
                             f"--nginx.scrape-uri=http://127.0.0.1:{monitoring.STUB_STATUS_PORT}/stub_status"])))
    install_packages("Install the nginx exporter", ["prometheus-nginx-exporter"], no_recommends=True)
    sandboxed_service("prometheus-nginx-exporter", defaults)


@deploy("Prometheus and Alertmanager")
def monitor_server(plan: MonitorPlan, data):
    """Prometheus scraping every target of ``plan`` with the fleet's alert rules, Alertmanager
    sending to monitor_webhook_url."""
    install_packages("Install Prometheus and Alertmanager", ["prometheus", "prometheus-alertmanager"],
                     no_recommends=True)
    storage = settings.value(data, "monitor_storage_path")
    files.directory(name=f"Directory {storage}", path=storage, user=SERVICE_USER, group=SERVICE_USER, mode="750")
    rules = checked_file(name="Alert rules (checked with promtool)", text=alerts.render_rules(data),
                         path=monitoring.RULES_FILE, check="promtool check rules {}")
    config = checked_file(name="Prometheus scrape targets (checked with promtool)",
                          text=monitoring.prometheus_config(plan, data), path="/etc/prometheus/prometheus.yml",
                          check="promtool check config {}")
    prometheus_args = files.put(name="Prometheus arguments", dest="/etc/default/prometheus", src=StringIO(_defaults(
        "prometheus", [f"--storage.tsdb.path={storage}",
                       f"--storage.tsdb.retention.time={settings.value(data, 'monitor_retention')}",
                       f"--web.listen-address={monitoring.PROMETHEUS_ADDRESS}"])))
    # Targets and rules by a reload: a restart would leave a removed target's last samples current
    # for five minutes (no staleness marks), and `vllm-fleet status` would show it DOWN.
    sandboxed_service("prometheus", prometheus_args, writable=(storage,), reloadable=(rules, config))
    # The webhook URL may carry a token (chat and paging bridges put one in the path): a private
    # file, which amtool checks before it replaces the running one as promtool does Prometheus's.
    receiver = private_file(name="Alertmanager receiver (checked with amtool)",
                            path="/etc/prometheus/alertmanager.yml", content=monitoring.alertmanager_config(data),
                            group=SERVICE_USER, check="amtool check-config {}")
    alertmanager_args = files.put(name="Alertmanager arguments", dest="/etc/default/prometheus-alertmanager",
                                  src=StringIO(_defaults("prometheus-alertmanager", [
                                      f"--web.listen-address={monitoring.ALERTMANAGER_ADDRESS}",
                                      # One Alertmanager, no cluster: nothing listens on its gossip port.
                                      "--cluster.listen-address="])))
    sandboxed_service("prometheus-alertmanager", alertmanager_args, receiver, writable=(ALERTMANAGER_DATA,))


# ---- the fleet's own textfile scripts, run by timers ---------------------------------------------

def _exec_start(args: list[str]) -> str:
    """An ExecStart= value: quoted as systemd unquotes it, '%' (its specifiers) doubled."""
    return shlex.join(args).replace("%", "%%")


def _units(name: str, description: str, command: list[str], interval: int, **sandbox) -> tuple[str, str]:
    """NAME.service (a oneshot run of ``command`` in its ``sandbox``) and NAME.timer (every
    ``interval`` seconds)."""
    service = _TEMPLATES.get_template("textfile-exporter.service.j2").render(
        name=name, description=description, command=_exec_start(command), timeout=120, textfile_dir=TEXTFILE_DIR,
        **sandbox)
    timer = _TEMPLATES.get_template("textfile-exporter.timer.j2").render(name=name, description=description,
                                                                         interval=interval)
    return service, timer


def gpu_metrics_units(host_plan: HostPlan) -> tuple[str, str]:
    """The GPU textfile's service and timer for an NVIDIA host: gpu_metrics.py as root, with the
    release venv's python (nvidia-ml-py is there) through the host's ``current`` link, so that
    it follows the release."""
    python = f"{host_plan.get('vllm_install_dir')}/current/bin/python"
    command = [python, "-I", paths.GPU_METRICS_PATH, "--out", GPU_TEXTFILE, "--expected-count",
               str(host_plan.get("vllm_gpu_count") or 1), "--state", GPU_STATE]
    return _units(GPU_METRICS_UNIT, "NVML readings and XID events of the GPUs", command,
                  host_plan.get("monitor_scrape_interval"), gpu=True, after=["nvidia-persistenced.service"],
                  owned="the textfile directory and the journal's files (the kernel's XID lines)", groups=[],
                  state_directory=GPU_STATE_DIR,
                  # No network; AF_UNIX for the system's own sockets (journal, persistence daemon).
                  address_families="AF_UNIX")


def edge_metrics_units(upstreams: list[str], interval: int) -> tuple[str, str]:
    """The edge textfile's service and timer for a load balancer whose nginx upstream is
    ``upstreams`` (ADDRESS:PORT each): edge_metrics.py with the system's python3."""
    command = ["/usr/bin/python3", "-I", paths.EDGE_METRICS_PATH, "--log", EDGE_ACCESS_LOG, "--out", EDGE_TEXTFILE,
               "--state", EDGE_STATE, *[arg for u in upstreams for arg in ("--upstream", u)]]
    return _units(EDGE_METRICS_UNIT, "Responses by status and upstream health of the edge", command, interval,
                  gpu=False, after=["nginx.service"], owned="the textfile directory", groups=["adm"],
                  state_directory=EDGE_STATE_DIR,
                  # TCP to the instances' /health; AF_UNIX for the system's own sockets (journal, name lookups).
                  address_families="AF_UNIX AF_INET AF_INET6")


def _textfile_timer(name: str, service_text: str, timer_text: str, scripts=()) -> None:
    """NAME.service and NAME.timer in place, the service run once when it (or one of its
    ``scripts``, operations) changed, so that a sandbox keeping the script from what it needs
    fails the deploy rather than every run after it, then the timer running and enabled."""
    service = files.put(name=f"Unit {name}.service", dest=f"/etc/systemd/system/{name}.service",
                        src=StringIO(service_text))
    timer = files.put(name=f"Unit {name}.timer", dest=f"/etc/systemd/system/{name}.timer", src=StringIO(timer_text))
    systemd.daemon_reload(name="Reload systemd units", _if=any_changed(service, timer))
    server.shell(name=f"Run {name}.service once (proves it in its sandbox)",
                 commands=[f"systemctl start {name}.service"], _if=any_changed(service, *scripts))
    systemd.service(name=f"Run {name}.timer", service=f"{name}.timer", running=True, enabled=True)
    systemd.service(name=f"Restart {name}.timer on its new schedule", service=f"{name}.timer", restarted=True,
                    _if=timer.did_change)


@deploy("GPU metrics timer")
def gpu_metrics(host_plan: HostPlan):
    """gpu_metrics.py (installed with the GPU health checks, beside gpu_probe.py and textfile.py)
    every scrape interval into the textfile directory."""
    _textfile_timer(GPU_METRICS_UNIT, *gpu_metrics_units(host_plan))


@deploy("Edge metrics timer")
def edge_metrics(upstreams: list[str], data):
    """edge_metrics.py every scrape interval (``data``: the load balancer's settings) into the
    textfile directory, probing ``upstreams``."""
    install_packages("Install python3 (edge_metrics.py runs on the system's)", ["python3"], no_recommends=True)
    script = files.put(name="Install edge_metrics.py", src=str(paths.EDGE_METRICS), dest=paths.EDGE_METRICS_PATH,
                       mode="755", create_remote_dir=True)
    # Beside it, the module it writes the textfile with (a module only: not executable).
    module = files.put(name="Install textfile.py (edge_metrics.py imports it)", src=str(paths.TEXTFILE),
                       dest=paths.TEXTFILE_PATH, mode="644", create_remote_dir=True)
    _textfile_timer(EDGE_METRICS_UNIT, *edge_metrics_units(upstreams, settings.value(data, "monitor_scrape_interval")),
                    scripts=(script, module))
