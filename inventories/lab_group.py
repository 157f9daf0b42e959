"""The lab with one multi-host instance: the lab's tiny model served by a single vLLM instance,
pipeline-parallel 2 over lab1 and lab2 (one stage per host, gloo over the lab bridge), behind
lab1's nginx. tests/lab/test_lab_group.py deploys it, and the lab's own inventories/lab.py
(three single-host instances) back after: `pyinfra -y inventories/lab_group.py deploys/vllm.py`.
"""

import runpy
from pathlib import Path

from roles.preflight import plan_before_connecting

# The lab's own inventory, run as pyinfra runs it (by path: inventories/ is no package): its
# settings, its load balancer and its monitor host are this one's too.
_lab_inventory = runpy.run_path(str(Path(__file__).with_name("lab.py")))
_lab, _ssh, _FLEET = _lab_inventory["_lab"], _lab_inventory["_ssh"], _lab_inventory["_FLEET"]
lb, monitor = _lab_inventory["lb"], _lab_inventory["monitor"]

# On a port none of inventories/lab.py's instances uses: the group's stages start while those
# still run, and stop only once nginx has forgotten them.
_GROUP_PORT = 8003
_group = {"name": "pp", "hosts": [h["name"] for h in _lab["hosts"][:2]], "port": _GROUP_PORT}
# A one-token completion of the tiny model takes milliseconds: a lost stage is told from a slow
# engine long before the default minute.
_FLEET = {**_FLEET, "vllm_group_hang_timeout": 15}

# The lab hosts share this machine's two cores: one core per stage, as inventories/lab.py gives
# one per instance (an OpenMP thread pair on contended cores stalls at its barriers).
vllm = [
    (h["name"], {"ssh_hostname": h["address"], **_ssh, **_FLEET, "vllm_cpu_cores": str(rank),
                 "vllm_instance_groups": [_group]})
    for rank, h in enumerate(_lab["hosts"][:2])
]

plan_before_connecting(globals())
