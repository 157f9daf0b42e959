"""Grafana on the fleet's monitor hosts, planned from the inventory alone: the hosts of the
``grafana`` group get it, each of them a ``monitor`` host too, since the datasource it is
provisioned with (``dashboards/provisioning/datasource.yml``) is the Prometheus on its own
loopback (``monitoring.PROMETHEUS_ADDRESS``), which never listens anywhere else.

Nothing is installed without a grafana group. A grafana host is refused before any host is
touched when it is no monitor host, when the inventory gives no Grafana repository (the
distributions' archives do not serve Grafana) or no pinned version, when its port is taken on
the host, and when it would listen off loopback for anyone: such a listen address needs
``grafana_allow_from``, which the host firewall opens Grafana's port to (and nobody else).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from roles import paths
from roles.errors import FleetConfigError
from roles.plan import monitoring, settings

if TYPE_CHECKING:
    from roles.plan.fleet import FleetPlan

GRAFANA_GROUP = "grafana"


@dataclass(frozen=True)
class GrafanaPlan:
    hosts: tuple[str, ...]  # the grafana group: where Grafana runs, each a monitor host


def listens_on_loopback(data: Mapping[str, Any]) -> bool:
    return ipaddress.ip_address(settings.value(data, "grafana_listen_address")).is_loopback


def opened_port(data: Mapping[str, Any]) -> int | None:
    """The port the host firewall opens to ``grafana_allow_from`` on a grafana host: Grafana's,
    where it listens off loopback; None where it listens on loopback (nothing opens)."""
    return None if listens_on_loopback(data) else settings.value(data, "grafana_port")


def plan_grafana(fleet: FleetPlan, hosts: Iterable[tuple[str, Mapping[str, Any]]], grafana_hosts: Iterable[str],
                 monitor_hosts: Iterable[str]) -> GrafanaPlan | None:
    """The grafana group's plan (None without one). ``hosts``: (name, data) of every host of the
    inventory; ``monitor_hosts``: the monitor group's names."""
    names = tuple(grafana_hosts)
    if not names:
        return None
    data_of, monitors = dict(hosts), set(monitor_hosts)
    for name in names:
        if name not in monitors:
            raise FleetConfigError(
                f"host {name}: inventory group `{GRAFANA_GROUP}`",
                f"holds {name}, which is not in the `monitor` group: Grafana's datasource is the Prometheus on its "
                f"own host's loopback ({monitoring.PROMETHEUS_ADDRESS}), and only monitor hosts run Prometheus.",
                f"put {name} in the `monitor` group too, or take it out of `{GRAFANA_GROUP}`.")
        check_grafana_host(name, data_of[name], monitoring.taken_ports(fleet, name, data_of[name]))
    return GrafanaPlan(hosts=names)


def check_grafana_host(name: str, data: Mapping[str, Any], taken: Mapping[int, str]) -> None:
    """Refuse what Grafana cannot be installed or reached with on host ``name``; ``taken``: the
    ports others listen on there, and what listens."""
    where = f"host {name}"
    if not settings.value(data, "grafana_repo_url"):
        raise FleetConfigError(f"{where}: `grafana_repo_url`",
                               "is not set; Grafana comes from it (the distributions' archives do not serve it).",
                               "set it to your mirror of Grafana's apt repository (e.g. "
                               f"https://mirror.example.internal/grafana), or take {name} out of the "
                               f"`{GRAFANA_GROUP}` group.")
    if not settings.value(data, "grafana_version"):
        raise FleetConfigError(f"{where}: `grafana_version`",
                               "is not set, so nothing would say which Grafana is installed: each host would get "
                               "what the repository serves that day, and a newer Grafana migrates its database one "
                               "way.", "set it to the version to run, as `apt-cache policy grafana` lists it on the "
                                       "host (e.g. 12.1.1).")
    port = settings.value(data, "grafana_port")
    if port in taken:
        raise FleetConfigError(f"{where}: `grafana_port`", f"is {port}, where {taken[port]} listens on this host.",
                               f"set grafana_port to a free port (the default is "
                               f"{settings.BY_NAME['grafana_port'].default}).")
    _check_reach(where, data)


def _check_reach(where: str, data: Mapping[str, Any]) -> None:
    """Grafana listens on loopback, or for ``grafana_allow_from`` alone through the host firewall."""
    address, allowed = settings.value(data, "grafana_listen_address"), settings.value(data, "grafana_allow_from")
    if listens_on_loopback(data):
        if allowed:
            raise FleetConfigError(f"{where}: `grafana_allow_from`",
                                   f"is set, but Grafana listens on loopback ({address}): nothing is opened to it.",
                                   "remove grafana_allow_from (reach Grafana with `ssh -L`), or set "
                                   "grafana_listen_address to the address those sources reach.")
        return
    if not allowed:
        raise FleetConfigError(f"{where}: `grafana_listen_address`",
                               f"is {address}, off loopback, but grafana_allow_from is empty: Grafana serves plain "
                               "HTTP, and the host firewall opens its port to no one unless you name who.",
                               "set grafana_allow_from to the addresses or networks of those who look (e.g. your "
                               "bastion's), or keep grafana_listen_address at 127.0.0.1 and use `ssh -L`.")
    if not settings.value(data, "firewall_enabled"):
        raise FleetConfigError(f"{where}: `grafana_listen_address`",
                               f"is {address}, off loopback, and firewall_enabled is false: nothing would keep "
                               "Grafana to grafana_allow_from.",
                               "set firewall_enabled to true, or keep grafana_listen_address at 127.0.0.1.")


def grafana_ini(data: Mapping[str, Any]) -> str:
    """/etc/grafana/grafana.ini for a grafana host with settings ``data``. Its secrets are not in
    it: Grafana reads them from their own root-only files ($__file{...})."""
    root_url = settings.value(data, "grafana_root_url")
    return "\n".join([
        "# Managed by vllm-fleet (roles/grafana.py), rendered from the inventory. Grafana's own defaults",
        "# (/usr/share/grafana/conf/defaults.ini) hold for everything not set here.",
        "[server]",
        f"http_addr = {settings.value(data, 'grafana_listen_address')}",
        f"http_port = {settings.value(data, 'grafana_port')}",
        *([f"root_url = {root_url}"] if root_url else []),
        "",
        "[security]",
        f"admin_user = {settings.value(data, 'grafana_admin_user')}",
        # Taken when Grafana creates its administrator, on its first start.
        f"admin_password = $__file{{{paths.GRAFANA_ADMIN_PASSWORD}}}",
        # Signs and encrypts what Grafana stores; its packaged default is the same everywhere.
        f"secret_key = $__file{{{paths.GRAFANA_SECRET_KEY}}}",
        "disable_gravatar = true",
        "",
        "[users]",
        "allow_sign_up = false",
        "",
        "[auth.anonymous]",
        "enabled = false",
        "",
        # It phones nowhere: no usage report, no update or plugin checks, no news feed, no snapshots
        # published outside, no plugin downloaded (preinstalled, updated or from the catalog).
        "[analytics]",
        "reporting_enabled = false",
        "check_for_updates = false",
        "check_for_plugin_updates = false",
        "feedback_links_enabled = false",
        "",
        "[news]",
        "news_feed_enabled = false",
        "",
        "[snapshots]",
        "external_enabled = false",
        "",
        "[plugins]",
        "preinstall_disabled = true",
        "public_key_retrieval_disabled = true",
        "plugin_admin_enabled = false",
    ]) + "\n"
