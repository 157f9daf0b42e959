"""Smoke tests at the end of every deploy: each instance, then the fleet through the load balancer.

The checks run at execute time on each host (its own instances on loopback; on load-balancer
hosts also a completion and a streamed chat completion through nginx). A passing smoke test
is not a change; a failing one fails the deploy and prints the failing units' journal lines.
"""

from __future__ import annotations

import json
import shlex

from pyinfra import host, state
from pyinfra.api import StringCommand, operation
from pyinfra.facts.server import Command

from roles.nginx import provider_probe_command
from roles.paths import EDGE_CERTIFICATE, ENV_DIR, FLEET_PROBE_PATH, SMOKE_KEY
from roles.plan import edge, settings
from roles.plan.fleet import FleetPlan


def probe_command(plan: FleetPlan, host_name: str, data, report: bool) -> str | None:
    """The probe invocation for one host, or None when the host has nothing to check."""
    base = ["python3", FLEET_PROBE_PATH, "smoke", "--env-dir", ENV_DIR]
    args = list(base)
    mine = plan.host(host_name)
    if mine and mine.serving:
        args += ["--address", mine.listen_address]
    for inst in mine.serving if mine else ():
        args += ["--instance", f"{inst.name}:{inst.port}"]
    if mine and mine.serving:
        args += ["--wait-healthy", str(mine.get("vllm_start_timeout"))]
    if host_name in plan.lb_hosts:
        # Through the edge as a client: TLS checked against the certificate nginx serves, as the
        # name clients use, with the smoke test's own client key.
        args += ["--lb-port", str(settings.value(data, "nginx_listen_port")), "--lb-name",
                 edge.server_name(host_name, data), "--lb-ca", EDGE_CERTIFICATE, "--lb-key-file", SMOKE_KEY,
                 "--model", plan.served_model_name]
    if args == base:
        return None
    return shlex.join(args + (["--report"] if report else []))


@operation()
def fleet_smoke(plan: FleetPlan, data):
    """Pass quietly, or fail with the probe's report (which includes the journals)."""
    command = probe_command(plan, host.name, data, report=False)
    if command is None or not state.is_executing:
        # Before execution the instances may not exist yet; there is nothing to check.
        return
    outcome = json.loads(host.get_fact(Command, command=command))
    provider = plan.provider(host.name)
    if provider is not None:
        warn_of_the_provider(provider)
    if outcome["ok"]:
        # Logged, not a noop: operators want to see the proof at the end of every deploy.
        host.log_styled("smoke test passed: " + ", ".join(r["check"] for r in outcome["results"]), fg="green")
        return
    yield StringCommand(probe_command(plan, host.name, data, report=True))


def warn_of_the_provider(provider) -> None:
    """Say loudly when the fallback provider does not answer this load balancer as it should: the
    fleet serves, but what falls back would fail. (A provider refusing its key never gets here: the
    deploy stopped before nginx was given the key.)"""
    result = json.loads(host.get_fact(Command, command=provider_probe_command(provider)))
    if result["ok"]:
        host.log_styled(f"smoke test: fallback provider {provider.authority} serves {provider.model}", fg="green")
    else:
        host.log_styled(f"WARNING smoke test: the fallback provider fails: {result['problem']}; requests that fall "
                        "back get 502 until it answers", fg="red", bold=True)
