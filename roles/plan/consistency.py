"""Checks across settings, instances and hosts. What one value may be on its own is in the
settings table (``roles.plan.settings``); what values allow together is here: flags in
``vllm_extra_args`` that a setting owns, secrets on the command line, GPU indices against the
host's count, addresses that two hosts share or that the load balancer cannot reach. Each
refusal names the host, the instance where there is one, the setting, the value and the fix.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from roles.errors import FleetConfigError
from roles.plan import forms, settings

if TYPE_CHECKING:
    from roles.plan.fleet import HostPlan, Instance

# Every flag ``roles.plan.engine.render_args`` renders, and what the inventory sets it with.
# A second copy in vllm_extra_args would silently win over the plan's (argparse keeps the last).
OWNED_FLAGS: dict[str, str] = {
    "--model": "`vllm_model_path` or `vllm_model_id`",
    "--served-model-name": "`vllm_served_model_name`",
    "--host": "`vllm_listen_address`",
    "--port": "the instance's `port`",
    "--dtype": "`vllm_dtype`",
    "--tensor-parallel-size": "`vllm_tensor_parallel_size`",
    "--max-model-len": "`vllm_max_model_len`",
    "--max-num-seqs": "`vllm_max_num_seqs`",
    "--quantization": "`vllm_quantization`",
    "--kv-cache-dtype": "`vllm_kv_cache_dtype`",
    "--gpu-memory-utilization": "`vllm_gpu_memory_utilization`",
    "--kv-cache-memory-bytes": "`vllm_kv_cache_bytes`",
    "--enable-prefix-caching": "`vllm_enable_prefix_caching`",
    "--enable-chunked-prefill": "`vllm_enable_chunked_prefill`",
    "--enforce-eager": "`vllm_enforce_eager`",
    # Not rendered: the key goes through the root-only environment file, never the command line.
    "--api-key": "the fleet's internal key",
}
# vLLM's short spellings of owned flags.
SHORT_FLAGS = {"-tp": "--tensor-parallel-size", "-q": "--quantization"}
# Words of a flag name that mark its value as a secret (whole words: --tokenizer is no secret).
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd"}


def _long_flag(arg: str) -> str | None:
    """The long option ``arg`` names, as vLLM's parser reads it (``--max_model_len=8`` is
    ``--max-model-len``; a short spelling is its long one); None for a value."""
    if arg.startswith("--") and len(arg) > 2:  # a bare -- ends the options: what follows is no flag either
        return "--" + arg[2:].split("=", 1)[0].replace("_", "-")
    for short, flag in SHORT_FLAGS.items():
        # argparse takes a one-letter option's value glued to it (-qfp8) and any option's after '='.
        if arg.split("=", 1)[0] == short or (len(short) == 2 and arg.startswith(short)):
            return flag
    return None


def _owner(flag: str) -> str | None:
    """The setting that owns ``flag``, its ``--no-`` form, or a flag it abbreviates (argparse
    takes an unambiguous prefix)."""
    positive = "--" + flag[len("--no-"):] if flag.startswith("--no-") else flag
    if positive in OWNED_FLAGS:
        return OWNED_FLAGS[positive]
    return next((owner for owned, owner in OWNED_FLAGS.items() if owned.startswith(positive)), None)


def check_extra_args(where: str, args: Iterable[Any]) -> None:
    """Refuse a flag in ``vllm_extra_args`` that a setting owns, and secrets on the command line.
    ``where`` names the host and instance, e.g. ``"host gpu-01: instance a: "``."""
    field = f"{where}`vllm_extra_args`"
    for arg in map(str, args):
        flag = _long_flag(arg)
        if flag is None:
            continue
        owner = _owner(flag)
        words = set(flag.lstrip("-").split("-"))
        if owner == OWNED_FLAGS["--api-key"] or (owner is None and words & SECRET_WORDS):
            raise FleetConfigError(
                field, f"{arg!r} puts a secret on the command line, which every user of the host can read "
                "(ps, /proc/PID/cmdline) and the journal keeps.",
                "remove it; every instance already requires the fleet's internal key, generated in "
                "nginx_secrets_dir and passed through the root-only environment file. "
                "The model is staged before the unit starts, so the engine needs no hub token.")
        if owner is not None:
            raise FleetConfigError(
                field, f"{arg!r} sets {flag}, which {owner} owns: the plan renders that flag itself, and a "
                "second one would silently win over it (the capacity plan would no longer describe the instance).",
                f"remove it from vllm_extra_args and set {owner} instead.")


def check_gpus(host_name: str, instances: Iterable[Instance], host_gpus: int | None) -> None:
    """Declared GPU indices: one per tensor-parallel rank, on the host, never shared; and no more
    GPUs wanted than the host has."""
    owner: dict[int, str] = {}
    for inst in instances:
        field = f"host {host_name}: instance {inst.name}: `vllm_gpus`"
        gpus = inst.get("vllm_gpus") or []
        tp = inst.fit.tensor_parallel
        if gpus and len(gpus) != tp:
            raise FleetConfigError(field, f"{len(gpus)} GPUs listed ({gpus}) for tensor-parallel size {tp}.",
                                   "list exactly tensor_parallel_size GPU indices, or leave gpus unset.")
        for gpu in gpus:
            if host_gpus is not None and gpu >= host_gpus:
                raise FleetConfigError(field, f"GPU index {gpu} is not on this host: vllm_gpu_count is {host_gpus}, "
                                       f"so its GPUs are 0 to {host_gpus - 1}.",
                                       "list indices below vllm_gpu_count (CUDA_VISIBLE_DEVICES counts from 0), "
                                       "or correct vllm_gpu_count.")
            if gpu in owner:
                raise FleetConfigError(field, f"GPU {gpu} is already given to instance {owner[gpu]}.",
                                       "give each instance its own GPUs.")
            owner[gpu] = inst.name
    wanted = sum(i.fit.tensor_parallel for i in instances)
    if host_gpus is not None and wanted > host_gpus:
        raise FleetConfigError(f"host {host_name}: vllm_instances",
                               f"the instances need {wanted} GPUs together; the host has {host_gpus} "
                               "(vllm_gpu_count).",
                               "run fewer instances here, or lower their tensor-parallel size if the model fits.")


# ---- addresses -------------------------------------------------------------------------------------

def _address_source(data: Mapping[str, Any]) -> str:
    return next((key for key in ("vllm_advertise_address", "ssh_hostname") if data.get(key)), "the host name")


def advertised_address(host_name: str, data: Mapping[str, Any]) -> str:
    """Where the load balancer reaches the host: vllm_advertise_address, else ssh_hostname, else
    the host name; refused unless an IP address or host name (nginx and the drain probe take it)."""
    source = _address_source(data)
    address = str(data[source]) if source in data else host_name
    if not forms.ADDRESS.test(address):
        raise FleetConfigError(f"host {host_name}: `vllm_advertise_address`",
                               f"is unset, so the load balancer would reach the host at {address!r} ({source}), "
                               f"which is not {forms.ADDRESS.what}.",
                               "set vllm_advertise_address to the address the load balancer reaches this host at.")
    return address


def _canonical(address: str) -> str:
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address.lower().rstrip(".")


def _is_loopback(address: str) -> bool:
    name = address.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _check_addresses(plans: Iterable[HostPlan]) -> None:
    """No two hosts behind one address: nginx would send both hosts' requests to one of them, and
    draining an instance of one would drain the other's."""
    seen: dict[str, str] = {}
    for host in plans:
        key = _canonical(host.address)
        if key in seen:
            raise FleetConfigError(
                f"host {host.name}: `vllm_advertise_address`",
                f"{host.address!r} (from {_address_source(host.data)}) is also host {seen[key]}'s address: nginx "
                "would send both hosts' requests to one of them, and draining one's instance would drain the "
                "other's.",
                "give every host its own address: set vllm_advertise_address (or ssh_hostname) to the address the "
                "load balancer reaches each host at.")
        seen[key] = host.name


