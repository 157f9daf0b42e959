"""The monitoring roles, from the distribution's packages: a node exporter on every host, an nginx
exporter on load balancers, Prometheus and Alertmanager on the hosts of the ``monitor`` group.

Nothing here runs without a monitor group: no exporter listens where nobody scrapes it. The
exporters answer the monitoring hosts only (the host firewall); Prometheus and Alertmanager
listen on the monitor host's loopback. Every configuration is checked by the service's own
tool (promtool, amtool) before it replaces the running one.
"""

from __future__ import annotations

from io import StringIO

import jinja2

from pyinfra.api import deploy
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from roles import paths
from roles.checked_files import checked_file
from roles.plan import alerts, monitoring, settings
from roles.plan.monitoring import MonitorPlan
from roles.platform import install_packages
from roles.private_files import private_file

TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
# The units the node exporter's systemd collector reports (active, failed...), for the alerts.
UNITS = "(vllm@.+|nginx|vllm-fleet-firewall)[.]service"
# The packaged units run as this user; it reads the configurations.
SERVICE_USER = "prometheus"
# Where Debian's and Ubuntu's Alertmanager keeps silences and notification state.
ALERTMANAGER_DATA = "/var/lib/prometheus/alertmanager"
_HARDENING = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES / "prometheus"), trim_blocks=True,
                                keep_trailing_newline=True, undefined=jinja2.StrictUndefined
                                ).get_template("hardening.conf.j2")


def _defaults(name: str, args: list[str]) -> str:
    """/etc/default/NAME, which the distribution's unit passes to the daemon as $ARGS."""
    return f'# Managed by vllm-fleet (roles/monitor.py).\nARGS="{" ".join(args)}"\n'


def _service(package: str, *configuration, writable: tuple[str, ...] = (), hide_processes: bool = True) -> None:
    """The packaged service sandboxed (a drop-in; ``writable``: the folders it writes), running
    and enabled, restarted when its sandbox, arguments or configuration (the operations
    ``configuration``) changed. Whether they did is known only once they ran: an ``_if=``
    callable, never ``did_change()`` while the deploy is being prepared."""
    unit = f"{package}.service"
    sandbox = files.put(name=f"Sandbox {unit}", dest=f"/etc/systemd/system/{unit}.d/vllm-fleet-hardening.conf",
                        src=StringIO(_HARDENING.render(unit=unit, writable=writable, hide_processes=hide_processes)),
                        create_remote_dir=True)
    systemd.daemon_reload(name="Reload systemd units", _if=sandbox.did_change)
    configuration = (sandbox, *configuration)
    systemd.service(name=f"Run {package}", service=package, running=True, enabled=True)
    systemd.service(name=f"Restart {package} on its new configuration", service=package, restarted=True,
                    _if=any_changed(*configuration))


@deploy("Node exporter")
def node_exporter():
    install_packages("Install the node exporter", ["prometheus-node-exporter"], no_recommends=True)
    files.directory(name=f"Directory {TEXTFILE_DIR}", path=TEXTFILE_DIR, mode="755")
    defaults = files.put(name="Node exporter arguments", dest="/etc/default/prometheus-node-exporter",
                         src=StringIO(_defaults("prometheus-node-exporter", [
                             "--collector.systemd", f"--collector.systemd.unit-include={UNITS}",
                             f"--collector.textfile.directory={TEXTFILE_DIR}"])))
    _service("prometheus-node-exporter", defaults, hide_processes=False)


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
    _service("prometheus-nginx-exporter", defaults)


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
    _service("prometheus", prometheus_args, rules, config, writable=(storage,))
    # The webhook URL may carry a token (chat and paging bridges put one in the path).
    receiver = private_file(name="Alertmanager receiver", path="/etc/prometheus/alertmanager.yml",
                            content=monitoring.alertmanager_config(data), group=SERVICE_USER)
    alertmanager_args = files.put(name="Alertmanager arguments", dest="/etc/default/prometheus-alertmanager",
                                  src=StringIO(_defaults("prometheus-alertmanager", [
                                      f"--web.listen-address={monitoring.ALERTMANAGER_ADDRESS}",
                                      # One Alertmanager, no cluster: nothing listens on its gossip port.
                                      "--cluster.listen-address="])))
    _service("prometheus-alertmanager", alertmanager_args, receiver, writable=(ALERTMANAGER_DATA,))
