"""A fleet probe command's arguments as the probe itself reads them, for the simulated hosts of
the deploy tests (tests/deploy/simhost.py)."""

from __future__ import annotations

import argparse

from roles import paths
from roles.files import fleet_probe  # a script the roles copy to hosts; its own parser reads the commands
from tests.deploy.script_args import parsed_args


def probe_args(argv: list[str]) -> argparse.Namespace:
    """A ``python3 fleet_probe.py ...`` command's arguments as the probe itself reads them."""
    assert argv[:2] == ["python3", paths.FLEET_PROBE_PATH], argv
    return parsed_args(fleet_probe.main, argv[2:])
