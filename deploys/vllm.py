"""Deploy the vLLM fleet: `pyinfra inventories/<name>.py deploys/vllm.py` (run from the repo root).

The whole fleet is planned and checked first: a configuration that cannot work stops here,
with a message naming the field and the fix, before any operation runs on any host.
"""

from pyinfra import inventory, state

from roles import artifact_sources, preflight, site
from roles.plan.fleet import check_run_limit, plan_inventory

with preflight.refusals():
    plan = plan_inventory(inventory)
    check_run_limit(plan, None if state.limit_hosts is None else [h.name for h in state.limit_hosts])
    # A hub model's files and digests, asked of the Hub now: a refusal stops the run before any operation.
    artifact_sources.check_sources(plan)
    site.serve(plan)
