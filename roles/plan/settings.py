"""Every user-facing setting of vllm-fleet, declared once: name, type, default, one line of doc.

Settings live in pyinfra host or group data. Each is prefixed by the role that reads it
(``vllm_``, ``nginx_``, ``nvidia_``). Settings marked ``per_instance`` may also be given, without the
prefix, inside one entry of ``vllm_instances`` to override the host's value for that
instance. ``vllm-fleet settings`` prints this table.

Any host-data key that starts with a role prefix but is not declared here is refused before
a host is touched, with the closest declared name as the fix: a misspelt setting must never
silently fall back to its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from roles.common import did_you_mean
from roles.errors import FleetConfigError

# Roles whose settings are validated; data keys with other prefixes belong to pyinfra or users.
ROLE_PREFIXES = ("vllm_", "nginx_", "nvidia_")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str
    per_instance: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def short_name(self) -> str:
        """The name used inside a ``vllm_instances`` entry."""
        return self.name.split("_", 1)[1]


SETTINGS: tuple[Setting, ...] = (
    # --- what to serve -------------------------------------------------------------------
    Setting("vllm_release", str, None,
            "Release manifest name in inventories/releases/ (required): pins vLLM, torch, transformers."),
    Setting("vllm_releases_dir", str, "inventories/releases",
            "Folder of release manifests and their locks, relative to where pyinfra runs."),
    Setting("vllm_accelerator", str, "cpu",
            "Hardware the instances run on; must match the release's accelerator.",
            choices=("cpu", "nvidia")),
    Setting("vllm_model_path", str, None,
            "Model directory on the control node; pushed to hosts and checked against its checksums."),
    Setting("vllm_model_id", str, None,
            "Hugging Face model id, downloaded on the host (alternative to vllm_model_path)."),
    Setting("vllm_model_revision", str, None,
            "Commit hash (40 hex digits) that vllm_model_id is pinned to; required with it."),
    Setting("vllm_served_model_name", str, None,
            "Model name clients send; defaults to the model directory name or the model id."),
    Setting("vllm_instances", list, None,
            "Instances on this host: a list of {name, port, <per-instance overrides>} (required)."),
    Setting("vllm_model_config", str, None,
            "config.json (or its folder) on the control node for a hub model; unset: "
            "inventories/model_configs/<org>--<name>/, then the control node's Hugging Face cache."),
    Setting("vllm_gpu_type", str, None,
            "GPU model of an NVIDIA host, an id of roles/gpus.py (e.g. h100-sxm) or of vllm_gpu_types."),
    Setting("vllm_gpu_count", int, None,
            "GPUs in an NVIDIA host; checked against the host (NVML) and the instances' GPUs."),
    Setting("vllm_gpu_types", dict, None,
            "Extra GPU models: {id: {memory_gib, bandwidth_tb_s, bf16, fp8}}, adding to roles/gpus.py."),
    Setting("vllm_advertise_address", str, None,
            "Address the load balancer uses to reach this host; defaults to ssh_hostname, then the host name."),
    # --- engine flags (per instance) ----------------------------------------------------------
    Setting("vllm_dtype", str, "auto", "Weight/activation dtype (--dtype).", per_instance=True,
            choices=("auto", "bfloat16", "float16", "float32", "half", "float")),
    Setting("vllm_max_model_len", int, None,
            "Longest prompt+output in tokens (--max-model-len); unset: the model's limit, capped to what "
            "the KV cache holds.", per_instance=True),
    Setting("vllm_max_num_seqs", int, None,
            "Most sequences batched at once (--max-num-seqs); unset: as many max-length sequences as the "
            "KV cache holds, at most 256.", per_instance=True),
    Setting("vllm_quantization", str, None,
            "Weight quantization: fp8 (on the fly, Ada/Hopper), awq or gptq (pre-quantized checkpoints).",
            per_instance=True, choices=("fp8", "awq", "gptq")),
    Setting("vllm_kv_cache_dtype", str, "auto", "KV cache dtype (--kv-cache-dtype); fp8 halves it on fp8 GPUs.",
            per_instance=True, choices=("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")),
    Setting("vllm_gpu_memory_utilization", float, 0.90,
            "Fraction of each GPU's memory vLLM may use (NVIDIA only).", per_instance=True),
    Setting("vllm_kv_cache_bytes", int, 1 << 30,
            "KV cache size in bytes on CPU hosts (--kv-cache-memory-bytes); CPU vLLM otherwise "
            "reserves a fraction of a whole NUMA node.", per_instance=True),
    Setting("vllm_enable_prefix_caching", bool, True,
            "Reuse KV cache across requests sharing a prefix.", per_instance=True),
    Setting("vllm_enable_chunked_prefill", bool, True,
            "Split long prefills so they do not stall decoding.", per_instance=True),
    Setting("vllm_tensor_parallel_size", int, None,
            "GPUs one instance is split across; unset: the smallest size the model fits in (1 on CPU).",
            per_instance=True),
    Setting("vllm_enforce_eager", bool, False,
            "Skip graph capture/compilation: faster start, slower serving.", per_instance=True),
    Setting("vllm_gpus", list, None,
            "GPU indices of an instance (CUDA_VISIBLE_DEVICES); unset: allocated in instance order.",
            per_instance=True),
    Setting("vllm_cpu_cores", str, None,
            "CPU cores an instance's threads are bound to (e.g. '0-3'); unset: the host's cores "
            "split evenly between its instances.", per_instance=True),
    Setting("vllm_extra_args", list, [], "Further vLLM flags, appended verbatim.", per_instance=True),
    Setting("vllm_api_key", str, None,
            "API key vLLM requires on /v1/* (passed through the environment, never on the command line).",
            per_instance=True),
    # --- host layout and lifecycle ----------------------------------------------------------------
    Setting("vllm_user", str, "vllm", "System user the instances run as."),
    Setting("vllm_install_dir", str, "/opt/vllm-fleet", "Venvs (one per release lock) and the 'current' link."),
    Setting("vllm_data_dir", str, "/var/lib/vllm-fleet", "Staged models and the Hugging Face cache."),
    Setting("vllm_listen_address", str, "0.0.0.0", "Address the instances listen on."),
    Setting("vllm_keep_releases", int, 3,
            "Release venvs kept on a host for instant rollback; older ones are removed (never the one in use)."),
    Setting("vllm_rollout_batch_size", int, 1,
            "Instances restarted together in a rolling update, after the first (the canary, always alone); "
            "the same on every host."),
    Setting("vllm_start_timeout", int, 900,
            "Seconds to wait for an instance's /health after a (re)start; large models load for minutes."),
    Setting("vllm_stop_timeout", int, 60,
            "Seconds systemd gives a stopping instance to exit after SIGTERM before it kills it (TimeoutStopSec)."),
    Setting("vllm_python", str, None,
            "Interpreter that builds the venv on the host; unset: the platform default (see roles/platform.py)."),
    # --- cost (used by `vllm-fleet plan`) -----------------------------------------------------
    Setting("vllm_gpu_hour_price", float, None, "What one GPU (or CPU host) costs per hour, in your currency."),
    Setting("vllm_tokens_per_s", float, None,
            "Generation throughput of one instance, measured or assumed, for the cost per million tokens."),
    Setting("vllm_api_price_per_million", float, None, "The API price per million tokens you compare against."),
    Setting("vllm_daily_tokens", int, None, "Tokens a day the fleet is expected to generate."),
    # --- NVIDIA hosts (roles/nvidia.py) ---------------------------------------------------------------
    Setting("nvidia_repo_url", str, None,
            "NVIDIA's CUDA apt repository or your mirror of it (the folder holding ubuntu2204/, debian12/); "
            "required on NVIDIA hosts."),
    Setting("nvidia_repo_key", str, "3bf863cc.pub", "File name of the repository's signing key, beside its packages."),
    Setting("nvidia_repo_key_fingerprint", str, "EB693B3035CD5710E231E123A4B469963BF863CC",
            "Fingerprint the downloaded signing key must have; a different key stops the host."),
    Setting("nvidia_allow_reboot", bool, False,
            "Reboot a host whose loaded driver module is not the pinned one; otherwise stop and say so."),
    Setting("nvidia_burnin", bool, False,
            "Run the GPU burn-in on every deploy (it always runs on a host's first onboarding)."),
    # --- load balancer -----------------------------------------------------------------------------
    Setting("nginx_listen_port", int, 80, "Port the load balancer listens on."),
    Setting("nginx_read_timeout", int, 900,
            "Seconds nginx waits between two reads from an instance; above the longest generation."),
    Setting("nginx_drain_timeout", int, 300,
            "Seconds an instance taken out of nginx for a restart may spend finishing its requests; then it "
            "restarts anyway."),
    Setting("nginx_max_fails", int, 1, "Failed connections before an instance is taken out (passive check)."),
    Setting("nginx_fail_timeout", int, 10, "Seconds an instance stays out after max_fails failures."),
    Setting("nginx_keepalive", int, 32, "Idle keepalive connections kept open to the instances per worker."),
    Setting("nginx_client_max_body_size", str, "64m",
            "Largest request body nginx accepts (client_max_body_size, e.g. 64m); long prompts and images need more."),
    Setting("nginx_connect_timeout", int, 5,
            "Seconds nginx waits to connect to an instance before it tries another (proxy_connect_timeout)."),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
PER_INSTANCE: dict[str, Setting] = {s.short_name: s for s in SETTINGS if s.per_instance}
# Keys an instance entry may hold besides the per-instance overrides.
INSTANCE_KEYS = ("name", "port")


def suggest(name: str, candidates: list[str]) -> str:
    """The fix for an unknown setting name: the closest declared one, else where the list is."""
    return did_you_mean(name, candidates) or "see `vllm-fleet settings` for the list."


def _check_type(field: str, setting: Setting, value: Any) -> None:
    if value is None:
        return
    expected = setting.type
    # bool is an int in Python; an int setting must not accept True, nor a float one a string.
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        name = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
        raise FleetConfigError(field, f"expected a {name}, got {value!r}.",
                               f"set `{setting.name}` to a {name} ({setting.doc})")
    if setting.choices and value not in setting.choices:
        raise FleetConfigError(field, f"{value!r} is not one of {', '.join(map(str, setting.choices))}.",
                               f"pick one of those for `{setting.name}`.")


def check_host_data(host_name: str, data: Mapping[str, Any]) -> None:
    """Refuse unknown role-prefixed keys and values of the wrong type in one host's data."""
    for key, value in data.items():
        if not key.startswith(ROLE_PREFIXES):
            continue
        setting = BY_NAME.get(key)
        if setting is None:
            raise FleetConfigError(
                f"host {host_name}: setting `{key}`", "is not a vllm-fleet setting.",
                f"{suggest(key, list(BY_NAME))} (misspelt settings are never ignored).")
        _check_type(f"host {host_name}: `{key}`", setting, value)


