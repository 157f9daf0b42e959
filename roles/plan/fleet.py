"""The fleet plan: what every host and instance will run, worked out before any host is touched.

``plan_fleet`` reads nothing but inventory data, release manifests, locks and the local model
directory. Every way an inventory can be wrong is refused here (with the settings table's checks
and ``roles.plan.consistency``'s) with a ``FleetConfigError`` naming the field and the fix, so
that a deploy stops before its first operation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from roles.common import ArtifactFile, endpoint, sha256_file
from roles.errors import FleetConfigError
from roles.plan import alerts, artifacts, consistency, dashboard, groups, setting_checks, settings, status
from roles.plan.artifacts import CACHE_GROUP, CachePlan
from roles.plan.capacity import TP_CHOICES, Deployment, Fit, fits, plan_capacity
from roles.plan.edge import EdgePlan, plan_fleet_edge
from roles.plan.fallback import Provider, plan_provider
from roles.plan.firewall import FirewallPlan, for_fleet, peer_addresses
from roles.plan.gpus import GpuSpec, gpu_spec
from roles.plan.grafana import GRAFANA_GROUP, GrafanaPlan, plan_grafana
from roles.plan.groups import GroupEntry, GroupNode
from roles.plan.metrics import check_release_metrics
from roles.plan.model import ModelArch
from roles.plan.monitoring import MonitorPlan, plan_monitoring
from roles.plan.routing import check_instances_down
from roles.release.lock import Lock, lock_path, read_lock
from roles.release.manifest import Release, load_release

REPO_ROOT = Path(__file__).resolve().parents[2]
# Hugging Face config.json files of hub models, for planning without network (<org>--<name>/).
MODEL_CONFIGS_DIR = REPO_ROOT / "inventories" / "model_configs"
HF_CACHE = Path("~/.cache/huggingface/hub").expanduser()

# The groups a fleet inventory defines: vLLM hosts, and the host(s) running the load balancer.
VLLM_GROUP = "vllm"
LB_GROUP = "lb"
MONITOR_GROUP = "monitor"
# And GRAFANA_GROUP (roles/plan/grafana.py): the monitor hosts that run Grafana too.

# A local model directory's name becomes a folder name on hosts and, by default, the served name.
MODEL_DIR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Model:
    """A model staged on hosts: a local directory (with file checksums) or a pinned hub snapshot."""

    served_name: str
    local_path: Path | None = None
    files: tuple[ArtifactFile, ...] = ()  # a local directory's files, with their sizes and sha256
    model_id: str | None = None
    revision: str | None = None

    @property
    def digest(self) -> str:
        """Identifies the exact weights: the checksum list of a local model, or the hub revision."""
        if self.local_path is None:
            return self.revision or ""
        return hashlib.sha256("".join(f"{f.sha256}  {f.path}\n" for f in self.files).encode()).hexdigest()

    @property
    def dirname(self) -> str:
        """The model's folder on hosts and in the artifact cache; keyed by content, so a new
        revision never overwrites the one instances may still run."""
        if self.local_path is None:
            return f"{self.model_id.replace('/', '--')}-{self.digest[:12]}"
        return f"{self.local_path.name}-{self.digest[:12]}"

    def host_dir(self, data_dir: str) -> str:
        return f"{data_dir}/models/{self.dirname}"


@dataclass(frozen=True)
class Instance:
    name: str
    port: int
    settings: Mapping[str, Any]  # effective per-instance settings, by full name
    fit: Fit | None = None  # capacity plan: checked or derived tensor-parallel, lengths, KV cache
    node: GroupNode | None = None  # the host's stage when the instance spans hosts (vllm_instance_groups)

    def get(self, name: str) -> Any:
        return self.settings[name]

    @property
    def serves(self) -> bool:
        """Takes requests: every instance but a multi-host instance's followers (they run workers only)."""
        return self.node is None or self.node.leads


