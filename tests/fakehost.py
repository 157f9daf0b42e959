"""Run a ``@deploy`` against a host whose facts are given, and list the commands it would run.

No connection is made: ``Host.get_fact`` is answered from a table, and an unexpected fact
fails the test (so a test states every fact the role reads). The deploy goes through
pyinfra's own prepare phase, then each operation's commands are generated in order with
execution-time ``_if=`` conditions, every command taken as successful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from unittest import mock

from pyinfra.api import Config, Inventory, State
from pyinfra.api.command import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.api.deploy import add_deploy
from pyinfra.api.host import Host
from pyinfra.connectors.util import CommandOutput
from pyinfra.context import ctx_host, ctx_state

FactTable = dict[str, Callable[..., Any] | Any]


@dataclass
class PlannedOp:
    name: str
    commands: list[str]


def _render(command) -> str:
    if isinstance(command, StringCommand):
        return command.get_raw_value()
    if isinstance(command, FileUploadCommand):
        src = command.src if isinstance(command.src, str) else "<generated>"
        return f"upload {src} -> {command.dest}"
    if isinstance(command, FunctionCommand):
        return f"function {command.function.__name__}"
    return repr(command)


def plan(deploy_func, *args, host_name: str, host_data: dict, facts: FactTable, **kwargs) -> list[PlannedOp]:
    """The operations ``deploy_func`` adds for one host and the commands each would run."""
    inventory = Inventory(([(host_name, dict(host_data))], {}))
    state = State(inventory, Config())

    def get_fact(self, fact_cls, *fact_args, **fact_kwargs):
        name = fact_cls.__name__
        if name not in facts:
            raise AssertionError(f"unexpected fact {name}({fact_args}, {fact_kwargs}) on {self.name}")
        answer = facts[name]
        return answer(*fact_args, **fact_kwargs) if callable(answer) else answer

    host = inventory.get_host(host_name)
    with mock.patch.object(Host, "get_fact", get_fact), ctx_state.use(state), ctx_host.use(host):
        add_deploy(state, deploy_func, *args, host=host, **kwargs)
        # Execute in order as if every command succeeded, so ``_if=`` conditions see what
        # earlier operations did, exactly as in a real run.
        state.is_executing = True
        ops = []
        for op_hash in state.get_op_order():
            if op_hash not in state.ops[host]:
                continue
            op_data = state.ops[host][op_hash]
            commands = list(op_data.command_generator())
            op_data.operation_meta.set_complete(True, commands, CommandOutput([]))
            ops.append(PlannedOp(name=", ".join(state.get_op_meta(op_hash).names),
                                 commands=[_render(c) for c in commands]))
    return ops


def changed(ops: list[PlannedOp]) -> list[PlannedOp]:
    return [op for op in ops if op.commands]
