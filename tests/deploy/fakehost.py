"""Run a ``@deploy`` against a host whose facts are given, and list the commands it would run.

No connection is made: ``Host.get_fact`` is answered by the simulated host, which prints what
the fact's command would print in its state and hands that to the fact's own ``process()``;
an unexpected fact fails the test (so the fake states every fact the roles read). The deploy goes through
pyinfra's own prepare phase, then each operation's commands are generated in order with
execution-time ``_if=`` conditions, every command taken as successful.

The simulated host is tests/deploy/simhost.py. ``fleet_plan`` plans a fleet as a deploy does (``plan_inventory``): capacity, then the edge and
every host's firewall, the load balancers' secrets in a folder made once per test session.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from pyinfra.api import Config, Inventory, State
from pyinfra.api.command import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.api.host import Host
from pyinfra.api.state import StateStage
from pyinfra.api.util import PYINFRA_INSTALL_DIR
from pyinfra.connectors.util import CommandOutput
from pyinfra.context import ctx_host, ctx_state

from roles import secrets
from roles.plan import setting_checks
from roles.plan.fleet import REPO_ROOT, FleetPlan, plan_fleet, with_artifact_cache, with_edge_and_firewalls
from tests.deploy.simhost import SimulatedHost


@dataclass
class PlannedOp:
    name: str
    commands: list[str]  # readable form, for assertions
    raw: list = field(default_factory=list, repr=False)  # the pyinfra command objects


def _render(command) -> str:
    if isinstance(command, StringCommand):
        return command.get_raw_value()
    if isinstance(command, FileUploadCommand):
        src = command.src if isinstance(command.src, str) else "<generated>"
        return f"upload {src} -> {command.dest}"
    if isinstance(command, FunctionCommand):
        return f"function {command.function.__name__}"
    return repr(command)


def _op_order_from_code(state) -> list[int]:
    """pyinfra's CLI operation order (line numbers of the calling code, outermost first, pyinfra's
    and other installed packages' frames left out), without ``inspect.stack()``'s source reads,
    which make a deploy of a hundred operations take seconds."""
    lines, frame = [], sys._getframe(1)
    while frame is not None:
        if not frame.f_code.co_filename.startswith(PYINFRA_INSTALL_DIR):
            lines.append(frame.f_lineno)
        frame = frame.f_back
    return [state.current_op_file_number, *reversed(lines)]


def run_fleet(deploy_func, *args, hosts: dict[str, tuple[dict, SimulatedHost]], **kwargs) -> list[tuple[str, PlannedOp]]:
    """Run ``deploy_func`` for several simulated hosts as one pyinfra run: every operation in
    pyinfra's fleet-wide order, each host's commands applied to its simulated host as they are
    generated (so facts read after a command see its effect), execute-time ``_if=`` included.
    Returns (host name, operation) in the order they ran."""
    inventory = Inventory(([(name, dict(data)) for name, (data, _) in hosts.items()], {}))
    state = State(inventory, Config())
    sims = {name: sim for name, (_, sim) in hosts.items()}

    def get_fact(self, fact_cls, *fact_args, **fact_kwargs):
        return sims[self.name].fact(fact_cls, *fact_args, **fact_kwargs)

    def run_shell_command(self, command, **_):
        return sims[self.name].run(command.get_raw_value())

    timeline = []
    # CLI mode: operations are identified by their place in the code (as when pyinfra runs a
    # deploy file), so the same call on two hosts is one fleet-wide operation.
    with mock.patch.object(Host, "get_fact", get_fact), mock.patch.object(Host, "run_shell_command", run_shell_command), \
            mock.patch("pyinfra.is_cli", True), \
            mock.patch("pyinfra.api.operation.get_operation_order_from_stack", _op_order_from_code), ctx_state.use(state):
        state.set_stage(StateStage.Prepare)
        for host in inventory:
            # What pyinfra's CLI does with a deploy file: run it once per host, in that host's context.
            with ctx_host.use(host):
                deploy_func(*args, **kwargs)
        state.set_stage(StateStage.Execute)
        state.is_executing = True
        for op_hash in state.get_op_order():
            for host in inventory:
                if op_hash not in state.ops[host]:
                    continue
                op_data = state.ops[host][op_hash]
                commands = []
                with ctx_host.use(host):
                    for command in op_data.command_generator():
                        commands.append(command)
                        if isinstance(command, FunctionCommand):
                            # vllm-fleet's callbacks run against the simulated host; pyinfra's own
                            # (reboot waits) need a live connection, and the command before them
                            # already changed the simulated state.
                            if command.function.__module__.startswith("roles."):
                                command.execute(state, host, {})
                        else:
                            sims[host.name].apply_command(command)
                op_data.operation_meta.set_complete(True, commands, CommandOutput([]))
                timeline.append((host.name, PlannedOp(name=", ".join(state.get_op_meta(op_hash).names),
                                                      commands=[_render(c) for c in commands], raw=commands)))
    return timeline


def plan(deploy_func, *args, host_name: str, host_data: dict, sim: SimulatedHost, **kwargs) -> list[PlannedOp]:
    """The operations ``deploy_func`` runs on one simulated host, and their commands."""
    return [op for _, op in run_fleet(deploy_func, *args, hosts={host_name: (host_data, sim)}, **kwargs)]


def changed(ops: list[PlannedOp]) -> list[PlannedOp]:
    return [op for op in ops if op.commands]


# ---- the plan a deploy runs on ----------------------------------------------------------------------

CLIENT = "alice"  # the one client of the session's secrets folder


@functools.cache
def session_secrets_dir() -> Path:
    """A load balancers' secrets folder (nginx_secrets_dir) for the whole test session: private
    (0700), one client in clients.toml; the deploys generate the rest (internal and smoke keys,
    the fleet CA, edge certificates) there on first use, and reuse it after."""
    folder = Path(tempfile.mkdtemp(prefix="vllm-fleet-secrets-"))  # made 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    secrets.add_client_key(folder, CLIENT)
    return folder


def fleet_plan(hosts: Iterable[tuple[str, Mapping]], lb_hosts: Iterable[str | tuple[str, Mapping]],
               secrets_dir: Path | None = None, base_dir: Path = REPO_ROOT,
               monitor_hosts: Iterable[str] = (), grafana_hosts: Iterable[str] = (),
               cache_hosts: Iterable[str] = ()) -> FleetPlan:
    """The plan a deploy runs on, as ``plan_inventory`` makes it: ``plan_fleet``, the artifact cache
    (``with_artifact_cache``: the ``cache`` group's host, by default the first load balancer), then the edge,
    the monitoring and every host's firewall (``with_edge_and_firewalls``).

    ``hosts``: (name, data) of the vLLM hosts. ``lb_hosts``: the load balancers, by name where
    they are vLLM hosts too, else as (name, data): their address is what the instances'
    firewalls let in. Each gets ``nginx_secrets_dir`` (``secrets_dir``, by default the session's
    folder) unless its data sets one. ``monitor_hosts`` and ``grafana_hosts``: the names of the
    ``monitor`` and ``grafana`` groups, among the hosts above."""
    hosts = list(hosts)
    data_of = dict(hosts)
    folder = str(secrets_dir or session_secrets_dir())
    lbs = []
    for lb in lb_hosts:
        if isinstance(lb, str) and lb not in data_of:
            raise ValueError(f"load balancer {lb} is no vLLM host: give it as (name, data) with its address")
        name, data = (lb, data_of[lb]) if isinstance(lb, str) else lb
        lbs.append((name, {"nginx_secrets_dir": folder, **data}))
    plan = plan_fleet(hosts, [name for name, _ in lbs], base_dir=base_dir)
    lb_data = dict(lbs)
    for name, data in lbs:  # plan_fleet checks the vLLM hosts' settings; plan_inventory every host's
        setting_checks.check_host_data(name, data)
    everyone = [(name, lb_data.get(name, data)) for name, data in hosts] + \
        [(name, data) for name, data in lbs if name not in data_of]
    plan = with_artifact_cache(plan, everyone, cache_hosts)
    return with_edge_and_firewalls(plan, lbs, everyone, base_dir, monitor_hosts, grafana_hosts)
