#!/usr/bin/env python3
"""Check vLLM flags with a release's own argument parser, run ON a host with that release's python.

    <venv>/bin/python check_engine_args.py '{"a": ["--model", "/m", ...], "b": [...]}'

Prints one JSON object: instance -> null when the parser accepts its flags, else the parser's
complaint. Nothing is started. The parser's module moved between vLLM versions; both places
are tried.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def _serve_parser():
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:  # vLLM before the launchers package
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve")), validate_parsed_serve_args


def check(args: list[str], parser, validate) -> str | None:
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            validate(parser.parse_args(args))
    except SystemExit:  # argparse reports an unknown or malformed flag by exiting
        lines = [line for line in complaint.getvalue().splitlines() if line.strip()]
        return lines[-1] if lines else "rejected by the argument parser"
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def main() -> int:
    instances = json.loads(sys.argv[1])
    try:
        parser, validate = _serve_parser()
    except Exception as error:  # a release that cannot even load its parser refuses every flag
        print(json.dumps({name: f"cannot load vLLM's argument parser: {error!r}" for name in instances}))
        return 0
    print(json.dumps({name: check(args, parser, validate) for name, args in instances.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
