"""Instances that span hosts: one vLLM instance over the hosts of an entry of ``vllm_instance_groups``,
tensor-parallel over each host's GPUs and pipeline-parallel across the hosts, run by vLLM's own
multiprocessing backend (``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``, and
``--headless`` on the followers; no Ray). Planned from the inventory's data before any host is
touched, like the single-host instances of ``roles.plan.fleet``.

Why the rules:

* One GPU type per group: vLLM gives every pipeline stage the same number of layers, so a stage on a
  smaller GPU either does not fit or leaves the others waiting; a pipeline runs at the pace of its
  slowest stage.
* One release and one model: each host loads its own stage of the same weights, and the stages hand
  each other activations in the release's own format.
* The first host leads: it runs the API server, the scheduler and the rendezvous (torch's TCPStore
  on ``master_port``); nginx sends it the traffic. The followers run workers only.
* Collective traffic leaves by ``vllm_group_interface`` (GLOO_SOCKET_IFNAME for the CPU release,
  NCCL_SOCKET_IFNAME on GPUs); InfiniBand/RoCE only where adapters are declared: without them a
  stage hands its activations over TCP, which the plan says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from roles.errors import FleetConfigError
from roles.plan import setting_checks, settings
from roles.plan.forms import INSTANCE_NAME

if TYPE_CHECKING:
    from roles.plan.fleet import HostPlan, Instance

DEFAULT_MASTER_PORT = 29500
GROUP_KEYS = ("name", "hosts", "port", "master_port")
SETTING = "vllm_instance_groups"


@dataclass(frozen=True)
class GroupEntry:
    """One entry of ``vllm_instance_groups``, checked: its hosts in pipeline order (the leader first)."""

    name: str
    hosts: tuple[str, ...]
    port: int
    master_port: int
    overrides: Mapping[str, Any]  # per-instance settings by short name, as in a vllm_instances entry

    @property
    def instance_entry(self) -> dict[str, Any]:
        """The entry each host of the group plans its one instance from, as if in its vllm_instances."""
        return {"name": self.name, "port": self.port, **self.overrides}


@dataclass(frozen=True)
class GroupNode:
    """One host's part in an instance group: what its unit needs to find the others."""

    group: str
    rank: int  # the host's pipeline stage; 0 leads
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]  # the hosts' addresses, in rank order
    master_port: int
    interface: str | None  # None: the interface holding the host's address, found on the host
    rdma_devices: tuple[str, ...]

    @property
    def leads(self) -> bool:
        return self.rank == 0

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def master_address(self) -> str:
        return self.addresses[0]

    @property
    def peers(self) -> tuple[str, ...]:
        """The other hosts' addresses: the only sources the group's ports take connections from."""
        return tuple(a for rank, a in enumerate(self.addresses) if rank != self.rank)