@dataclass(frozen=True)
class HostPlan:
    name: str
    address: str
    accelerator: str
    release: Release
    lock: Lock
    model: Model
    instances: tuple[Instance, ...]
    gpu: GpuSpec | None  # None on CPU hosts
    data: Mapping[str, Any] = field(repr=False)  # host-level settings, by full name

    def get(self, name: str) -> Any:
        return settings.value(self.data, name)

    @property
    def venv_dir(self) -> str:
        return f"{self.get('vllm_install_dir')}/venvs/{self.lock.digest[:16]}"

    @property
    def listen_address(self) -> str:
        """Where the instances listen: the address the load balancer reaches, unless set apart."""
        return self.get("vllm_listen_address") or self.address

    @property
    def model_dir(self) -> str:
        return self.model.host_dir(self.get("vllm_data_dir"))

    @property
    def serving(self) -> tuple[Instance, ...]:
        """The instances with an API (all but a multi-host instance's followers): what is probed."""
        return tuple(i for i in self.instances if i.serves)


@dataclass(frozen=True)
class FleetPlan:
    hosts: tuple[HostPlan, ...]
    lb_hosts: tuple[str, ...]
    served_model_name: str
    # Clients, keys and TLS of the edge, and each host's firewall (by host name): planned for a
    # deploy (``with_edge``); None and empty when only capacity was planned (`vllm-fleet plan`).
    edges: tuple[tuple[str, EdgePlan], ...] = ()
    firewalls: tuple[tuple[str, FirewallPlan | None], ...] = ()
    # Each load balancer's fallback provider (None where nginx_fallback is off), planned with the edge.
    providers: tuple[tuple[str, Provider | None], ...] = ()
    # Prometheus's targets, when the inventory has a monitor group.
    monitoring: MonitorPlan | None = None
    # Where Grafana runs, when the inventory has a grafana group.
    grafana: GrafanaPlan | None = None
    # The artifact cache every host pulls wheels and models from; None when none needs it.
    cache: CachePlan | None = None

    @property
    def upstreams(self) -> list[str]:
        """Every instance of the fleet as nginx addresses it: the load balancer's upstream."""
        return [endpoint(h.address, i.port) for h in self.hosts for i in h.serving]

    @property
    def instance_endpoints(self) -> dict[str, str]:
        """HOST:INSTANCE, as the rollout report names an instance, -> where nginx reaches it."""
        return {f"{h.name}:{i.name}": endpoint(h.address, i.port) for h in self.hosts for i in h.serving}

    def host(self, name: str) -> HostPlan | None:
        return next((h for h in self.hosts if h.name == name), None)

    def firewall(self, name: str) -> FirewallPlan | None:
        return dict(self.firewalls)[name]

    def edge(self, lb_name: str) -> EdgePlan:
        """Load balancer ``lb_name``'s clients with its limits, and its certificate."""
        return dict(self.edges)[lb_name]

    def provider(self, lb_name: str) -> Provider | None:
        """Where load balancer ``lb_name`` sends what no instance can take, if anywhere."""
        return dict(self.providers).get(lb_name)

    @property
    def secrets_dir(self) -> Path:
        """The fleet's secrets folder on the control node: every load balancer names the same one."""
        return self.edges[0][1].secrets_dir


# ---- models ---------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _checksums(path: Path, stamp: tuple) -> tuple[ArtifactFile, ...]:
    # ``stamp`` (sizes and mtimes) keys the cache: a deploy file runs once per host.
    return tuple(ArtifactFile(f.relative_to(path).as_posix(), f.stat().st_size, sha256=sha256_file(f))
                 for f in sorted(p for p in path.rglob("*") if p.is_file()))


def plan_model(host_name: str, data: Mapping[str, Any], base_dir: Path) -> Model:
    path, model_id = data.get("vllm_model_path"), data.get("vllm_model_id")
    where = f"host {host_name}"
    if path and model_id:
        raise FleetConfigError(f"{where}: vllm_model_path and vllm_model_id",
                               "both are set; a fleet serves one model from one source.",
                               "keep one of them.")
    if not path and not model_id:
        raise FleetConfigError(f"{where}: vllm_model_path", "no model is set.",
                               "set vllm_model_path to a model directory on the control node, or "
                               "vllm_model_id plus vllm_model_revision to a pinned Hugging Face model.")
    served = data.get("vllm_served_model_name")
    if model_id:
        # Its form is checked with the host's settings; here only that it is there.
        revision = data.get("vllm_model_revision")
        if not revision:
            raise FleetConfigError(f"{where}: vllm_model_revision",
                                   f"is not set for {model_id}, so the weights are not pinned.",
                                   "set it to the model repository's 40-hex-digit commit hash.")
        return Model(served_name=served or model_id, model_id=model_id, revision=revision)
    local = (base_dir / path).resolve()
    if not (local / "config.json").is_file():
        raise FleetConfigError(f"{where}: vllm_model_path",
                               f"{local} is not a model directory (no config.json there).",
                               "build the lab's test model with `vllm-fleet lab model "
                               f"{path}` or point the setting at a Hugging Face model directory.")
    if not MODEL_DIR_NAME.fullmatch(local.name):
        raise FleetConfigError(f"{where}: vllm_model_path",
                               f"the directory's name {local.name!r} names its copy on the hosts and, unless "
                               "vllm_served_model_name is set, the served model: it must be letters, digits and ._-.",
                               "rename the directory, e.g. to 'llama-3.1-8b-instruct'.")
    stamp = tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(local.rglob("*")) if p.is_file())
    return Model(served_name=served or local.name, local_path=local, files=_checksums(local, stamp))


