"""The local lab: systemd-nspawn hosts brought up by `python -m roles.lab up`.

Two hosts: lab1 runs two instances and the load balancer, lab2 runs one instance.
Shared settings are in inventories/group_data/all.py.
"""

from roles.lab import load_state

_lab = load_state()
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
    (h["name"], {"ssh_hostname": h["address"], **_ssh,
                 "vllm_instances": _INSTANCES[i] if i < len(_INSTANCES) else _INSTANCES[-1]})
    for i, h in enumerate(_lab["hosts"])
]
lb = [(_lab["hosts"][0]["name"], {"ssh_hostname": _lab["hosts"][0]["address"], **_ssh})]