def group_entries(hosts: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[GroupEntry, ...]:
    """The fleet's instance groups: the one list every host that sets ``vllm_instance_groups`` holds,
    each entry checked. ``hosts``: (name, data) of the vllm hosts."""
    hosts = list(hosts)
    lists = {name: data.get(SETTING) for name, data in hosts if data.get(SETTING) is not None}
    for name, listed in lists.items():  # its type first; a host's other settings when it is planned
        setting_checks.check_host_data(name, {SETTING: listed})
    if not any(lists.values()):
        return ()
    first, value = next(iter(lists.items()))
    if differing := [name for name, other in lists.items() if other != value]:
        raise FleetConfigError(f"host {differing[0]}: `{SETTING}`",
                               f"differs from host {first}'s; a fleet has one list of instance groups.",
                               "set it once, in group data, for every vllm host.")
    known = [name for name, _ in hosts]
    entries = tuple(_entry(index, entry, known) for index, entry in enumerate(value))
    _check_no_overlap(entries, dict(hosts))
    _check_one_gpu_type(entries, dict(hosts))
    return entries


def _entry(index: int, entry: Any, known: list[str]) -> GroupEntry:
    where = f"`{SETTING}`[{index}]"
    if not isinstance(entry, Mapping):
        raise FleetConfigError(where, f"expected a mapping like {{name: big, hosts: [gpu1, gpu2], port: 8000}}, "
                               f"got {entry!r}.", "give each group a name, its hosts and a port.")
    name = entry.get("name")
    if not isinstance(name, str) or not INSTANCE_NAME.test(name):
        raise FleetConfigError(f"{where}.name", f"{name!r} is not {INSTANCE_NAME.what}.",
                               f"name the group like an instance, e.g. {INSTANCE_NAME.example!r}.")
    where = f"instance group {name}"
    for key in entry:
        if key not in GROUP_KEYS and key not in settings.PER_INSTANCE:
            raise FleetConfigError(f"{where}: `{key}`", "is not a key of an instance group.",
                                   f"use {', '.join(GROUP_KEYS)} or a per-instance setting "
                                   "(`vllm-fleet settings` lists them).")
    members = entry.get("hosts")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(h, str) for h in members):
        raise FleetConfigError(f"{where}: `hosts`", f"expected a list of two or more host names, got {members!r}.",
                               "list the vllm hosts the instance spans, the leader first.")
    if len(set(members)) < len(members):
        raise FleetConfigError(f"{where}: `hosts`", f"names a host twice: {members}.",
                               "list each host once: it runs one pipeline stage.")
    if unknown := [h for h in members if h not in known]:
        raise FleetConfigError(f"{where}: `hosts`", f"{unknown[0]!r} is not a host of the vllm group.",
                               f"use hosts of the inventory's vllm group ({', '.join(known)}).")
    port, master_port = entry.get("port"), entry.get("master_port", DEFAULT_MASTER_PORT)
    for key, value in (("port", port), ("master_port", master_port)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1024 <= value <= 65535:
            raise FleetConfigError(f"{where}: `{key}`", f"expected a port from 1024 to 65535, got {value!r}.",
                                   "the instance runs unprivileged, as vllm_user: pick a free port of 1024 or above.")
    if port == master_port:
        raise FleetConfigError(f"{where}: `master_port`", f"is the group's API port {port} too.",
                               f"give the rendezvous its own port (default {DEFAULT_MASTER_PORT}).")
    overrides = {k: v for k, v in entry.items() if k not in GROUP_KEYS}
    for key, value in overrides.items():
        setting_checks.check_override(f"{where}: `{key}`", key, value)
    return GroupEntry(name, tuple(members), port, master_port, overrides)


def _check_no_overlap(entries: tuple[GroupEntry, ...], data: Mapping[str, Mapping[str, Any]]) -> None:
    """A host runs one stage of one group and nothing else: its GPUs (or cores) are the stage's."""
    seen: dict[str, str] = {}
    for entry in entries:
        for host in entry.hosts:
            if host in seen:
                raise FleetConfigError(f"instance group {entry.name}: `hosts`",
                                       f"host {host} is in instance group {seen[host]} already.",
                                       "give each group hosts of its own.")
            seen[host] = entry.name
            if data[host].get("vllm_instances"):
                raise FleetConfigError(f"host {host}: `vllm_instances`",
                                       f"is set, but the host runs a stage of instance group {entry.name}, "
                                       "which takes all of its GPUs.",
                                       "remove vllm_instances from the host, or the host from the group.")


def _check_one_gpu_type(entries: tuple[GroupEntry, ...], data: Mapping[str, Mapping[str, Any]]) -> None:
    """One kind of GPU (or CPU) over each group's hosts: checked before any capacity is planned, so
    that a mixed group is refused for what it is rather than for its smaller GPU's memory."""
    def hardware(host: str) -> str:
        if settings.value(data[host], "vllm_accelerator") != "nvidia":
            return settings.value(data[host], "vllm_accelerator")
        return data[host].get("vllm_gpu_type") or "an unnamed GPU"

    for entry in entries:
        _check_same(entry, "GPU type", hardware,
                    "put hosts of one GPU type in a group: vLLM gives every pipeline stage the same number of "
                    "layers, so the pipeline would run at the pace of the smaller GPU, if its stage fits at all.")


def _check_same(entry: GroupEntry, what: str, value: Callable[[str], str], fix: str) -> None:
    """Refuse ``entry`` when its hosts differ in ``what`` (``value`` of a host's name), naming the
    leader's and the first other host's."""
    leader = entry.hosts[0]
    if differing := [h for h in entry.hosts if value(h) != value(leader)]:
        raise FleetConfigError(f"instance group {entry.name}: `hosts`",
                               f"{what} differs: {leader} has {value(leader)}, {differing[0]} has "
                               f"{value(differing[0])}.", fix)


def group_of(entries: tuple[GroupEntry, ...]) -> dict[str, GroupEntry]:
    """Each grouped host's group."""
    return {host: entry for entry in entries for host in entry.hosts}


def group_nodes(plans: tuple[HostPlan, ...], entries: tuple[GroupEntry, ...]) -> dict[str, GroupNode]:
    """Each grouped host's part in its group, after checking that the group's hosts agree on
    what they must share."""
    by_name = {p.name: p for p in plans}
    nodes = {}
    for entry in entries:
        members = [by_name[h] for h in entry.hosts]
        # One release and one model per group (its GPU type was checked before planning).
        _check_same(entry, "release", lambda h: by_name[h].release.name,
                    "pin one release for every host of the group (group data).")
        _check_same(entry, "model", lambda h: by_name[h].model.digest,
                    "pin one model for every host of the group (group data).")
        addresses = tuple(h.address for h in members)
        for rank, host in enumerate(members):
            nodes[host.name] = GroupNode(entry.name, rank, entry.hosts, addresses, entry.master_port,
                                         host.get("vllm_group_interface"),
                                         tuple(host.get("vllm_group_rdma_devices") or ()))
    return nodes


def group_stage(plan: HostPlan | None) -> Instance | None:
    """The host's stage of a multi-host instance, if it runs one (it then runs nothing else)."""
    return next((i for i in plan.instances if i.node is not None), None) if plan else None


def interconnect_warning(node: GroupNode, accelerator: str) -> str | None:
    """What a GPU group without a declared RDMA fabric should expect."""
    if accelerator != "nvidia" or node.rdma_devices:
        return None
    return (f"instance group {node.group}: no RDMA adapters declared (`vllm_group_rdma_devices`): the "
            f"{node.nnodes} pipeline stages hand activations over TCP sockets, which adds latency to every "
            "token and caps throughput at the network's speed; declare the InfiniBand/RoCE adapters "
            "(`ibv_devices`) where the hosts have them.")