# ---- instances ------------------------------------------------------------------------------------

def plan_instances(host_name: str, data: Mapping[str, Any], group: GroupEntry | None = None) -> tuple[Instance, ...]:
    """The host's instances: its vllm_instances, or the one instance of its group's stage."""
    if group is not None:  # its entry was checked with the fleet's groups
        return (_instance(data, group.instance_entry),)
    entries = data.get("vllm_instances")
    if not entries:
        raise FleetConfigError(f"host {host_name}: vllm_instances", "no instances are declared.",
                               "set vllm_instances to a list such as [{name: a, port: 8001}].")
    instances, seen_names, seen_ports = [], {}, {}
    for index, entry in enumerate(entries):
        setting_checks.check_instance_entry(host_name, index, entry)
        where = f"host {host_name}: vllm_instances[{index}]"
        name, port = entry["name"], entry["port"]
        if name in seen_names:
            raise FleetConfigError(f"{where}.name", f"instance name {name!r} is used twice on this host.",
                                   "give every instance on a host its own name.")
        if port in seen_ports:
            raise FleetConfigError(f"{where}.port",
                                   f"port {port} is already used by instance {seen_ports[port]!r} on this host.",
                                   "give every instance on a host its own port.")
        seen_names[name], seen_ports[port] = index, name
        instances.append(_instance(data, entry))
    return tuple(instances)


def _instance(data: Mapping[str, Any], entry: Mapping[str, Any]) -> Instance:
    """The instance a checked entry describes, with every per-instance setting resolved."""
    effective = {s.name: settings.value(data, s.name, entry) for s in settings.SETTINGS if s.per_instance}
    return Instance(name=entry["name"], port=entry["port"], settings=effective)


def auto_gpus(instances: Iterable[Instance]) -> dict[str, list[int]]:
    """GPU indices per instance: declared ones, else the next free ones in instance order."""
    taken = {g for i in instances for g in (i.get("vllm_gpus") or [])}
    out, next_gpu = {}, 0
    for inst in instances:
        if inst.get("vllm_gpus"):
            out[inst.name] = list(inst.get("vllm_gpus"))
            continue
        chosen = []
        while len(chosen) < inst.fit.tensor_parallel:
            if next_gpu not in taken:
                chosen.append(next_gpu)
            next_gpu += 1
        out[inst.name] = chosen
    return out


def split_cores(cpu_count: int, instance_count: int) -> list[str]:
    """Bind each instance to its own contiguous block of cores (vLLM binds all to core 0 otherwise)."""
    if instance_count > cpu_count:
        # Fewer cores than instances: share every core rather than leave one instance without any.
        return [f"0-{cpu_count - 1}" if cpu_count > 1 else "0"] * instance_count
    per = cpu_count // instance_count
    blocks = []
    for i in range(instance_count):
        first, last = i * per, (i + 1) * per - 1 if i < instance_count - 1 else cpu_count - 1
        blocks.append(str(first) if first == last else f"{first}-{last}")
    return blocks


# ---- capacity --------------------------------------------------------------------------------------

