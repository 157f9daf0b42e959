"""Onboard GPU servers: `pyinfra inventories/<name>.py deploys/gpu.py` (run from the repo root).

Installs and pins the NVIDIA driver, builds the release venv, and proves each GPU healthy
(NVML checks; burn-in on first onboarding or with nvidia_burnin = True). CPU hosts only get
the release venv. `deploys/vllm.py` runs the same steps before serving.
"""

from pyinfra import inventory

from roles import preflight, site
from roles.plan.fleet import plan_inventory

with preflight.refusals():
    site.onboard(plan_inventory(inventory, with_edge=False))
