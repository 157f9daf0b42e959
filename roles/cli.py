"""vllm-fleet's own commands; pyinfra does the deploying (`pyinfra INVENTORY deploys/vllm.py`).

Every refusal is printed as the field, the problem and the fix, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from roles.errors import FleetConfigError, LabError
from roles.plan import settings


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are refusals like any other: field, problem, fix, exit 2.
    Options are never abbreviated: `lab down --keep` must not mean `--keep-base`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise FleetConfigError(f"`{self.prog}`", f"{message}.", f"see `{self.prog} --help`.")


# ---- planning -------------------------------------------------------------------------------------

def plan(args) -> int:
    """Load the inventory as pyinfra does (group data included), plan it, print it; no host is contacted."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from roles.plan.fleet import plan_inventory
    from roles.plan.report import render

    if not Path(args.inventory).is_file():
        raise FleetConfigError("`vllm-fleet plan INVENTORY`", f"{args.inventory} is not a file.",
                               "give a pyinfra inventory file, e.g. inventories/prod.py.")
    # pyinfra's inventory loader records the file it executes on the current state.
    with ctx_state.use(State()):
        inventory = make_inventory(args.inventory, cwd=os.getcwd())
    print(render(plan_inventory(inventory)))
    return 0


def show_settings(args) -> int:
    if args.name is None:
        print(settings.describe())
        return 0
    if args.name not in settings.BY_NAME:
        raise FleetConfigError(f"`vllm-fleet settings {args.name}`", "is not a vllm-fleet setting.",
                               settings.suggest(args.name, list(settings.BY_NAME)))
    print(settings.describe([settings.BY_NAME[args.name]]))
    return 0


def gpus(args) -> int:
    from roles.common import gib
    from roles.plan.gpus import GPUS, gpu_spec

    for key in [args.gpu_type] if args.gpu_type else GPUS:
        g = gpu_spec(key)
        print(f"{key:10} {g.name:28} {gib(g.memory_bytes):>10}  {g.bandwidth_bytes_per_s / 1e12:5.2f} TB/s"
              f"  bf16 {'yes' if g.bf16 else 'no':3}  fp8 {'yes' if g.fp8 else 'no':3}"
              f"  compute capability {g.compute_capability:.1f}")
    return 0


# ---- releases -------------------------------------------------------------------------------------

def release(args) -> int:
    from roles.release.lock import lock_command, lock_path, read_lock, resolve_lock
    from roles.release.manifest import load_release
    from roles.release.wheelhouse import build_wheelhouse

    manifest = load_release(args.name, args.releases_dir)
    if args.action == "lock":
        print(resolve_lock(manifest, args.releases_dir))
    elif args.action == "wheelhouse":
        print(build_wheelhouse(read_lock(lock_path(manifest, args.releases_dir))))
    else:
        print(f"release {manifest.name}: {manifest.engine.distribution}=={manifest.engine.version}"
              f" for {manifest.accelerator}, Python {manifest.python}")
        for line in [*(f"  pin {pin}" for pin in manifest.requirements[1:]),
                     *(f"  exclude {pkg}" for pkg in manifest.exclude)]:
            print(line)
        path = lock_path(manifest, args.releases_dir)
        if path.exists():
            lock = read_lock(path)
            print(f"lock {path}: {len(lock.requirements)} packages, {lock.machine}, digest {lock.digest[:16]}")
        else:
            print(f"no lock yet: run `{lock_command(manifest.name)}`")
    return 0


# ---- the lab --------------------------------------------------------------------------------------

def lab(args) -> int:
    from roles.lab import control

    if args.action == "up" and args.hosts < 1:
        raise FleetConfigError("`vllm-fleet lab up --hosts`", f"{args.hosts} hosts is not a lab.",
                               "give 1 or more (the lab inventory puts the load balancer on the first).")
    if args.action == "up":
        control.up(args.hosts)
    elif args.action == "down":
        control.down(args.keep_base)
    elif args.action == "model":
        from roles.lab import tiny_model  # numpy, safetensors, tokenizers: the [lab] extra

        print(tiny_model.build(Path(args.dest)))
    else:
        control.status()
    return 0