def model_arch(host_name: str, data: Mapping[str, Any], model: Model, base_dir: Path) -> ModelArch:
    """The model's architecture, from files on the control node (planning never needs a host)."""
    if model.local_path is not None:
        return ModelArch.load(model.local_path, name=model.served_name)
    candidates = []
    if data.get("vllm_model_config"):
        candidates.append((base_dir / data["vllm_model_config"]).resolve())
    candidates.append(MODEL_CONFIGS_DIR / model.model_id.replace("/", "--"))
    candidates.append(HF_CACHE / ("models--" + model.model_id.replace("/", "--")) / "snapshots" / model.revision)
    for path in candidates:
        if (path / "config.json").is_file() or path.name == "config.json" and path.is_file():
            return ModelArch.load(path, name=model.model_id)
    raise FleetConfigError(f"host {host_name}: vllm_model_config",
                           f"no config.json for {model.model_id} on the control node "
                           f"(looked in {', '.join(str(c) for c in candidates)}).",
                           f"save the model's config.json as {candidates[-2]}/config.json, or set "
                           "vllm_model_config to its path: capacity is planned before any host is touched.")


def instance_fit(host_name: str, arch: ModelArch, gpu: GpuSpec | None, inst: Instance,
                 host_gpus: int | None, pp: int = 1) -> Fit:
    """Check the instance's settings against the model and hardware, deriving what is unset; ``pp``:
    the hosts it spans (one pipeline stage each)."""
    def deployment(tp: int) -> Deployment:
        return Deployment(gpu=gpu, gpus_per_instance=tp, pipeline_parallel=pp, weight_dtype=inst.get("vllm_dtype"),
                          quantization=inst.get("vllm_quantization"), kv_cache_dtype=inst.get("vllm_kv_cache_dtype"),
                          gpu_memory_utilization=inst.get("vllm_gpu_memory_utilization"),
                          max_model_len=inst.get("vllm_max_model_len"), max_num_seqs=inst.get("vllm_max_num_seqs"),
                          cpu_kv_cache_bytes=inst.get("vllm_kv_cache_bytes"))

    where = f"instance group {inst.name}: host {host_name}: " if pp > 1 else f"host {host_name}: instance {inst.name}: "
    tp = inst.get("vllm_tensor_parallel_size")
    if tp is not None or gpu is None:
        return plan_capacity(arch, deployment(tp or 1), host_gpus, where=where)
    if pp > 1 and host_gpus:
        # A host of an instance group runs one stage and nothing else: on all of its GPUs.
        return plan_capacity(arch, deployment(host_gpus), host_gpus, where=where)
    # Unset on a GPU host: the smallest size that fits. If none does, tensor-parallel 1's refusal
    # carries the arithmetic and the ways out.
    for size in TP_CHOICES:
        if host_gpus is not None and size > host_gpus:
            break
        if fit := fits(arch, deployment(size), host_gpus):
            return fit
    return plan_capacity(arch, deployment(1), host_gpus, where=where)


# ---- the whole fleet ---------------------------------------------------------------------------------

def plan_host(name: str, data: Mapping[str, Any], base_dir: Path = REPO_ROOT,
              group: GroupEntry | None = None) -> HostPlan:
    """One host's plan; ``group``: the instance group the host runs a stage of, if any."""
    setting_checks.check_host_data(name, data)
    releases_dir = base_dir / settings.value(data, "vllm_releases_dir")
    if not releases_dir.is_dir():
        raise FleetConfigError(f"host {name}: `vllm_releases_dir`",
                               f"{settings.value(data, 'vllm_releases_dir')!r} is not a folder ({releases_dir}).",
                               "set it to the folder of release manifests (default inventories/releases), relative "
                               "to where pyinfra runs.")
    release_name = data.get("vllm_release")
    if not release_name:
        raise FleetConfigError(f"host {name}: vllm_release", "no release is pinned.",
                               f"set vllm_release to one of the manifests in {releases_dir}.")
    try:
        release = load_release(release_name, releases_dir)
    except FleetConfigError as error:
        raise FleetConfigError(f"host {name}: vllm_release {release_name}: {error.field}", error.problem,
                               error.fix) from None
    accelerator = settings.value(data, "vllm_accelerator")
    if accelerator != release.accelerator:
        raise FleetConfigError(f"host {name}: vllm_accelerator",
                               f"the host is {accelerator!r} but release {release.name} is built for "
                               f"{release.accelerator!r}.",
                               f"pin a release for {accelerator} hosts, or fix vllm_accelerator.")
    lock = read_lock(lock_path(release, releases_dir))
    gpu = None
    if accelerator == "nvidia":
        if not data.get("vllm_gpu_type"):
            raise FleetConfigError(f"host {name}: vllm_gpu_type", "an NVIDIA host needs its GPU model for planning.",
                                   "set vllm_gpu_type, e.g. h100-sxm (`vllm-fleet gpus` lists them).")
        gpu = gpu_spec(data["vllm_gpu_type"], data.get("vllm_gpu_types"), where=f"host {name}: ")
        if not data.get("nvidia_repo_url"):
            raise FleetConfigError(f"host {name}: nvidia_repo_url", "is not set; the driver comes from it.",
                                   "set it to NVIDIA's CUDA apt repository (or your mirror of it): the folder "
                                   "holding ubuntu2204/, ubuntu2404/ and debian12/.")
    model = plan_model(name, data, base_dir)
    arch = model_arch(name, data, model, base_dir)
    host_gpus = data.get("vllm_gpu_count")
    pp = len(group.hosts) if group else 1
    instances = tuple(replace(i, fit=instance_fit(name, arch, gpu, i, host_gpus, pp))
                      for i in plan_instances(name, data, group))
    for inst in instances:
        consistency.check_extra_args(f"host {name}: instance {inst.name}: ", inst.get("vllm_extra_args"))
    consistency.check_gpus(name, instances, host_gpus)
    address = consistency.advertised_address(name, data)
    return HostPlan(name=name, address=address, accelerator=accelerator, release=release, lock=lock,
                    model=model, instances=instances, gpu=gpu, data=dict(data))


