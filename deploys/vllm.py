"""Deploy the vLLM fleet: `pyinfra inventories/<name>.py deploys/vllm.py` (run from the repo root).

The whole fleet is planned and checked first; a configuration that cannot work stops here,
before any operation runs on any host.
"""

from pyinfra import host, inventory

from roles import nginx, smoke, vllm
from roles.fleet import plan_inventory

plan = plan_inventory(inventory)
host_plan = plan.host(host.name)

if host_plan is not None:
    vllm.vllm_host(host_plan)
if host.name in plan.lb_hosts:
    nginx.load_balancer(plan, host.data.dict())
smoke.fleet_smoke(name="Smoke test", plan=plan, data=host.data.dict())
