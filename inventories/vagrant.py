"""Two Ubuntu 22.04 VMs from the Vagrantfile; settings shared with the lab in group_data/all.py."""

_sudo = {"_sudo": True}

vllm = [
    ("@vagrant/fleet1", {**_sudo, "vllm_advertise_address": "192.168.56.11",
                         "vllm_instances": [{"name": "a", "port": 8001}, {"name": "b", "port": 8002}]}),
    ("@vagrant/fleet2", {**_sudo, "vllm_advertise_address": "192.168.56.12",
                         "vllm_instances": [{"name": "a", "port": 8001}]}),
]
lb = [("@vagrant/fleet1", _sudo)]