def plan_fleet(hosts: Iterable[tuple[str, Mapping[str, Any]]], lb_hosts: Iterable[str],
               base_dir: Path = REPO_ROOT) -> FleetPlan:
    """Plan every host; ``base_dir`` is what relative paths in the inventory are relative to."""
    hosts = list(hosts)
    entries = groups.group_entries(hosts)
    group_of = groups.group_of(entries)
    plans = with_group_nodes(tuple(plan_host(n, d, base_dir, group_of.get(n)) for n, d in hosts), entries)
    if not plans:
        raise FleetConfigError(f"inventory group `{VLLM_GROUP}`", "has no hosts.",
                               f"put the vLLM hosts in a group named `{VLLM_GROUP}`.")
    lb = tuple(lb_hosts)
    if not lb:
        raise FleetConfigError(f"inventory group `{LB_GROUP}`", "has no hosts.",
                               f"put the load balancer host(s) in a group named `{LB_GROUP}`.")
    consistency.check_fleet(plans, lb)
    return FleetPlan(hosts=plans, lb_hosts=lb, served_model_name=plans[0].model.served_name)


def with_group_nodes(plans: tuple[HostPlan, ...], entries: tuple[GroupEntry, ...]) -> tuple[HostPlan, ...]:
    """``plans`` with each grouped host's instance told its stage, and the leader's fit the group's
    interconnect warning."""
    nodes = groups.group_nodes(plans, entries)

    def staged(host: HostPlan, inst: Instance) -> Instance:
        node = nodes[host.name]
        warning = groups.interconnect_warning(node, host.accelerator) if node.leads else None
        fit = replace(inst.fit, warnings=inst.fit.warnings + (warning,)) if warning else inst.fit
        return replace(inst, node=node, fit=fit)

    return tuple(replace(h, instances=tuple(staged(h, i) for i in h.instances)) if h.name in nodes else h
                 for h in plans)


def check_run_limit(plan: FleetPlan, hosts_in_run: Iterable[str] | None) -> None:
    """A run limited to some hosts (pyinfra's ``--limit``) must include a load balancer when it
    includes instance hosts: an instance restarts only after nginx has stopped sending to it."""
    if hosts_in_run is None:
        return
    in_run = set(hosts_in_run)
    instance_hosts = [h.name for h in plan.hosts if h.name in in_run]
    if instance_hosts and not in_run & set(plan.lb_hosts):
        raise FleetConfigError(
            "--limit", f"includes vLLM hosts ({', '.join(instance_hosts)}) but no load balancer "
            f"({', '.join(plan.lb_hosts)}): their instances could not be taken out of nginx before a restart.",
            f"add the load balancer group, e.g. `--limit {instance_hosts[0]} --limit {LB_GROUP}`; instances restart "
            "only where their release or configuration changed, so the others are not touched.")
    artifacts.check_cache_in_run(plan, in_run)


