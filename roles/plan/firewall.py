"""The host firewall of one fleet host, planned from inventory data alone: which TCP ports are
open to everyone, which only to the load balancers and the monitoring hosts, Grafana's to the
sources the inventory names (only where it listens off loopback), the artifact cache's to the
fleet's hosts, an instance group's to the group's other hosts, and SSH.

``roles/firewall.py`` renders the plan into one nftables table (``inet vllm_fleet``) and loads it.
The plan never needs a host; what it cannot express is refused here with a ``FleetConfigError``:

- a peer (load balancer, instance group member) address that is a name, not an IP: nft resolves a
  name once, when the rules load, so a later change of address would silently lock that peer out;
- a port open to everyone that is also an instance's port: it would let any client past the
  load balancer (its keys, rate limits and TLS) straight to the instance; or an instance group's
  rendezvous port: any host could join the group.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from roles.errors import FleetConfigError
from roles.plan import consistency, grafana, settings
from roles.plan.groups import group_stage
from roles.plan.monitoring import NGINX_EXPORTER_PORT, NODE_EXPORTER_PORT

if TYPE_CHECKING:
    from roles.plan.fleet import FleetPlan, Instance

# The one table vllm-fleet owns in a host's ruleset; every other table is the operator's.
TABLE = "inet vllm_fleet"
DEFAULT_SSH_PORT = 22
# Linux's default net.ipv4.ip_local_port_range: what an instance group plans with, replaced by the
# host's own range at deploy time (``FirewallPlan.with_local_port_range``).
LINUX_LOCAL_PORT_RANGE = (32768, 60999)


@dataclass(frozen=True)
class PeerAddress:
    """Where a peer host's connections come from: its advertised address, as the inventory gives
    it (``vllm_advertise_address``, else ``ssh_hostname``, else its name)."""

    host: str
    address: str
    source: str  # the setting the address comes from, for messages


@dataclass(frozen=True)
class Source:
    """One source address (or network) allowed to the instance ports, canonical (``ipaddress``' compressed form)."""

    address: str
    version: int  # 4 or 6
    host: str
    role: str  # "load balancer", "monitoring host"


@dataclass(frozen=True)
class FirewallPlan:
    host: str
    ssh_ports: tuple[int, ...]  # open to everyone, before anything that could drop
    open_tcp: tuple[int, ...]  # open to everyone: the edge's ports on load balancers, firewall_allow_tcp
    instance_ports: tuple[int, ...]  # open to ``sources`` only
    sources: tuple[Source, ...] = ()
    # Exporters (node, nginx) the monitoring hosts scrape: open to ``monitor_sources`` only.
    exporter_ports: tuple[int, ...] = ()
    monitor_sources: tuple[Source, ...] = ()
    # Grafana's port where it listens off loopback: open to grafana_allow_from (networks, canonical) only.
    grafana_port: int | None = None
    grafana_sources: tuple[str, ...] = ()
    # The artifact cache's port on the cache host: open to its allowed sources (the fleet's hosts) only.
    cache_port: int | None = None
    cache_sources: tuple[str, ...] = ()
    # The stage of an instance group this host runs (vllm_instance_groups): open to the group's other
    # hosts (``group_sources``) only. On the leader its rendezvous (master_port) and API port; on
    # every host the ephemeral range, where gloo, NCCL and vLLM's message queues listen.
    group: str | None = None
    group_master_port: int | None = None
    group_api_port: int | None = None
    group_port_range: tuple[int, int] = LINUX_LOCAL_PORT_RANGE
    group_sources: tuple[Source, ...] = ()

    @property
    def sources_v4(self) -> tuple[str, ...]:
        return _addresses(self.sources, 4)

    @property
    def sources_v6(self) -> tuple[str, ...]:
        return _addresses(self.sources, 6)

    @property
    def monitor_sources_v4(self) -> tuple[str, ...]:
        return _addresses(self.monitor_sources, 4)

    @property
    def monitor_sources_v6(self) -> tuple[str, ...]:
        return _addresses(self.monitor_sources, 6)

    @property
    def grafana_sources_v4(self) -> tuple[str, ...]:
        return _of_version(self.grafana_sources, 4)

    @property
    def grafana_sources_v6(self) -> tuple[str, ...]:
        return _of_version(self.grafana_sources, 6)

    @property
    def cache_sources_v4(self) -> tuple[str, ...]:
        return _of_version(self.cache_sources, 4)

    @property
    def cache_sources_v6(self) -> tuple[str, ...]:
        return _of_version(self.cache_sources, 6)

    @property
    def group_sources_v4(self) -> tuple[str, ...]:
        return _addresses(self.group_sources, 4)

    @property
    def group_sources_v6(self) -> tuple[str, ...]:
        return _addresses(self.group_sources, 6)

    @property
    def group_ports(self) -> tuple[str, ...]:
        """The instance group's ports as nft takes them ("29500", "32768-60999"); empty without a
        group. A port inside the range is left to the range: an nft set takes no overlapping items."""
        if self.group is None:
            return ()
        low, high = self.group_port_range
        ports = sorted(p for p in (self.group_master_port, self.group_api_port)
                       if p is not None and not low <= p <= high)
        return (*map(str, ports), f"{low}-{high}")

    def with_local_port_range(self, low: int, high: int) -> FirewallPlan:
        """The plan with the host's own ephemeral range (net.ipv4.ip_local_port_range, read from the
        host at deploy time) open to its instance group: gloo, NCCL and vLLM's message queues listen
        on ports the kernel picks from it, so a range narrowed or moved by the operator is the one
        to open. A host without a group opens none."""
        return self if self.group is None else replace(self, group_port_range=(low, high))

    def with_ssh_ports(self, ports: Iterable[int]) -> FirewallPlan:
        """The plan with more SSH ports kept open: those the host's sshd listens on, read from the
        host at deploy time, so a port the inventory does not know never locks the operator out."""
        ssh = {*self.ssh_ports, *ports}
        return replace(self, ssh_ports=tuple(sorted(ssh)), open_tcp=tuple(p for p in self.open_tcp if p not in ssh))


def _addresses(sources: tuple[Source, ...], version: int) -> tuple[str, ...]:
    """The addresses of the IPv4 (4) or IPv6 (6) ones of ``sources``: a rule of its own each."""
    return tuple(s.address for s in sources if s.version == version)


def _of_version(networks: tuple[str, ...], version: int) -> tuple[str, ...]:
    """The IPv4 (4) or IPv6 (6) ones of ``networks``: nft takes each family in a rule of its own."""
    return tuple(n for n in networks if ipaddress.ip_network(n).version == version)


def peer_addresses(hosts: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[PeerAddress, ...]:
    """The addresses of peer hosts (the load balancers: pass (name, data) of each host of the
    ``lb`` group) that the instance hosts' firewalls let in. Nothing is refused here but a
    malformed address: a name is refused by ``plan_firewall`` only where a firewall needs it."""
    return tuple(PeerAddress(name, consistency.advertised_address(name, data), _address_source(data))
                 for name, data in hosts)


def _address_source(data: Mapping[str, Any]) -> str:
    return next((key for key in ("vllm_advertise_address", "ssh_hostname") if data.get(key)), "the host name")


def _port(host_name: str, setting: str, value: Any) -> int:
    """A TCP port as the rules file takes it: the settings table checks vllm-fleet's own, this
    checks them again where they reach a file root loads, and pyinfra's ``ssh_port`` (an int, or
    digits as some inventories write it)."""
    number = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
        hint = ": the one the host's sshd listens on (unset: 22)" if setting == "ssh_port" else ""
        raise FleetConfigError(f"host {host_name}: `{setting}`", f"{value!r} is not a TCP port (1 to 65535).",
                               f"set {setting} to a port number from 1 to 65535{hint}.")
    return number


def _source(host_name: str, peer: PeerAddress, role: str, reaches: str = "its instance ports") -> Source:
    """An IP literal of ``peer``, or a refusal saying why a name cannot be used (``reaches``: what
    of host ``host_name`` the peer is let in to)."""
    try:
        ip = ipaddress.ip_address(peer.address)
    except ValueError:
        raise FleetConfigError(
            f"host {peer.host}: `vllm_advertise_address`",
            f"is {peer.address!r} (from {peer.source}), a name, not an IP address: the firewall of host {host_name} "
            f"lets the {role} {peer.host} reach {reaches} by source address, and nft resolves a name only "
            "once, when the rules load, so a later change of address would lock it out.",
            f"set vllm_advertise_address to {peer.host}'s IP address (IPv4 or IPv6) on the {role} host {peer.host}: "
            f"the address its connections to {host_name} come from. Or set firewall_enabled: false on "
            f"{host_name}.") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 connection reaches the inet table as IPv4
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise FleetConfigError(
            f"host {peer.host}: `vllm_advertise_address`",
            f"{peer.address!r} (from {peer.source}) is a scoped link-local address: nft matches addresses, "
            "not zones.", f"set vllm_advertise_address to an address of {peer.host} without a %zone.")
    return Source(address=ip.compressed, version=ip.version, host=peer.host, role=role)


def _refuse_open_instance_ports(host_name: str, instance_ports: Iterable[int],
                                opened: list[tuple[int, str]]) -> None:
    for port, why in opened:
        if port in instance_ports:
            raise FleetConfigError(
                f"host {host_name}: `{why}`",
                f"opens port {port} to everyone, but an instance of this host listens on it: any client could "
                "reach the instance past the load balancer (its client keys, rate limits and TLS).",
                f"remove {port} from {why}, or move the instance to another port: instance ports are open to "
                "the load balancers only.")


def _refuse_open_rendezvous(host_name: str, stage: Instance, opened: list[tuple[int, str]]) -> None:
    for port, why in opened:
        if port == stage.node.master_port:
            raise FleetConfigError(
                f"host {host_name}: `{why}`",
                f"opens port {port} to everyone, but it is the rendezvous (master_port) of instance group "
                f"{stage.node.group}, which this host leads: any host could join the group's store.",
                f"remove {port} from {why}, or give the group another master_port: it is open to the group's "
                "hosts only.")


def _group_openings(host_name: str, stage: Instance, peers: Iterable[PeerAddress]) -> dict[str, Any]:
    """The group fields of ``FirewallPlan`` for ``stage``, this host's instance of an instance group:
    its ports open to ``peers``, the group's other hosts, only."""
    node = stage.node
    sources: dict[str, Source] = {}
    for peer in peers:
        source = _source(host_name, peer, "instance group member", f"the ports of instance group {node.group}")
        sources.setdefault(source.address, source)
    # The followers join the leader's rendezvous and poll its API port's /health; the leader and
    # the followers reach each other's ephemeral ports (group_port_range) both ways.
    return {"group": node.group, "group_master_port": node.master_port if node.leads else None,
            "group_api_port": stage.port if node.leads else None, "group_sources": tuple(sources.values())}


def plan_firewall(host_name: str, data: Mapping[str, Any], *, is_lb: bool, instance_ports: Iterable[int] = (),
                  lb_addresses: Iterable[PeerAddress] = (), monitor_sources: Iterable[PeerAddress] = (),
                  exporter_ports: Iterable[int] = (), grafana_port: int | None = None,
                  group_stage: Instance | None = None,
                  group_peers: Iterable[PeerAddress] = ()) -> FirewallPlan | None:
    """The firewall of one host, or None when ``firewall_enabled`` is false (the role then takes
    any vllm-fleet firewall off the host).

    ``data``: the host's data; ``is_lb``: whether it is in the ``lb`` group (its edge ports are
    open to everyone); ``instance_ports``: the ports of its instances, open only to
    ``lb_addresses`` (``peer_addresses`` of the ``lb`` group), ``monitor_sources`` (the same,
    of monitoring hosts) and ``firewall_instance_allow_from``. Addresses are needed, and checked, only where there are instances.
    ``grafana_port``: Grafana's, where it listens off loopback: open to ``grafana_allow_from``.
    ``group_stage``: the host's instance of an instance group (its ``node`` set), whose ports are
    open to ``group_peers`` (``peer_addresses`` of the group's other hosts) only."""
    if not settings.value(data, "firewall_enabled"):
        return None
    ssh = _port(host_name, "ssh_port", DEFAULT_SSH_PORT if data.get("ssh_port") is None else data["ssh_port"])
    opened: list[tuple[int, str]] = []
    if is_lb:
        opened += [(settings.value(data, name), name) for name in ("nginx_listen_port", "nginx_http_redirect_port")
                   if settings.value(data, name) is not None]
    opened += [(port, "firewall_allow_tcp") for port in settings.value(data, "firewall_allow_tcp")]
    opened = [(_port(host_name, name, port), name) for port, name in opened]
    ports = tuple(sorted({_port(host_name, "vllm_instances", port) for port in instance_ports}))
    _refuse_open_instance_ports(host_name, ports, [(ssh, "ssh_port"), *opened])
    if group_stage is not None and group_stage.node.leads:
        _refuse_open_rendezvous(host_name, group_stage, [(ssh, "ssh_port"), *opened])

    sources: dict[str, Source] = {}
    if ports:
        peers = [(p, "load balancer") for p in lb_addresses] + [(p, "monitoring host") for p in monitor_sources]
        for peer, role in peers:
            source = _source(host_name, peer, role)
            sources.setdefault(source.address, source)
        for network in map(ipaddress.ip_network, settings.value(data, "firewall_instance_allow_from")):
            address = str(network.network_address) if network.num_addresses == 1 else network.compressed
            sources.setdefault(address, Source(address, network.version, "firewall_instance_allow_from",
                                               "allowed past the edge"))
    exporters = tuple(sorted(set(exporter_ports)))
    monitors = {s.address: s for s in (_source(host_name, p, "monitoring host") for p in monitor_sources)} \
        if exporters else {}
    return FirewallPlan(host=host_name, ssh_ports=(ssh,),
                        open_tcp=tuple(sorted({port for port, _ in opened} - {ssh})),
                        instance_ports=ports, sources=tuple(sources.values()),
                        exporter_ports=exporters if monitors else (), monitor_sources=tuple(monitors.values()),
                        grafana_port=grafana_port,
                        grafana_sources=tuple(dict.fromkeys(ipaddress.ip_network(s).compressed for s in (
                            settings.value(data, "grafana_allow_from") if grafana_port else ()))),
                        **(_group_openings(host_name, group_stage, group_peers) if group_stage else {}))


def for_fleet(fleet: FleetPlan, host_name: str, data: Mapping[str, Any], lb_addresses: Iterable[PeerAddress],
              monitor_sources: Iterable[PeerAddress] = ()) -> FirewallPlan | None:
    """``plan_firewall`` for a host of a ``FleetPlan`` (``fleet``): its instances' ports, its stage
    of an instance group, and whether it is a load balancer, come from the plan. A follower of a
    group listens on no API port: only the instances that serve open theirs."""
    host_plan = fleet.host(host_name)
    stage = group_stage(host_plan)
    group_peers = peer_addresses((h, fleet.host(h).data) for h in stage.node.hosts if h != host_name) \
        if stage else ()
    is_lb = host_name in fleet.lb_hosts
    # Every host runs a node exporter when there is a monitoring host; load balancers an nginx one.
    exporters = [NODE_EXPORTER_PORT, *([NGINX_EXPORTER_PORT] if is_lb else [])]
    runs_grafana = fleet.grafana is not None and host_name in fleet.grafana.hosts
    plan = plan_firewall(host_name, data, is_lb=is_lb,
                         instance_ports=[i.port for i in host_plan.instances if i.serves] if host_plan else (),
                         lb_addresses=lb_addresses, monitor_sources=monitor_sources, exporter_ports=exporters,
                         grafana_port=grafana.opened_port(data) if runs_grafana else None,
                         group_stage=stage, group_peers=group_peers)
    if plan is None or fleet.cache is None or fleet.cache.host != host_name:
        return plan
    return replace(plan, cache_port=fleet.cache.port, cache_sources=fleet.cache.allow_from)
