"""Stopping one host with a reason, before it is changed, while the rest of the fleet goes on."""

from __future__ import annotations

import shlex

from pyinfra.api import StringCommand
from pyinfra.operations import server


def failure(reason: str) -> StringCommand:
    """A command that prints ``reason`` and fails: pyinfra stops the host there and shows it."""
    return StringCommand(f"echo {shlex.quote(reason)} >&2; exit 1")


def stop_host(reason: str) -> None:
    """An operation that stops this host with ``reason``."""
    server.shell(name="Stop: this host cannot be deployed", commands=[failure(reason)])