@lru_cache(maxsize=4)
def plan_inventory(inventory, with_edge: bool = True, with_cache: bool = True) -> FleetPlan:
    """The plan for a pyinfra inventory (cached: a deploy file runs once per host). Every host's
    settings are checked, whatever its groups: a misspelt setting on a host that is only a load
    balancer is refused like one on a vLLM host. ``with_edge``: the edge's secrets are read and
    checked too (a deploy); ``with_cache``: the artifact cache is planned (anything that installs:
    a deploy, GPU onboarding); with neither, only capacity is planned."""
    for host in inventory:
        setting_checks.check_host_data(host.name, host.data.dict())
    vllm_hosts = inventory.get_group(VLLM_GROUP, default=[])
    lb_hosts = inventory.get_group(LB_GROUP, default=[])
    plan = plan_fleet(((h.name, h.data.dict()) for h in vllm_hosts), (h.name for h in lb_hosts),
                      base_dir=Path.cwd())
    if with_cache:
        plan = with_artifact_cache(plan, [(h.name, h.data.dict()) for h in inventory],
                                    [h.name for h in inventory.get_group(CACHE_GROUP, default=[])])
    if not with_edge:
        return plan
    return with_edge_and_firewalls(plan, [(h.name, h.data.dict()) for h in lb_hosts],
                                   [(h.name, h.data.dict()) for h in inventory], Path.cwd(),
                                   [h.name for h in inventory.get_group(MONITOR_GROUP, default=[])],
                                   [h.name for h in inventory.get_group(GRAFANA_GROUP, default=[])])


def with_artifact_cache(plan: FleetPlan, hosts: list[tuple[str, Mapping[str, Any]]],
                        cache_group: Iterable[str]) -> FleetPlan:
    """``plan`` with its artifact cache, where any host pulls from one. ``hosts``: (name, data) of
    every host of the inventory; ``cache_group``: the names in the ``cache`` group."""
    artifacts.check_hub_download(plan)
    if not artifacts.needs_cache(plan):
        return plan
    return replace(plan, cache=artifacts.plan_cache(plan, hosts, tuple(cache_group)))


def check_monitored_metrics(plan: FleetPlan, monitor_data: Mapping[str, Any], base_dir: Path) -> None:
    """Every vLLM metric the alert rules and the dashboard use is one each host's release exposes."""
    used = {f"templates/prometheus/{alerts.RULES_TEMPLATE}": alerts.metric_names(alerts.render_rules(monitor_data)),
            dashboard.DASHBOARD_NAME: dashboard.metric_names(dashboard.load_dashboard()),
            "roles/plan/status.py": status.metric_names()}
    for release, releases_dir in dict.fromkeys((h.release.name, h.get("vllm_releases_dir")) for h in plan.hosts):
        check_release_metrics(release, base_dir / releases_dir, used)


def with_edge_and_firewalls(plan: FleetPlan, lb_hosts: list[tuple[str, Mapping[str, Any]]],
                            hosts: list[tuple[str, Mapping[str, Any]]], base_dir: Path,
                            monitor_hosts: Iterable[str] = (), grafana_hosts: Iterable[str] = ()) -> FleetPlan:
    """``plan`` with its edge (clients, keys, TLS; read from the load balancers' secrets folder),
    its monitoring (when ``monitor_hosts``), its Grafana (when ``grafana_hosts``) and the firewall
    of every host of the inventory."""
    edges = plan_fleet_edge(lb_hosts, base_dir)
    check_instances_down(plan, lb_hosts)
    lb_addresses = peer_addresses(lb_hosts)
    monitors = tuple(monitor_hosts)
    monitor_addresses = peer_addresses((name, data) for name, data in hosts if name in monitors)
    if monitors:
        check_monitored_metrics(plan, dict(hosts)[monitors[0]], base_dir)
    providers = tuple((name, plan_provider(name, data, dict(edges)[name].secrets_dir, base_dir))
                      for name, data in lb_hosts)
    plan = replace(plan, edges=edges, providers=providers, monitoring=plan_monitoring(plan, hosts, monitors),
                   grafana=plan_grafana(plan, hosts, grafana_hosts, monitors))
    return replace(plan, firewalls=tuple((name, for_fleet(plan, name, data, lb_addresses, monitor_addresses))
                                         for name, data in hosts))
