"""The whole fleet deploy for one host, as ``deploys/vllm.py`` runs it."""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.api import deploy

from roles import cache, firewall, grafana, monitor, nginx, nvidia, paths, rollout, secrets, smoke, vllm
from roles.plan.fleet import FleetPlan, HostPlan


def _driver_ready(host_plan: HostPlan) -> bool:
    """The NVIDIA driver on an NVIDIA host; False when the host was stopped before any change (no
    GPU, Secure Boot without a signing key). Nothing to do on CPU hosts."""
    return host_plan.accelerator != "nvidia" or bool(nvidia.driver(host_plan))


def _installed(plan: FleetPlan, host_plan: HostPlan | None, with_model: bool):
    """The artifact cache on its host (nothing of it elsewhere); on vLLM hosts the release venv,
    pulled from it, then the GPU health gate on NVIDIA hosts and, ``with_model``, the staged model.
    Returns the model's staging operation, or None."""
    if plan.cache is not None and host.name == plan.cache.host:
        cache.artifact_cache(plan, with_models=with_model)
    else:
        cache.no_cache_server()
    if host_plan is None:
        return None
    vllm.release(host_plan, plan.cache)
    if host_plan.accelerator == "nvidia":
        nvidia.health(host_plan, python=f"{host_plan.venv_dir}/bin/python")
    return vllm.host_model(plan, host_plan) if with_model else None


def _warn_tight_fits(host_plan: HostPlan) -> None:
    """The plan's warnings (a fit that leaves almost no KV cache) where the operator looks: the deploy."""
    for inst in host_plan.instances:
        for warning in inst.fit.warnings:
            logger.warning(f"{host.print_prefix}instance {inst.name}: {warning}")


def _monitoring(plan: FleetPlan) -> None:
    """Exporters on every host (nginx's on load balancers), the textfile timers (GPU readings on
    NVIDIA hosts, the edge's responses and upstreams on load balancers), Prometheus and
    Alertmanager on the monitor hosts, Grafana on those of them in the grafana group."""
    monitor.node_exporter()
    host_plan = plan.host(host.name)
    if host_plan is not None and host_plan.accelerator == "nvidia":
        monitor.gpu_metrics(host_plan)
    if host.name in plan.lb_hosts:
        monitor.nginx_exporter()
        monitor.edge_metrics(plan.upstreams, host.data.dict())
    if host.name in plan.monitoring.hosts:
        monitor.monitor_server(plan.monitoring, host.data.dict())
    if plan.grafana is not None and host.name in plan.grafana.hosts:
        grafana.grafana_server(plan, host.data.dict())


@deploy("GPU onboarding")
def onboard(plan: FleetPlan):
    """`deploys/gpu.py`: make a host's GPUs ready and proven, without serving anything yet."""
    host_plan = plan.host(host.name)
    if host_plan is None or _driver_ready(host_plan):
        _installed(plan, host_plan, with_model=False)


@deploy("Install")
def install(plan: FleetPlan):
    """`deploys/install.py`: what `serve` installs, without serving: the host firewall, the artifact
    cache, each host's release venv and its staged model; no unit is started."""
    host_plan = plan.host(host.name)
    if host_plan is None or _driver_ready(host_plan):
        firewall.host_firewall(plan.firewall(host.name))
        _installed(plan, host_plan, with_model=True)


@deploy("vLLM fleet")
def serve(plan: FleetPlan):
    """The driver where the host has GPUs, the host firewall, the artifact cache, the release and the
    model where the host has instances, new instances, nginx where it is a load balancer,
    then the rolling update of changed instances across the fleet, instances no longer listed
    stopped once nginx has forgotten them, the smoke test and the fleet's release report."""
    host_plan = plan.host(host.name)
    run = rollout.for_run(plan)
    env_texts: dict[str, str] = {}
    if host.name in plan.lb_hosts:
        # A load balancer whose distribution lacks what its routing needs is refused before any change.
        nginx.edge_packages(host.data.dict(), plan.provider(host.name))
    if host_plan is not None:
        _warn_tight_fits(host_plan)
        if not _driver_ready(host_plan):
            return
    # After the driver's gates, which stop a host that cannot serve (no GPU: maybe not the host
    # meant) before any change; before anything on the host listens (the artifact cache first).
    firewall.host_firewall(plan.firewall(host.name))
    model_op = _installed(plan, host_plan, with_model=True)
    if host_plan is not None:
        env_texts = vllm.vllm_host(host_plan, run, secrets.fleet_key(plan.secrets_dir, "internal").reveal(), model_op)
    if host.name in plan.lb_hosts:
        nginx.load_balancer(plan, host.data.dict())
    rollout.rolling_update(run, env_texts, host.data.dict(), env_dir=paths.ENV_DIR, probe=paths.FLEET_PROBE_PATH)
    if host_plan is not None:
        vllm.retire_removed_instances(host_plan)
        vllm.settle_release_link(host_plan, run)
    if plan.monitoring is not None:
        _monitoring(plan)
    smoke.fleet_smoke(name="Smoke test", plan=plan, data=host.data.dict())
    rollout.report(name="Fleet release report", rollout=run)
