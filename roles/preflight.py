"""Refusals at pyinfra's boundary: a configuration that cannot work stops the run before pyinfra
connects to any host, and again (with ``--data`` and ``--limit`` applied) before any operation.

pyinfra 3 runs nothing of a project between loading the inventory and connecting (hooks are
gone, and state callbacks registered in config.py are reset when the state is initialised), so
the inventory file itself plans the fleet as its last line::

    plan_before_connecting(globals())

The deploy files plan again, from pyinfra's inventory, inside ``refusals()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Mapping

from pyinfra.api import Inventory
from pyinfra.api.exceptions import PyinfraError

from roles.errors import FleetConfigError
from roles.plan.fleet import plan_inventory

# Set while `vllm-fleet plan` loads an inventory: it plans capacity, so a fleet whose client keys
# are not written yet can still be planned. Every deploy reads and checks the edge's secrets.
_CAPACITY_ONLY: ContextVar[bool] = ContextVar("capacity_only", default=False)


@contextmanager
def capacity_only():
    """Around loading an inventory for `vllm-fleet plan`: its plan leaves out the edge's secrets."""
    token = _CAPACITY_ONLY.set(True)
    try:
        yield
    finally:
        _CAPACITY_ONLY.reset(token)


class FleetRefusal(FleetConfigError, PyinfraError):
    """A refusal as pyinfra's CLI shows it (one paragraph, no traceback, nothing run on any host)
    and as vllm-fleet's shows it (field, problem, fix)."""


@contextmanager
def refusals():
    """Around a deploy file's body (and the inventory's plan): a refusal stops the run cleanly."""
    try:
        yield
    except FleetRefusal:
        raise
    except FleetConfigError as error:
        raise FleetRefusal(error.field, error.problem, error.fix) from None


def _groups(namespace: Mapping[str, Any]) -> dict[str, tuple[list, dict]]:
    """The host groups of an inventory module, read as pyinfra reads them: public module-level
    lists of host names or (name, data) pairs, or (hosts, group data) tuples."""
    groups = {}
    for name, value in namespace.items():
        hosts, data = value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict) \
            else (value, {})
        if name.startswith("_") or not isinstance(hosts, list):
            continue
        if all(isinstance(h, str) or isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str) for h in hosts):
            groups[name] = (hosts, data)
    return groups


def plan_before_connecting(namespace: Mapping[str, Any]) -> None:
    """Plan the fleet of the inventory module whose ``globals()`` these are; refuse it now."""
    groups = _groups(namespace)
    names = list(dict.fromkeys(h if isinstance(h, str) else h[0] for hosts, _ in groups.values() for h in hosts))
    with refusals():
        plan_inventory(Inventory((names, {}), **groups), with_edge=not _CAPACITY_ONLY.get(),
                       with_cache=not _CAPACITY_ONLY.get())