def _check_reachable(host: HostPlan, lb_hosts: tuple[str, ...]) -> None:
    """Instances on loopback answer only their own host, at a loopback address."""
    listen = host.listen_address
    others = [name for name in lb_hosts if name != host.name]
    # Unset, vllm_listen_address follows the advertised address: that one is to blame then.
    loopback = next(((key, value) for key, value in (("vllm_listen_address", host.get("vllm_listen_address")),
                                                     ("vllm_advertise_address", host.address))
                     if value and _is_loopback(value)), None)
    if loopback and others:
        raise FleetConfigError(
            f"host {host.name}: `{loopback[0]}`",
            f"{loopback[1]!r} is a loopback address, but the load balancer {others[0]} is another host: it can "
            "never reach this host's instances.",
            "set vllm_advertise_address to an address of this host the load balancer reaches and leave "
            "vllm_listen_address unset (it follows vllm_advertise_address); or make this host the only load balancer.")
    if _is_loopback(listen) and not _is_loopback(host.address):
        raise FleetConfigError(
            f"host {host.name}: `vllm_listen_address`",
            f"{listen!r} is a loopback address, but nginx reaches the instances at {host.address!r} (from "
            f"{_address_source(host.data)}), where they do not listen.",
            f"set vllm_advertise_address to {listen} as well, or leave vllm_listen_address unset (it follows "
            "vllm_advertise_address).")


# ---- the fleet -----------------------------------------------------------------------------------------

def check_fleet(plans: tuple[HostPlan, ...], lb_hosts: tuple[str, ...]) -> None:
    """What the hosts behind one load balancer must agree on, and what it must reach."""
    batch_sizes = {p.get("vllm_rollout_batch_size") for p in plans}
    if len(batch_sizes) > 1:
        raise FleetConfigError("vllm_rollout_batch_size",
                               f"is {sorted(batch_sizes)} across the hosts; a rolling update has one batch size.",
                               "set one value for every host (group data), or leave the default 1.")
    names = {p.model.served_name for p in plans}
    if len(names) > 1:
        raise FleetConfigError("vllm_served_model_name",
                               f"hosts behind one load balancer serve different names: {sorted(names)}.",
                               "serve one model name across the fleet (set it in group data).")
    _check_addresses(plans)
    for host in plans:
        _check_reachable(host, lb_hosts)
        if host.name in lb_hosts:
            lb_port = settings.value(host.data, "nginx_listen_port")
            clash = [i.name for i in host.instances if i.port == lb_port]
            if clash:
                raise FleetConfigError(f"host {host.name}: instance {clash[0]}: port",
                                       f"port {lb_port} is the load balancer's nginx_listen_port on this host.",
                                       "move the instance or nginx_listen_port to another port.")
