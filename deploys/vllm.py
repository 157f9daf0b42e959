"""Deploy the vLLM fleet: `pyinfra inventories/<name>.py deploys/vllm.py` (run from the repo root).

The whole fleet is planned and checked first: a configuration that cannot work stops here,
with a message naming the field and the fix, before any operation runs on any host.
"""

from pyinfra import inventory

from roles import site
from roles.fleet import plan_inventory

site.serve(plan_inventory(inventory))
