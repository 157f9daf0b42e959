"""Every user-facing setting of vllm-fleet, declared once: name, type, default, one line of doc.

Settings live in pyinfra host or group data. Each is prefixed by the role that reads it
(``vllm_``, ``nginx_``, ``nvidia_``, ``firewall_``, ``monitor_``, ``grafana_``, ``cache_``). Settings marked
``per_instance`` may also be given, without the
prefix, inside one entry of ``vllm_instances`` to override the host's value for that
instance. ``vllm-fleet settings`` prints this table; ``roles.plan.setting_checks`` refuses what
it does not allow (an undeclared role-prefixed key among them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from roles.plan.forms import (
    ABSOLUTE_PATH,
    ADDRESS,
    APT_SUITE,
    COMMIT,
    CPU_LIST,
    DEB_VERSION,
    DURATION,
    EDGE_ROUTES,
    ENGINE_ARG,
    FILE_NAME,
    FINGERPRINT,
    GRAFANA_LOGIN,
    HF_REPO_ID,
    HTTPS_URL,
    INSTANCE_NAME,
    IP_ADDRESS,
    IP_NETWORK,
    NET_INTERFACE,
    NGINX_SIZE,
    POSIX_USER,
    PYTHON,
    RDMA_DEVICE,
    RELATIVE_OR_ABSOLUTE_PATH,
    RELEASE_NAME,
    SERVED_NAME,
    TASK_ROUTE,
    URL,
    Form,
)

# Roles whose settings are validated; data keys with other prefixes belong to pyinfra or users.
ROLE_PREFIXES = ("vllm_", "nginx_", "nvidia_", "firewall_", "monitor_", "grafana_", "cache_")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str
    per_instance: bool = False
    choices: tuple[Any, ...] = ()
    # Bounds of a number, or of each element of a list; ``above`` is an exclusive lower bound.
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    item: type | tuple[type, ...] | None = None  # element type of a list
    form: Form | None = None  # what a string, or each element of a list, may be

    @property
    def short_name(self) -> str:
        """The name used inside a ``vllm_instances`` entry."""
        return self.name.split("_", 1)[1]

    def bounds(self) -> str:
        """The allowed numbers in words ("" when any number is), e.g. "from 1024 to 65535"."""
        def num(x: float) -> str:
            return str(x) if isinstance(x, int) else f"{x:g}"

        low = f"above {num(self.above)}" if self.above is not None else \
            f"at least {num(self.minimum)}" if self.minimum is not None else ""
        if self.maximum is None:
            return low
        if self.minimum is not None and self.above is None:
            return f"from {num(self.minimum)} to {num(self.maximum)}"
        return f"{low} and at most {num(self.maximum)}" if low else f"at most {num(self.maximum)}"


SETTINGS: tuple[Setting, ...] = (
    # --- what to serve -------------------------------------------------------------------
    Setting("vllm_release", str, None,
            "Release manifest name in inventories/releases/ (required): pins vLLM, torch, transformers.",
            form=RELEASE_NAME),
    Setting("vllm_releases_dir", str, "inventories/releases",
            "Folder of release manifests and their locks, relative to where pyinfra runs."),
    Setting("vllm_accelerator", str, "cpu",
            "Hardware the instances run on; must match the release's accelerator.",
            choices=("cpu", "nvidia")),
    Setting("vllm_model_path", str, None,
            "Model directory on the control node; sent once to the artifact cache, which every host pulls it from "
            "and checks against its checksums."),
    Setting("vllm_model_id", str, None,
            "Hugging Face model id (alternative to vllm_model_path), downloaded once as vllm_hub_download says and "
            "checked against the revision's published sizes and sha256.", form=HF_REPO_ID),
    Setting("vllm_model_revision", str, None,
            "Commit hash (40 hex digits) that vllm_model_id is pinned to; required with it.", form=COMMIT),
    Setting("vllm_served_model_name", str, None,
            "Model name clients send; defaults to the model directory name or the model id.", form=SERVED_NAME),
    Setting("vllm_instances", list, None,
            "Instances on this host: a list of {name, port, <per-instance overrides>} (required); name: "
            "lower-case letters, digits and '-'; port: 1024 to 65535 (instances run unprivileged)."),
    Setting("vllm_instance_groups", list, None,
            "Instances that span hosts (one vLLM instance over several, when a model fits no one host): a list "
            "of {name, hosts, port, master_port, <per-instance overrides>}; hosts: the group's vllm hosts, the "
            "first leads (nginx sends it the traffic), each runs one pipeline stage tensor-parallel over its "
            "GPUs; master_port: the leader's rendezvous port (default 29500), open to the group's hosts only. "
            "The same list on every host (group data); a host in a group has no vllm_instances."),
    Setting("vllm_group_interface", str, None,
            "Network interface an instance group's collective traffic leaves this host by (GLOO_SOCKET_IFNAME, "
            "NCCL_SOCKET_IFNAME); unset: the interface holding the host's address.", form=NET_INTERFACE),
    Setting("vllm_group_rdma_devices", list, None,
            "InfiniBand/RoCE adapters NCCL uses between the hosts of an instance group (NCCL_IB_HCA), e.g. "
            "[mlx5_0, mlx5_1]; unset: TCP sockets only, and the plan warns.", item=str, form=RDMA_DEVICE),
    Setting("vllm_group_hang_timeout", int, 60,
            "Seconds a one-token completion may take on an instance group's leader while its /health answers, "
            "before the group's watchdog restarts the leader (a lost stage hangs every request).", minimum=5),
    Setting("vllm_hub_download", str, "cache",
            "Where a hub model is downloaded: cache (once, on the artifact cache host; every host pulls it from "
            "there), control (once, on the control node, then sent to the cache), or hosts (every host from "
            "vllm_hf_endpoint, e.g. your Hub mirror; nothing goes through the cache).",
            choices=("cache", "control", "hosts")),
    Setting("vllm_hf_endpoint", str, None,
            "The Hugging Face Hub, or your mirror or proxy of it, that hub models come from; unset: the control "
            "node's HF_ENDPOINT, else huggingface_hub's own default. A gated model's token: hub.token in "
            "nginx_secrets_dir (`vllm-fleet keys hub`).", form=URL),
    Setting("vllm_model_config", str, None,
            "config.json (or its folder) on the control node for a hub model; unset: "
            "inventories/model_configs/<org>--<name>/, then the control node's Hugging Face cache."),
    Setting("vllm_gpu_type", str, None,
            "GPU model of an NVIDIA host, an id of `vllm-fleet gpus` (e.g. h100-sxm) or of vllm_gpu_types."),
    Setting("vllm_gpu_count", int, None,
            "GPUs in an NVIDIA host; checked against the host (NVML) and the instances' GPUs.",
            minimum=1, maximum=16),
    Setting("vllm_gpu_types", dict, None,
            "Extra GPU models: {id: {memory_gib, bandwidth_tb_s, bf16, fp8, compute_capability (optional)}}, "
            "adding to roles/plan/gpus.py."),
    Setting("vllm_advertise_address", str, None,
            "Address the load balancer uses to reach this host; defaults to ssh_hostname, then the host name.",
            form=ADDRESS),
    # --- engine flags (per instance) ----------------------------------------------------------
    Setting("vllm_dtype", str, "auto", "Weight/activation dtype (--dtype).", per_instance=True,
            choices=("auto", "bfloat16", "float16", "float32", "half", "float")),
    Setting("vllm_max_model_len", int, None,
            "Longest prompt+output in tokens (--max-model-len); unset: the model's limit, capped to what "
            "the KV cache holds.", per_instance=True, minimum=1),
    Setting("vllm_max_num_seqs", int, None,
            "Most sequences batched at once (--max-num-seqs); unset: as many max-length sequences as the "
            "KV cache holds, at most 256.", per_instance=True, minimum=1),
    Setting("vllm_quantization", str, None,
            "Weight quantization: fp8 (on the fly; Ada/Hopper, weight-only on Ampere), awq or gptq (pre-quantized "
            "checkpoints). Unset: a quantized checkpoint runs in its own format.",
            per_instance=True, choices=("fp8", "awq", "gptq")),
    Setting("vllm_kv_cache_dtype", str, "auto", "KV cache dtype (--kv-cache-dtype); fp8 halves it (fp8_e4m3 needs an fp8 GPU, fp8_e5m2 runs from Ampere).",
            per_instance=True, choices=("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")),
    Setting("vllm_gpu_memory_utilization", float, 0.90,
            "Fraction of each GPU's memory vLLM may use (NVIDIA only).", per_instance=True, above=0, maximum=1),
    Setting("vllm_kv_cache_bytes", int, 1 << 30,
            "KV cache size in bytes on CPU hosts (--kv-cache-memory-bytes); CPU vLLM otherwise "
            "reserves a fraction of a whole NUMA node.", per_instance=True, minimum=1 << 20),
    Setting("vllm_enable_prefix_caching", bool, True,
            "Reuse KV cache across requests sharing a prefix.", per_instance=True),
    Setting("vllm_enable_chunked_prefill", bool, True,
            "Split long prefills so they do not stall decoding.", per_instance=True),
    Setting("vllm_tensor_parallel_size", int, None,
            "GPUs one instance is split across; unset: the smallest size the model fits in (1 on CPU).",
            per_instance=True, minimum=1),
    Setting("vllm_enforce_eager", bool, False,
            "Skip graph capture/compilation: faster start, slower serving.", per_instance=True),
    Setting("vllm_gpus", list, None,
            "GPU indices of an instance (CUDA_VISIBLE_DEVICES), below vllm_gpu_count; unset: allocated in "
            "instance order.", per_instance=True, item=int, minimum=0),
    Setting("vllm_cpu_cores", str, None,
            "CPU cores an instance's threads are bound to (e.g. '0-3'); unset: the host's cores "
            "split evenly between its instances.", per_instance=True, form=CPU_LIST),
    Setting("vllm_extra_args", list, [],
            "Further vLLM flags, appended verbatim; never one a setting owns, nor a secret (instances get their API key "
            "from the fleet's secrets, through the environment).",
            per_instance=True, item=(str, int, float), form=ENGINE_ARG),
    # --- host layout and lifecycle ----------------------------------------------------------------
    Setting("vllm_user", str, "vllm", "System user the instances run as.", form=POSIX_USER),
    Setting("vllm_install_dir", str, "/opt/vllm-fleet", "Venvs (one per release lock) and the 'current' link.",
            form=ABSOLUTE_PATH),
    Setting("vllm_data_dir", str, "/var/lib/vllm-fleet", "Staged models and the Hugging Face cache.",
            form=ABSOLUTE_PATH),
    Setting("vllm_listen_address", str, None,
            "Address the instances listen on; unset: vllm_advertise_address (what the load balancer reaches), "
            "so no instance listens on every interface. A loopback one only when the load balancer is this host.",
            form=ADDRESS),
    Setting("vllm_keep_releases", int, 3,
            "Release venvs kept on a host for instant rollback; older ones are removed (never the one in use).",
            minimum=1),
    Setting("vllm_rollout_batch_size", int, 1,
            "Instances restarted together in a rolling update, after the first (the canary, always alone); "
            "the same on every host.", minimum=1),
    Setting("vllm_start_timeout", int, 900,
            "Seconds to wait for an instance's /health after a (re)start; large models load for minutes.",
            minimum=1),
    Setting("vllm_stop_timeout", int, 60,
            "Seconds systemd gives a stopping instance to exit after SIGTERM before it kills it (TimeoutStopSec).",
            minimum=1),
    Setting("vllm_python", str, None,
            "Interpreter that builds the venv on the host; unset: the platform default (see roles/platform.py).",
            form=PYTHON),
    # --- cost (used by `vllm-fleet plan`) -----------------------------------------------------
    Setting("vllm_gpu_hour_price", float, None, "What one GPU (or CPU host) costs per hour, in your currency.",
            minimum=0),
    Setting("vllm_tokens_per_s", float, None,
            "Generation throughput of one instance, measured or assumed, for the cost per million tokens.",
            above=0),
    Setting("vllm_api_price_per_million", float, None, "The API price per million tokens you compare against.",
            above=0),
    Setting("vllm_daily_tokens", int, None, "Tokens a day the fleet is expected to generate.", minimum=0),
    Setting("vllm_fallback_price_per_million", float, None,
            "The fallback provider's price per million tokens (nginx_fallback), for the plan's cost of it.", above=0),
    Setting("vllm_fallback_share", float, 0.05, "Share of vllm_daily_tokens you expect the fallback to carry.",
            minimum=0, maximum=1),
    # --- NVIDIA hosts (roles/nvidia.py) ---------------------------------------------------------------
    Setting("nvidia_repo_url", str, None,
            "NVIDIA's CUDA apt repository or your mirror of it (the folder holding ubuntu2204/, debian12/); "
            "required on NVIDIA hosts.", form=URL),
    Setting("nvidia_repo_key", str, "3bf863cc.pub", "File name of the repository's signing key, beside its packages.",
            form=FILE_NAME),
    Setting("nvidia_repo_key_fingerprint", str, "EB693B3035CD5710E231E123A4B469963BF863CC",
            "Fingerprint the downloaded signing key must have; a different key stops the host.", form=FINGERPRINT),
    Setting("nvidia_allow_reboot", bool, False,
            "Reboot a host whose loaded driver module is not the pinned one; otherwise stop and say so."),
    Setting("nvidia_burnin", bool, False,
            "Run the GPU burn-in on every deploy (it always runs on a host's first onboarding)."),
    # --- load balancer -----------------------------------------------------------------------------
    Setting("nginx_listen_port", int, 443, "Port the load balancer serves HTTPS on (nginx starts as root: below "
            "1024 is fine).", minimum=1, maximum=65535),
    Setting("nginx_http_redirect_port", int, None,
            "Port where plain HTTP answers with a redirect to HTTPS; unset: nothing listens for plain HTTP.",
            minimum=1, maximum=65535),
    Setting("nginx_secrets_dir", str, None,
            "Folder on the control node, outside git, holding the fleet's secrets (required on load balancer "
            "hosts): clients.toml (client names and keys: `vllm-fleet keys add`), and what the deploy generates: "
            "the instances' internal key, the smoke test's key, the fleet CA and the edge certificates. Relative "
            "to where pyinfra runs.", form=RELATIVE_OR_ABSOLUTE_PATH),
    Setting("nginx_tls_certificate", str, None,
            "Your certificate (PEM, chain included) for the edge, on the control node; unset: one issued by the "
            "fleet's own CA in nginx_secrets_dir. Set with nginx_tls_key.", form=RELATIVE_OR_ABSOLUTE_PATH),
    Setting("nginx_tls_key", str, None, "The private key of nginx_tls_certificate, on the control node.",
            form=RELATIVE_OR_ABSOLUTE_PATH),
    Setting("nginx_server_name", str, None,
            "Name (or address) clients reach the edge at, which its certificate must cover; unset: the load "
            "balancer's vllm_advertise_address, else ssh_hostname, else its host name.", form=ADDRESS),
    Setting("nginx_client_rate", int, 10,
            "Requests per second each client may send (nginx limit_req); above it: 429 with Retry-After. "
            "A client's own `rate` in clients.toml overrides it.", minimum=1),
    Setting("nginx_client_burst", int, 20,
            "Requests a client may send at once above its rate before the 429s start (limit_req burst).",
            minimum=0),
    Setting("nginx_client_concurrency", int, 16,
            "Requests each client may have in flight at once (nginx limit_conn); above it: 429. A client's own "
            "`concurrency` in clients.toml overrides it.", minimum=1),
    Setting("nginx_read_timeout", int, 900,
            "Seconds nginx waits between two reads from an instance; above the longest generation.", minimum=1),
    Setting("nginx_drain_timeout", int, 300,
            "Seconds an instance taken out of nginx for a restart may spend finishing its requests; then it "
            "restarts anyway.", minimum=0),
    Setting("nginx_max_fails", int, 1,
            "Failed connections before an instance is taken out (passive check); 0 never takes one out.", minimum=0),
    Setting("nginx_fail_timeout", int, 10, "Seconds an instance stays out after max_fails failures.", minimum=1),
    Setting("nginx_keepalive", int, 0,
            "Idle connections to the instances nginx keeps for reuse, per worker; 0: a new one per request, so that "
            "a host that vanished fails at connect and the request goes elsewhere (a reused one carries it away).",
            minimum=0),
    Setting("nginx_client_max_body_size", str, "64m",
            "Largest request body nginx accepts (client_max_body_size, e.g. 64m); long prompts and images need more.",
            form=NGINX_SIZE),
    Setting("nginx_connect_timeout", int, 5,
            "Seconds nginx waits to connect to an instance before it tries another (proxy_connect_timeout; nginx "
            "allows at most 75).", minimum=1, maximum=75),
    Setting("nginx_task_routes", list, [],
            f"Routes the edge forwards besides {', '.join(EDGE_ROUTES)} and /health, for the served model's task "
            "(e.g. /v1/embeddings); every other path answers 404 at the edge.", item=str, form=TASK_ROUTE),
    Setting("nginx_routing", str, "least_conn",
            "Which instance a request goes to: least_conn (the one with the fewest in flight), session (one "
            "X-Session-ID header value to one instance) or prefix (prompts that begin alike to one instance, whose "
            "prefix cache holds it; nginx's njs module reads each body, held whole in memory). Without a session id "
            "or a prompt: least_conn.", choices=("least_conn", "session", "prefix")),
    Setting("nginx_prefix_chars", int, 1024,
            "With nginx_routing = prefix, how many first characters of a completion's prompt, or of a chat's "
            "opening (its messages up to and with the first user message), choose the instance: fewer than the "
            "beginning your requests share, or requests sharing it spread apart.", minimum=16),
    Setting("nginx_instances_down", list, [],
            "Instances no load balancer sends requests to, as HOST:INSTANCE (maintenance, or one instance alone "
            "behind the edge to measure it); a rolling update never puts them back. Never all of them.", item=str),
    Setting("nginx_fallback", str, "off",
            "Where a request goes that no instance can take: off (the client gets the 502 or 503); failover: to "
            "nginx_fallback_url when every instance is down or refuses it; overflow: also when every one has "
            "nginx_instance_cap requests in flight. A request an instance received is never sent again.",
            choices=("off", "failover", "overflow")),
    Setting("nginx_fallback_url", str, None,
            "Base URL of the fallback's OpenAI-compatible API as its SDK takes it (e.g. https://api.example.com/v1); "
            "its key: fallback.key in nginx_secrets_dir (`vllm-fleet keys fallback`).", form=HTTPS_URL),
    Setting("nginx_fallback_model", str, None,
            "The provider's name for the fleet's model (clients still ask for vllm_served_model_name).",
            form=SERVED_NAME),
    Setting("nginx_fallback_ca", str, None, "CA certificates (PEM, on the control node) the provider's certificate "
            "must chain to; unset: the load balancer's system CAs.", form=RELATIVE_OR_ABSOLUTE_PATH),
    Setting("nginx_fallback_connect_timeout", int, 5, "Seconds nginx waits to connect to the provider.", minimum=1,
            maximum=75),
    Setting("nginx_fallback_read_timeout", int, 300, "Seconds nginx waits between two reads from the provider.",
            minimum=1),
    Setting("nginx_instance_cap", int, None,
            "With nginx_fallback = overflow, requests nginx sends one instance at once; unset: its --max-num-seqs.",
            minimum=1),
    Setting("nginx_dead_peer_timeout", int, 30,
            "Seconds after which a connection to an instance that no longer answers even TCP keepalive probes (a "
            "host cut off) is dropped: its request fails, and the instance gets no new one.", minimum=6, maximum=600),
    # --- artifact cache (roles/cache.py; the `cache` group, else the first load balancer) -----------------
    Setting("cache_port", int, 8480,
            "Port the artifact cache (nginx on the cache host, at its vllm_advertise_address) serves release wheels "
            "and models on, to cache_allow_from alone.", minimum=1, maximum=65535),
    Setting("cache_dir", str, "/var/lib/vllm-fleet/cache",
            "Where the cache host keeps every wheel and model the control node sent it (once each).",
            form=ABSOLUTE_PATH),
    Setting("cache_allow_from", list, [],
            "Addresses or networks that may fetch from the cache (nginx and the host firewall let in no one else); "
            "unset: every host of the inventory, by its address, which must then be an IP.",
            item=str, form=IP_NETWORK),
    # --- host firewall (roles/firewall.py) ---------------------------------------------------------------
    Setting("firewall_enabled", bool, True,
            "Filter incoming traffic with nftables: SSH, the edge's ports on load balancers, instance ports from "
            "the load balancers only; everything else dropped."),
    Setting("firewall_allow_tcp", list, [],
            "Further TCP ports this host accepts from anywhere (services of your own); the firewall drops the rest.",
            item=int, minimum=1, maximum=65535),
    Setting("firewall_instance_allow_from", list, [],
            "Addresses or networks allowed to reach the instance ports directly, past the edge (its keys, limits "
            "and TLS), besides the load balancers and monitoring hosts: e.g. the control node, for `vllm-fleet "
            "bench --direct`. The instances still want the fleet's internal key.", item=str, form=IP_NETWORK),
    # --- monitoring (roles/monitor.py; hosts of the `monitor` group) ---------------------------------------
    Setting("monitor_retention", str, "15d", "How long Prometheus keeps samples (--storage.tsdb.retention.time).",
            form=DURATION),
    Setting("monitor_storage_path", str, "/var/lib/prometheus/metrics2",
            "Where Prometheus keeps its samples on the monitor host.", form=ABSOLUTE_PATH),
    Setting("monitor_scrape_interval", int, 15, "Seconds between two scrapes of every target.", minimum=1,
            maximum=300),
    Setting("monitor_webhook_url", str, None,
            "Where Alertmanager sends alerts (its webhook receiver, e.g. your chat or paging bridge); unset: alerts "
            "are only shown in Alertmanager.", form=URL),
    Setting("monitor_queue_waiting_max", int, 10,
            "Alert when an instance has more requests waiting (vllm:num_requests_waiting) for 5 minutes.", minimum=1),
    Setting("monitor_kv_cache_usage_max", float, 0.95,
            "Alert when an instance's KV cache is fuller than this fraction for 5 minutes.", above=0, maximum=1),
    Setting("monitor_ttft_p95_max_s", float, 2.0, "Alert when the fleet's time to first token p95 is above this "
            "(seconds) for 10 minutes: the SLO.", above=0),
    Setting("monitor_itl_p95_max_s", float, 0.2, "Alert when the inter-token latency p95 is above this (seconds) "
            "for 10 minutes: the SLO.", above=0),
    Setting("monitor_lb_5xx_ratio_max", float, 0.05,
            "Alert when more than this share of the edge's responses are 5xx for 5 minutes.", above=0, maximum=1),
    Setting("monitor_fallback_share_max", float, 0.25,
            "Alert when the fallback provider answers more than this share of the edge's requests for 10 minutes "
            "(what it serves is paid for).", above=0, maximum=1),
    Setting("monitor_gpu_temperature_max_c", int, 85, "Alert when a GPU is hotter than this (Celsius) for 5 minutes.",
            minimum=1),
    Setting("monitor_disk_free_min", float, 0.10,
            "Alert when the model cache's file system has less than this fraction free.", above=0, maximum=1),
    # --- Grafana (roles/grafana.py; hosts of the `grafana` group, each a monitor host too) ----------------
    Setting("grafana_repo_url", str, None,
            "An apt repository serving Grafana's `grafana` package (your mirror of Grafana's own: the folder holding "
            "dists/ and the signing key); required on grafana hosts, which the distributions' archives do not "
            "serve Grafana to.", form=HTTPS_URL),
    Setting("grafana_repo_suite", str, "stable", "The repository's suite: stable, or beta for Grafana's pre-releases.",
            form=APT_SUITE),
    Setting("grafana_repo_key", str, "gpg-full.key",
            "File name of the repository's signing key, at the top of grafana_repo_url.", form=FILE_NAME),
    Setting("grafana_repo_key_fingerprint", str, "B53AE77BADB630A683046005963FA27710458545",
            "Fingerprint the downloaded signing key must have; a different key stops the host.", form=FINGERPRINT),
    Setting("grafana_version", str, None,
            "Version of the grafana package, exactly as `apt-cache policy grafana` lists it (e.g. 12.1.1): pinned "
            "and held; required on grafana hosts (a newer Grafana migrates its database one way, so it comes only "
            "when you change this).", form=DEB_VERSION),
    Setting("grafana_listen_address", str, "127.0.0.1",
            "Address Grafana listens on; loopback by default (`ssh -L 3000:127.0.0.1:3000 HOST` to look). Another "
            "one needs grafana_allow_from.", form=IP_ADDRESS),
    Setting("grafana_port", int, 3000, "Port Grafana listens on (1024 or above: it runs unprivileged).",
            minimum=1024, maximum=65535),
    Setting("grafana_allow_from", list, [],
            "Addresses or networks allowed to reach Grafana when grafana_listen_address is not loopback (the host "
            "firewall opens grafana_port to them alone, never to everyone: Grafana serves plain HTTP).",
            item=str, form=IP_NETWORK),
    Setting("grafana_root_url", str, None,
            "URL browsers reach Grafana at, when it is not http://localhost:grafana_port/ (a proxy of your own); "
            "Grafana builds its links and redirects from it.", form=URL),
    Setting("grafana_admin_user", str, "admin",
            "Grafana's administrator; its password is generated once into nginx_secrets_dir "
            "(grafana-admin.password).", form=GRAFANA_LOGIN),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
PER_INSTANCE: dict[str, Setting] = {s.short_name: s for s in SETTINGS if s.per_instance}
# Keys every instance entry holds besides the per-instance overrides.
INSTANCE_KEYS: dict[str, Setting] = {
    "name": Setting("name", str, None, "Names the unit vllm@NAME; unique on its host.", form=INSTANCE_NAME),
    "port": Setting("port", int, None, "TCP port the instance listens on; unique on its host, and 1024 or "
                    "above since the unit runs unprivileged, as vllm_user.", minimum=1024, maximum=65535),
}


def value(data: Mapping[str, Any], name: str, instance: Mapping[str, Any] | None = None) -> Any:
    """A setting's effective value: instance override, then host/group data, then default (None
    counts as unset at every level)."""
    setting = BY_NAME[name]
    if instance is not None and setting.per_instance and instance.get(setting.short_name) is not None:
        return instance[setting.short_name]
    found = data.get(name)
    return setting.default if found is None else found
