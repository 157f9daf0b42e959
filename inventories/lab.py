"""The local lab: systemd-nspawn hosts brought up by `vllm-fleet lab up`.

Two hosts: lab1 runs two instances and the load balancer, lab2 runs one instance. Every
setting, its type and default: `vllm-fleet settings` (declared in roles/plan/settings.py).
"""

from roles.lab.config import PROVIDER_PORT, STATE_DIR, load_state
from roles.preflight import plan_before_connecting

_lab = load_state()
# Settings of the whole lab fleet (kept here, not in group_data/, which every inventory in
# this folder would share).
_FLEET = {
    "vllm_release": "cpu-vllm-0.32.0",
    "vllm_accelerator": "cpu",
    # Built by `make lab` (vllm-fleet lab model .cache/models/tiny-llama): a random-weight Llama.
    "vllm_model_path": ".cache/models/tiny-llama",
    "vllm_served_model_name": "tiny-llama",
    "vllm_max_model_len": 1024,
    "vllm_max_num_seqs": 16,
    # Two cores shared by three instances: small caches, no graph compilation (starts in ~25 s).
    "vllm_kv_cache_bytes": 268435456,
    "vllm_enforce_eager": True,
    "vllm_start_timeout": 300,
    # This machine (the lab's control node) reaches the instances straight as well as through the
    # edge: `vllm-fleet bench --direct` and its LB-overhead measurement compare the two.
    "firewall_instance_allow_from": [_lab["control_address"]],
    # Cache-aware routing (nginx's njs module): the lab's kill -9 and rolling-update tests run under
    # it; tests/lab/test_lab_routing.py deploys the other policies and puts this one back.
    "nginx_routing": "prefix",
}

_ssh = {
    "ssh_user": _lab["ssh_user"],
    "ssh_key": _lab["ssh_key"],
    # Lab hosts are recreated with new host keys; never record them.
    "ssh_known_hosts_file": "/dev/null",
    "ssh_strict_host_key_checking": "no",
}
# Instances per lab host, in host order; hosts beyond this list get one instance.
# Lab hosts share this machine's cores, so the per-host default (a host's cores split between
# its instances) would give lab2's instance both cores that lab1's instances are bound to.
# An instance with two OpenMP threads on contended cores stalls for minutes at its thread
# barriers; one core per instance keeps every instance single-threaded.
_INSTANCES = [
    [{"name": "a", "port": 8001, "cpu_cores": "0"}, {"name": "b", "port": 8002, "cpu_cores": "1"}],
    [{"name": "a", "port": 8001, "cpu_cores": "1"}],
]

vllm = [
    (h["name"], {"ssh_hostname": h["address"], **_ssh, **_FLEET,
                 "vllm_instances": _INSTANCES[i] if i < len(_INSTANCES) else _INSTANCES[-1]})
    for i, h in enumerate(_lab["hosts"])
]
# The last host may also run the lab's stand-in fallback provider (roles/lab/provider.py, for
# tests/lab/test_lab_fallback.py): its TLS port is open there, where nothing listens otherwise.
vllm[-1][1]["firewall_allow_tcp"] = [PROVIDER_PORT]
# The lab's secrets live with the lab, outside git: `vllm-fleet lab up` writes clients.toml (one
# client, "lab"); the deploy generates the rest (the instances' internal key, the fleet CA and the
# edge's certificate). A production inventory keeps them in a .gitignored folder (see prod.py).
lb = [(_lab["hosts"][0]["name"], {"ssh_hostname": _lab["hosts"][0]["address"], **_ssh,
                                  "nginx_secrets_dir": str(STATE_DIR / "secrets")})]

# Prometheus and Alertmanager on the last lab host (lab2 of two): it scrapes every instance, every
# host's node exporter and lab1's nginx exporter.
monitor = [(_lab["hosts"][-1]["name"], {"ssh_hostname": _lab["hosts"][-1]["address"], **_ssh})]

# Plan the fleet while pyinfra loads this file: a configuration that cannot work is refused
# here, before pyinfra connects to any host.
plan_before_connecting(globals())