def lab_endpoint() -> tuple[str, str]:
    """The lab load balancer's base URL, and the model it serves (asked of the fleet itself)."""
    import requests

    from roles.lab.config import load_state

    state = load_state()
    # inventories/lab.py puts the load balancer on the first lab host, on the default port.
    base_url = f"http://{state['hosts'][0]['address']}:{settings.BY_NAME['nginx_listen_port'].default}/v1"
    models = requests.get(f"{base_url}/models", timeout=10).json()
    return base_url, models["data"][0]["id"]


def stream_chat(base_url: str, model: str, prompt: str = "Say hello to the fleet.") -> tuple[int, float, str]:
    """One streamed chat completion with the OpenAI SDK: (chunks received, seconds, text)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused-in-the-lab", max_retries=0, timeout=60)
    start, chunks, text = time.monotonic(), 0, []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=24, stream=True)
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    return chunks, time.monotonic() - start, "".join(text)


def howto(args) -> int:
    base_url, model = lab_endpoint()
    print(f"""
The lab fleet answers at {base_url} (nginx on lab1 in front of every vLLM instance).
The model is a tiny random-weight Llama, so its words are noise; the plumbing is real.

  curl -s {base_url}/models
  curl -s {base_url}/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}'
  curl -sN {base_url}/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}], "stream": true}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="unused")
  for chunk in client.chat.completions.create(model="{model}", stream=True,
                                              messages=[{{"role": "user", "content": "Hi"}}]):
      print(chunk.choices[0].delta.content or "", end="")
""")
    chunks, seconds, text = stream_chat(base_url, model)
    print(f"OpenAI SDK, streamed through the load balancer: {chunks} chunks in {seconds:.2f}s: {text!r}")
    return 0 if chunks > 1 else 1


# ---- the command line -----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    from roles.lab.config import DEFAULT_HOSTS
    from roles.release.manifest import RELEASES_DIR

    top = _Parser(prog="vllm-fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = commands.add_parser("plan", help="the capacity plan of a fleet, without connecting to any host")
    p.add_argument("inventory", help="a pyinfra inventory file, e.g. inventories/prod.py")
    p.set_defaults(run=plan)
    p = commands.add_parser("settings", help="every setting, its type, default and meaning")
    p.add_argument("name", nargs="?", help="only this setting")
    p.set_defaults(run=show_settings)
    p = commands.add_parser("gpus", help="the GPU models the planner knows")
    p.add_argument("gpu_type", nargs="?", help="only this GPU type, e.g. h100-sxm")
    p.set_defaults(run=gpus)
    p = commands.add_parser("howto", help="how to call the lab fleet, then a streamed chat completion through it")
    p.set_defaults(run=howto)

    p = commands.add_parser("release", help="release manifests: resolve a lock, download its wheels, show it")
    p.add_argument("action", choices=["lock", "wheelhouse", "show"],
                   help="lock: resolve NAME.yml into NAME.lock; wheelhouse: download and verify its wheels "
                        "once on this machine; show: the pins and the lock")
    p.add_argument("name", help="release name, the stem of a manifest in --releases-dir")
    p.add_argument("--releases-dir", type=Path, default=RELEASES_DIR, help="folder of release manifests")
    p.set_defaults(run=release)

    p = commands.add_parser("lab", help="the local systemd-nspawn lab (root)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    a = actions.add_parser("up", help="build the base if needed and boot the hosts (idempotent)")
    a.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help="number of hosts")
    a = actions.add_parser("down", help="stop the hosts and remove the lab")
    a.add_argument("--keep-base", action="store_true", help="keep the base rootfs and ssh key so the next `up` is fast")
    actions.add_parser("status", help="show the hosts")
    a = actions.add_parser("model", help="build the lab's tiny random-weight Llama into DEST")
    a.add_argument("dest", help="a folder, e.g. .cache/models/tiny-llama")
    p.set_defaults(run=lab)
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        return args.run(args)
    except FleetConfigError as error:
        print(f"refused: {error.field}\n  problem: {error.problem}\n  fix: {error.fix}", file=sys.stderr)
        return 2
    except (LabError, subprocess.CalledProcessError) as error:
        # A lab step that failed (not a refused input): say which, without a traceback.
        print(f"lab: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
