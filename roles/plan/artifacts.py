"""Where each host's release and model come from, planned from the inventory alone.

A fleet has an artifact cache: one host (the ``cache`` group's, else the first load balancer)
whose nginx serves, inside the fleet, every wheel and model the control node sent it, once each.
Every host pulls what it lacks from there in parallel and checks every byte against the lock's
sha256 or the model's manifest, so what leaves the control node does not grow with the fleet,
and an upgrade moves only the wheels its lock adds. A release whose manifest names the operator's
own index (``index.host_index_url``) is installed from there, and a hub model with
``vllm_hub_download = hosts`` comes from the Hub (or its mirror) to every host: nothing is pushed.

What every byte is checked against: ``roles.common.ArtifactFile`` and its manifest.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from roles.common import endpoint
from roles.errors import FleetConfigError
from roles.plan import consistency, monitoring, settings

if TYPE_CHECKING:
    from roles.plan.fleet import FleetPlan

CACHE_GROUP = "cache"
# The cache's folders under cache_dir, and its URL paths: one wheel store for every release (a
# release shares most of its wheels with the one before), one folder per model.
WHEELS = "wheels"
MODELS = "models"


@dataclass(frozen=True)
class CachePlan:
    """The fleet's artifact cache: where it runs, where hosts reach it, who may."""

    host: str
    address: str  # an IP literal: nginx listens there, and the hosts' firewalls need no name
    port: int
    root: str  # cache_dir on the cache host
    allow_from: tuple[str, ...]  # networks or addresses, canonical: nginx's allow list and the firewall's

    @property
    def url(self) -> str:
        return f"http://{endpoint(self.address, self.port)}"

    @property
    def wheels_url(self) -> str:
        return f"{self.url}/{WHEELS}/"

    @property
    def wheels_dir(self) -> str:
        return f"{self.root}/{WHEELS}"

    @property
    def incoming_dir(self) -> str:
        """Where pushed files land until they are verified: outside what nginx serves."""
        return f"{self.root}/incoming"

    def model_url(self, dirname: str) -> str:
        return f"{self.url}/{MODELS}/{dirname}/"

    def model_dir(self, dirname: str) -> str:
        return f"{self.root}/{MODELS}/{dirname}"


def plan_cache(fleet: FleetPlan, hosts: Sequence[tuple[str, Mapping[str, Any]]],
               cache_group: Sequence[str]) -> CachePlan:
    """The cache of ``fleet``. ``hosts``: (name, data) of every host of the inventory;
    ``cache_group``: the names in the ``cache`` group (empty: the first load balancer)."""
    if len(cache_group) > 1:
        raise FleetConfigError(f"inventory group `{CACHE_GROUP}`",
                               f"has {len(cache_group)} hosts ({', '.join(cache_group)}); one cache serves a fleet, "
                               "and a second would need every artifact sent to it too.",
                               f"keep one host in `{CACHE_GROUP}` (or none: the first load balancer serves).")
    name = cache_group[0] if cache_group else fleet.lb_hosts[0]
    data = dict(hosts)[name]
    where = f"host {name} (the artifact cache)"
    address = consistency.advertised_address(name, data)
    if not _is_ip(address):
        raise FleetConfigError(f"{where}: `vllm_advertise_address`",
                               f"is {address!r}, a name: the cache listens at that address, inside the fleet, and "
                               "nginx takes an IP address there.",
                               f"set vllm_advertise_address on {name} to the IP address the fleet's hosts reach it at.")
    port = settings.value(data, "cache_port")
    taken = monitoring.taken_ports(fleet, name, data)
    if port in taken:
        raise FleetConfigError(f"{where}: `cache_port`", f"is {port}, where {taken[port]} listens on this host.",
                               f"set cache_port to a free port (the default is "
                               f"{settings.BY_NAME['cache_port'].default}).")
    return CachePlan(host=name, address=ipaddress.ip_address(address).compressed, port=port,
                     root=settings.value(data, "cache_dir"), allow_from=_allowed(name, data, hosts))


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _allowed(cache_host: str, data: Mapping[str, Any], hosts: Sequence[tuple[str, Mapping[str, Any]]]) \
        -> tuple[str, ...]:
    """cache_allow_from, else the address of every host of the inventory (the cache host's too)."""
    given = settings.value(data, "cache_allow_from")
    if given:
        networks = (ipaddress.ip_network(n) for n in given)
        return tuple(dict.fromkeys(str(n.network_address) if n.num_addresses == 1 else n.compressed
                                   for n in networks))
    allowed = []
    for name, host_data in hosts:
        address = consistency.advertised_address(name, host_data)
        if not _is_ip(address):
            raise FleetConfigError(
                f"host {name}: `vllm_advertise_address`",
                f"is unset, so the artifact cache on {cache_host} would let {name} in by {address!r}, a name: nginx "
                "and the firewall allow addresses only.",
                f"set vllm_advertise_address on {name} to its IP address, or cache_allow_from on {cache_host} to the "
                "fleet's network (e.g. 10.0.0.0/24).")
        allowed.append(ipaddress.ip_address(address).compressed)
    return tuple(dict.fromkeys(allowed))


def needs_cache(fleet: FleetPlan) -> bool:
    """Whether any host pulls from the cache: a release not installed from the operator's index, a
    pushed model, or a hub model downloaded once (on the cache host or the control node)."""
    return any(h.release.index.host_index_url is None or h.model.local_path is not None
               or h.get("vllm_hub_download") != "hosts" for h in fleet.hosts)


def check_hub_download(fleet: FleetPlan) -> None:
    """A hub model comes from one place for the whole fleet: it is downloaded once."""
    for setting in ("vllm_hub_download", "vllm_hf_endpoint"):
        values = {h.get(setting) for h in fleet.hosts}
        if len(values) > 1:
            raise FleetConfigError(setting, f"is {sorted(map(str, values))} across the hosts; the fleet's model is "
                                   "downloaded once, from one place.", "set one value for every host (group data).")


def check_cache_in_run(fleet: FleetPlan, hosts_in_run: Iterable[str]) -> None:
    """A run that installs on vLLM hosts includes the cache host, which must hold what they pull."""
    in_run = set(hosts_in_run)
    if fleet.cache is None or fleet.cache.host in in_run:
        return
    pulling = [h.name for h in fleet.hosts if h.name in in_run]
    if pulling:
        raise FleetConfigError("--limit", f"includes vLLM hosts ({', '.join(pulling)}) but not the artifact cache "
                               f"{fleet.cache.host}, which must first receive what they pull from it.",
                               f"add it: `--limit {fleet.cache.host}`; what it already holds is not sent again.")