def check_instance_entry(host_name: str, index: int, entry: Any) -> None:
    """Refuse an instance entry that is not a mapping, lacks name/port, or holds unknown keys."""
    where = f"host {host_name}: vllm_instances[{index}]"
    if not isinstance(entry, Mapping):
        raise FleetConfigError(where, f"expected a mapping like {{name: a, port: 8001}}, got {entry!r}.",
                               "give each instance a name and a port.")
    for key, value in entry.items():
        if key in INSTANCE_KEYS:
            continue
        setting = PER_INSTANCE.get(key)
        if setting is None:
            raise FleetConfigError(
                f"{where}: `{key}`", "is not a per-instance setting.",
                suggest(key, list(INSTANCE_KEYS) + list(PER_INSTANCE)))
        _check_type(f"{where}: `{key}`", setting, value)


def value(data: Mapping[str, Any], name: str, instance: Mapping[str, Any] | None = None) -> Any:
    """A setting's effective value: instance override, then host/group data, then default."""
    setting = BY_NAME[name]
    if instance is not None and setting.per_instance and setting.short_name in instance:
        return instance[setting.short_name]
    found = data.get(name)
    return setting.default if found is None else found


def describe(which: Iterable[Setting] = SETTINGS) -> str:
    """The settings table (or some of its rows) as plain text, for the CLI and the docs."""
    lines = []
    for s in which:
        kind = s.type.__name__ if isinstance(s.type, type) else "/".join(t.__name__ for t in s.type)
        scope = " [per instance]" if s.per_instance else ""
        lines.append(f"{s.name} ({kind}, default {s.default!r}){scope}\n    {s.doc}")
    return "\n".join(lines)
