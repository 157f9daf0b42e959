"""A fleet probe command's arguments as the probe itself reads them, for the simulated hosts of
the deploy tests (tests/deploy/simhost.py)."""

from __future__ import annotations

import argparse
from unittest import mock

from roles import paths
from roles.files import fleet_probe  # a script the roles copy to hosts; its own parser reads the commands


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def probe_args(argv: list[str]) -> argparse.Namespace:
    """A ``python3 fleet_probe.py ...`` command's arguments as the probe itself reads them (its
    ``main``, stopped once it has parsed them): a flag or value it would refuse fails the test."""
    assert argv[:2] == ["python3", paths.FLEET_PROBE_PATH], argv
    parse_args = argparse.ArgumentParser.parse_args

    def parsed(parser, args=None, namespace=None):
        raise _Parsed(parse_args(parser, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parsed):
        try:
            fleet_probe.main(argv[2:])
        except _Parsed as done:
            return done.namespace
        except SystemExit:
            raise AssertionError(f"fleet_probe.py refuses its arguments: {argv}") from None
    raise AssertionError(f"fleet_probe.py did not parse its arguments: {argv}")
