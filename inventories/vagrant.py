"""Two Ubuntu 22.04 VMs from the Vagrantfile, to try a deploy on real VMs instead of the nspawn
lab: `vagrant up`, then `pyinfra inventories/vagrant.py deploys/vllm.py` from the repository root.

The hosts are reached over ssh at the private-network addresses the Vagrantfile gives them,
with the keys Vagrant generated, so planning (`vllm-fleet plan inventories/vagrant.py`) needs
neither Vagrant nor the VMs. They are CPU hosts serving the lab's tiny model (`make lab` builds
it, or `vllm-fleet lab model .cache/models/tiny-llama`); fleet1 also runs the load balancer.
"""

from roles.preflight import plan_before_connecting

_FLEET = {
    "vllm_release": "cpu-vllm-0.32.0",  # resolved for Python 3.11: python3.11 on Ubuntu 22.04
    "vllm_accelerator": "cpu",
    "vllm_model_path": ".cache/models/tiny-llama",
    "vllm_served_model_name": "tiny-llama",
    "vllm_max_model_len": 1024,
    "vllm_max_num_seqs": 16,
    # Two vCPUs and 6 GiB per VM (Vagrantfile): small KV caches, no graph compilation.
    "vllm_kv_cache_bytes": 268435456,
    "vllm_enforce_eager": True,
    "vllm_start_timeout": 300,
    "ssh_user": "vagrant",
    "_sudo": True,
}


def _vm(name: str, address: str) -> dict:
    return {**_FLEET, "ssh_hostname": address,
            "ssh_key": f".vagrant/machines/{name}/virtualbox/private_key",
            # Each `vagrant up` makes new host keys.
            "ssh_known_hosts_file": "/dev/null", "ssh_strict_host_key_checking": "no"}


vllm = [
    ("fleet1", {**_vm("fleet1", "192.168.56.11"),
                "vllm_instances": [{"name": "a", "port": 8001}, {"name": "b", "port": 8002}]}),
    ("fleet2", {**_vm("fleet2", "192.168.56.12"), "vllm_instances": [{"name": "a", "port": 8001}]}),
]
lb = ["fleet1"]

# Plan the fleet while pyinfra loads this file: a configuration that cannot work is refused
# here, before pyinfra connects to any host.
plan_before_connecting(globals())
