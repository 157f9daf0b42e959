"""Stopping one host with a reason, before it is changed, while the rest of the fleet goes on."""

from __future__ import annotations

import shlex

from pyinfra.operations import server


def stop_host(reason: str) -> None:
    """An operation that fails with ``reason``: pyinfra stops this host there and prints it."""
    server.shell(name="Stop: this host cannot be deployed", commands=[f"echo {shlex.quote(reason)} >&2; exit 1"])
