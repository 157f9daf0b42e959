"""A host script's command line as the script itself reads it: its ``main`` run until its parser
has parsed the arguments, then stopped. A flag or value the script would refuse fails the test."""

from __future__ import annotations

import argparse
from unittest import mock


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def parsed_args(main, argv: list[str]) -> argparse.Namespace:
    """``argv`` as the script whose entry point is ``main`` parses it."""
    parse_args = argparse.ArgumentParser.parse_args

    def stop(parser, args=None, namespace=None):
        raise _Parsed(parse_args(parser, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            main(argv)
        except _Parsed as done:
            return done.namespace
        except SystemExit:
            raise AssertionError(f"the script refuses its arguments: {argv}") from None
    raise AssertionError(f"the script did not parse its arguments: {argv}")
