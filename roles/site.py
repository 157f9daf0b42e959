"""The whole fleet deploy for one host, as ``deploys/vllm.py`` runs it."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from roles import nginx, nvidia, smoke, vllm
from roles.fleet import FleetPlan, HostPlan


def _onboard(host_plan: HostPlan):
    """Driver (NVIDIA hosts), release venv, then the GPU health gate. None when the host was
    stopped before any change (no GPU, Secure Boot without a signing key)."""
    if host_plan.accelerator == "nvidia" and not nvidia.driver(host_plan):
        return None
    installed = vllm.release(host_plan)
    if host_plan.accelerator == "nvidia":
        nvidia.health(host_plan, python=f"{host_plan.venv_dir}/bin/python")
    return installed


@deploy("GPU onboarding")
def onboard(plan: FleetPlan):
    """`deploys/gpu.py`: make a host's GPUs ready and proven, without serving anything yet."""
    host_plan = plan.host(host.name)
    if host_plan is not None:
        _onboard(host_plan)


@deploy("vLLM fleet")
def serve(plan: FleetPlan):
    """Onboarding, vLLM instances where the host has some, nginx where it is a load balancer,
    instances no longer listed stopped once nginx has forgotten them, then the smoke test."""
    host_plan = plan.host(host.name)
    if host_plan is not None:
        installed = _onboard(host_plan)
        if installed is None:
            return
        vllm.vllm_host(host_plan, installed)
    if host.name in plan.lb_hosts:
        nginx.load_balancer(plan, host.data.dict())
    if host_plan is not None:
        vllm.retire_removed_instances(host_plan)
    smoke.fleet_smoke(name="Smoke test", plan=plan, data=host.data.dict())
