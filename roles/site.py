"""The whole fleet deploy for one host, as ``deploys/vllm.py`` runs it."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from roles import nginx, smoke, vllm
from roles.fleet import FleetPlan


@deploy("vLLM fleet")
def serve(plan: FleetPlan):
    """vLLM instances where the host has some, nginx where it is a load balancer, instances no
    longer listed stopped once nginx has forgotten them, then the smoke test."""
    host_plan = plan.host(host.name)
    if host_plan is not None:
        vllm.vllm_host(host_plan)
    if host.name in plan.lb_hosts:
        nginx.load_balancer(plan, host.data.dict())
    if host_plan is not None:
        vllm.retire_removed_instances(host_plan)
    smoke.fleet_smoke(name="Smoke test", plan=plan, data=host.data.dict())
