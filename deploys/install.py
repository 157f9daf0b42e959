"""Install what the fleet serves, without serving it: `pyinfra inventories/<name>.py deploys/install.py`.

The same plan and refusals as `deploys/vllm.py`, then on each host what a deploy does before any
instance starts: the NVIDIA driver and the GPU gate on NVIDIA hosts, the host firewall, the
artifact cache (sent each release's wheels and the model once), the release venv and the model
pulled from it. No unit is started, nginx serves no client: for staging a fleet ahead of its
first deploy or an upgrade, and for measuring what installing costs as the fleet grows
(`vllm-fleet lab deploy-cost`).
"""

from pyinfra import inventory, state

from roles import artifact_sources, preflight, site
from roles.plan.fleet import check_run_limit, plan_inventory

with preflight.refusals():
    plan = plan_inventory(inventory)
    check_run_limit(plan, None if state.limit_hosts is None else [h.name for h in state.limit_hosts])
    artifact_sources.check_sources(plan)
    site.install(plan)
