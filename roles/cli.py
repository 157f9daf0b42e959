"""vllm-fleet's own commands; pyinfra does the deploying (`pyinfra INVENTORY deploys/vllm.py`).

Every refusal is printed as the field, the problem and the fix, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from roles.errors import FleetConfigError, LabError
from roles.plan import setting_checks, settings
from roles.plan.edge import Secret


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
    from roles.preflight import capacity_only

    if not Path(args.inventory).is_file():
        raise FleetConfigError("`vllm-fleet plan INVENTORY`", f"{args.inventory} is not a file.",
                               "give a pyinfra inventory file, e.g. inventories/prod.py.")
    # pyinfra's inventory loader records the file it executes on the current state.
    with ctx_state.use(State()), capacity_only():
        inventory = make_inventory(args.inventory, cwd=os.getcwd())
    print(render(plan_inventory(inventory, with_edge=False, with_cache=False)))
    return 0


def status(args) -> int:
    from roles.status_view import show  # pyinfra's connection: only this command needs it

    return show(args)


def bench(args) -> int:
    from roles import bench as runner  # pyinfra's inventory loader, subprocesses, matplotlib

    return runner.command(args)


def show_settings(args) -> int:
    if args.name is None:
        print(setting_checks.describe())
        return 0
    if args.name not in settings.BY_NAME:
        raise FleetConfigError(f"`vllm-fleet settings {args.name}`", "is not a vllm-fleet setting.",
                               setting_checks.suggest(args.name, list(settings.BY_NAME)))
    print(setting_checks.describe([settings.BY_NAME[args.name]]))
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
    elif args.action == "metrics":
        return derive_metrics(manifest, args)
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


def derive_metrics(manifest, args) -> int:
    """NAME.metrics from the capture of the release ``--like``; ``--check`` compares it with the
    committed file instead of writing it."""
    from roles.release.engine_source import derived_metrics

    if not args.like:
        raise FleetConfigError("`vllm-fleet release metrics NAME`", "needs --like RELEASE, the captured release "
                               "whose metrics stand for NAME's.", "e.g. `vllm-fleet release metrics "
                               "nvidia-vllm-0.32.0 --like cpu-vllm-0.32.0`.")
    target, text = derived_metrics(manifest, args.like, args.releases_dir)
    if not args.check:
        target.write_text(text)
        print(f"release: {target} written from the capture of {args.like}")
        return 0
    if target.is_file() and target.read_text() == text:
        print(f"release: {target} is what the engine wheels give")
        return 0
    print(f"release: {target} is not what the engine wheels give; run `vllm-fleet release metrics "
          f"{manifest.name} --like {args.like}` and commit it", file=sys.stderr)
    return 1


# ---- client keys ----------------------------------------------------------------------------------

def keys(args) -> int:
    """The clients file of a secrets folder: add, rotate, remove and show client keys."""
    from roles import secrets

    if args.action == "new":
        print(secrets.new_key())
        return 0
    directory = Path(args.dir)
    if args.action == "list":
        return list_keys(directory)
    if args.action == "fallback":
        from roles.plan.fallback import FALLBACK_KEY_FILE, provider_key

        return store_key(directory, FALLBACK_KEY_FILE, "the provider's API key: ",
                         lambda folder: provider_key("control node", folder),
                         "deploy to give it to the load balancers.")
    if args.action == "hub":
        from roles.artifact_sources import HUB_TOKEN_FILE, hub_token

        return store_key(directory, HUB_TOKEN_FILE, "the Hugging Face token: ", hub_token,
                         "deploy: the Hub is asked for the model with it before any host is touched.")
    if args.action == "add":
        key, client = secrets.add_client_key(directory, args.name)
        print(key.reveal())
        print(keys_add_hint(directory, client), file=sys.stderr)
    elif args.action == "remove" and args.key_prefix is None:
        left = secrets.remove_client(directory, args.name)
        print(f"removed client {args.name}; deploy to shut it out at the edge" + (
            "." if left else " (with no client left, the deploy refuses: add one first)."), file=sys.stderr)
    elif args.action == "remove":
        client = secrets.remove_client_key(directory, args.name, args.key_prefix)
        print(f"removed the key; client {args.name} keeps {len(client.keys)}. Deploy to shut the old key out "
              "at the edge.", file=sys.stderr)
    else:
        client = secrets.client(directory, secrets.load_clients(directory), args.name)
        print(client.keys[-1].reveal())
    return 0


def store_key(directory: Path, file_name: str, asked: str, check, then: str) -> int:
    """Write a key into ``directory/file_name``: asked for without echo on a terminal, else read from
    stdin (never an argument: argv is readable by every user of the machine); ``check(directory)``
    refuses, naming the file, what its user could not take."""
    import getpass

    from roles import secrets

    key = getpass.getpass(asked) if sys.stdin.isatty() else sys.stdin.readline()
    path = directory / file_name
    secrets.write_private(path, f"{key.strip()}\n".encode())
    check(directory)
    print(f"wrote {path}; {then}", file=sys.stderr)
    return 0


def keys_add_hint(directory: Path, client) -> str:
    """What to do after `keys add`: deploy, and during a rotation, remove the old key."""
    if len(client.keys) == 1:
        return f"client {client.name}: new key above (stored in {directory}); deploy to make it valid at the edge."
    from roles.secrets import MIN_KEY_PREFIX

    old = client.keys[0].reveal()[:MIN_KEY_PREFIX]
    return (f"client {client.name} now has {len(client.keys)} keys; deploy to make the new one valid at the edge; "
            f"remove the old key with vllm-fleet keys remove {directory} {client.name} --key-prefix {old}")


def list_keys(directory: Path) -> int:
    """Each client, its limits, and how each of its keys starts (never a whole key)."""
    from roles.plan.edge import LIMITS
    from roles.secrets import load_clients

    for client in load_clients(directory).values():
        own = dict(client.limits)
        limits = ", ".join(f"{limit} {own.get(limit, 'default')}" for limit in LIMITS)
        starts = ", ".join(key.reveal()[:6] + "…" for key in client.keys)
        print(f"{client.name}: {len(client.keys)} key{'s' if len(client.keys) > 1 else ''} ({starts}); {limits}")
    return 0


# ---- the lab --------------------------------------------------------------------------------------

def lab(args) -> int:
    if args.action == "deploy-cost":
        from roles.lab import deploy_cost  # lab up/down and pyinfra as subprocesses, matplotlib

        return deploy_cost.command(args)
    from roles.lab import control

    if args.action == "up" and args.hosts < 1:
        raise FleetConfigError("`vllm-fleet lab up --hosts`", f"{args.hosts} hosts is not a lab.",
                               "give 1 or more (the lab inventory puts the load balancer on the first).")
    if args.action == "up":
        control.up(args.hosts)
        ensure_lab_client()
    elif args.action == "down":
        control.down(args.keep_base)
    elif args.action == "model":
        from roles.lab import tiny_model  # numpy, safetensors, tokenizers: the [lab] extra

        print(tiny_model.build(Path(args.dest)))
    else:
        control.status()
    return 0


LAB_CLIENT = "lab"


def lab_secrets() -> Path:
    from roles.lab.config import STATE_DIR

    # inventories/lab.py names this folder as the load balancer's nginx_secrets_dir.
    return STATE_DIR / "secrets"


def ensure_lab_client() -> None:
    """The lab's one client, with a key of its own (kept across `lab up`s; a new lab, a new key)."""
    from roles import secrets

    if LAB_CLIENT not in secrets.load_clients(lab_secrets(), missing_ok=True):
        secrets.add_client_key(lab_secrets(), LAB_CLIENT)


@dataclass(frozen=True)
class LabEdge:
    """How a client reaches the lab fleet: the edge's URL, the CA its certificate is checked
    against, the lab client's key, and the model it serves."""

    base_url: str
    ca_file: Path
    api_key: Secret = field(repr=False)
    model: str = ""

    def session(self, api_key: str | None = None):
        """A requests session that checks the edge's certificate and sends ``api_key`` (default: the lab's)."""
        import requests

        session = requests.Session()
        # Not from the environment: requests lets REQUESTS_CA_BUNDLE win over `verify`, and the
        # lab's hosts are reached directly, never through a proxy.
        session.trust_env = False
        session.verify = str(self.ca_file)
        key = self.api_key.reveal() if api_key is None else api_key
        if key:
            session.headers["Authorization"] = f"Bearer {key}"
        return session


def lab_endpoint() -> LabEdge:
    """The lab load balancer, and the model it serves (asked of the fleet itself)."""
    from roles import secrets
    from roles.lab.config import load_state

    state = load_state()
    # inventories/lab.py puts the load balancer on the first lab host, on the default port.
    port = settings.BY_NAME["nginx_listen_port"].default
    edge = LabEdge(f"https://{state['hosts'][0]['address']}{'' if port == 443 else f':{port}'}/v1",
                   secrets.ca_certificate(lab_secrets()), secrets.client(
                       lab_secrets(), secrets.load_clients(lab_secrets()), LAB_CLIENT).keys[-1])
    models = edge.session().get(f"{edge.base_url}/models", timeout=10).json()
    return replace(edge, model=models["data"][0]["id"])


def openai_client(edge: LabEdge, api_key: str | None = None):
    """The OpenAI SDK as a user of the fleet sets it up: the edge's CA, a client key."""
    import ssl

    from openai import DefaultHttpxClient, OpenAI

    verify = ssl.create_default_context(cafile=str(edge.ca_file))
    return OpenAI(base_url=edge.base_url, api_key=edge.api_key.reveal() if api_key is None else api_key,
                  max_retries=0, timeout=60, http_client=DefaultHttpxClient(verify=verify, trust_env=False))


def stream_chat(edge: LabEdge, prompt: str = "Say hello to the fleet.",
                api_key: str | None = None) -> tuple[int, float, str]:
    """One streamed chat completion with the OpenAI SDK: (chunks received, seconds, text)."""
    client = openai_client(edge, api_key)
    start, chunks, text = time.monotonic(), 0, []
    stream = client.chat.completions.create(model=edge.model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=24, stream=True)
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    return chunks, time.monotonic() - start, "".join(text)


def howto(args) -> int:
    from roles.lab.howto import howto_text

    edge = lab_endpoint()
    print(howto_text(edge.base_url, edge.model, edge.ca_file, lab_secrets(), LAB_CLIENT))
    chunks, seconds, text = stream_chat(edge)
    print(f"OpenAI SDK, streamed through the load balancer: {chunks} chunks in {seconds:.2f}s: {text!r}")
    return 0 if chunks > 1 else 1


# ---- the command line -----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    from roles.plan import status as status_plan
    from roles.release.manifest import RELEASES_DIR

    top = _Parser(prog="vllm-fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = commands.add_parser("plan", help="the capacity plan of a fleet, without connecting to any host")
    p.add_argument("inventory", help="a pyinfra inventory file, e.g. inventories/prod.py")
    p.set_defaults(run=plan)
    p = commands.add_parser("status", help="each instance's health, release, load, KV cache, tokens/s and TTFT, "
                                           "from the fleet's Prometheus, else straight from the instances")
    p.add_argument("inventory", help="a pyinfra inventory file, e.g. inventories/lab.py")
    p.add_argument("--direct", action="store_true",
                   help="read the instances on their hosts even when the fleet has a monitor group")
    p.add_argument("--window", type=float, metavar="SECONDS",
                   help=f"the direct view's sampling window ({status_plan.MIN_SAMPLE_S:g} to "
                        f"{status_plan.MAX_SAMPLE_S:g}, default {status_plan.DEFAULT_SAMPLE_S:g})")
    p.set_defaults(run=status)
    add_bench_parser(commands)
    p = commands.add_parser("settings", help="every setting, its type, default and meaning")
    p.add_argument("name", nargs="?", help="only this setting")
    p.set_defaults(run=show_settings)
    p = commands.add_parser("gpus", help="the GPU models the planner knows")
    p.add_argument("gpu_type", nargs="?", help="only this GPU type, e.g. h100-sxm")
    p.set_defaults(run=gpus)
    p = commands.add_parser("howto", help="how to call the lab fleet, then a streamed chat completion through it")
    p.set_defaults(run=howto)

    p = commands.add_parser("release", help="release manifests: resolve a lock, download its wheels, show it")
    p.add_argument("action", choices=["lock", "wheelhouse", "show", "metrics"],
                   help="lock: resolve NAME.yml into NAME.lock; wheelhouse: download and verify its wheels "
                        "once on this machine; show: the pins and the lock; metrics: NAME.metrics from the "
                        "capture of --like, when the two engine wheels carry the same metrics code")
    p.add_argument("name", help="release name, the stem of a manifest in --releases-dir")
    p.add_argument("--releases-dir", type=Path, default=RELEASES_DIR, help="folder of release manifests")
    p.add_argument("--like", help="metrics: the captured release of the same vLLM whose names stand for NAME's")
    p.add_argument("--check", action="store_true", help="metrics: compare with the committed file, write nothing")
    p.set_defaults(run=release)

    p = commands.add_parser("keys", help="client keys in a secrets folder (nginx_secrets_dir): add, rotate, remove")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    actions.add_parser("new", help="print a fresh key (stored nowhere)")
    a = actions.add_parser("add", help="add a key to client NAME (a new client, or a second key to rotate to); "
                                       "prints it once")
    a.add_argument("dir", help="the secrets folder, e.g. inventories/secrets/prod (made 0700 if missing)")
    a.add_argument("name", help="the client's name: lower-case letters, digits and ._-")
    a = actions.add_parser("remove", help="remove client NAME, or only its key starting with --key-prefix")
    a.add_argument("dir", help="the secrets folder")
    a.add_argument("name", help="the client's name")
    a.add_argument("--key-prefix", help="the first 8 or more characters of the one key to remove")
    a = actions.add_parser("show", help="print client NAME's newest key: export OPENAI_API_KEY=$(vllm-fleet keys "
                                        "show DIR NAME)")
    a.add_argument("dir", help="the secrets folder")
    a.add_argument("name", help="the client's name")
    a = actions.add_parser("list", help="the clients, their limits and how each key starts")
    a.add_argument("dir", help="the secrets folder")
    a = actions.add_parser("fallback", help="store the fallback provider's API key (nginx_fallback) as DIR/fallback.key, "
                                            "asked for without echo (or read from stdin)")
    a.add_argument("dir", help="the secrets folder")
    a = actions.add_parser("hub", help="store the Hugging Face token a gated hub model needs as DIR/hub.token, asked "
                                       "for without echo (or read from stdin); only its download is given it")
    a.add_argument("dir", help="the secrets folder")
    p.set_defaults(run=keys)

    add_lab_parser(commands)
    return top


def add_lab_parser(commands) -> None:
    from roles.lab.config import DEFAULT_HOSTS

    p = commands.add_parser("lab", help="the local systemd-nspawn lab (root)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    a = actions.add_parser("up", help="build the base if needed and boot the hosts (idempotent)")
    a.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help="number of hosts")
    a = actions.add_parser("down", help="stop the hosts and remove the lab")
    a.add_argument("--keep-base", action="store_true", help="keep the base rootfs and ssh key so the next `up` is fast")
    actions.add_parser("status", help="show the hosts")
    a = actions.add_parser("model", help="build the lab's tiny random-weight Llama into DEST")
    a.add_argument("dest", help="a folder, e.g. .cache/models/tiny-llama")
    a = actions.add_parser("deploy-cost", help="what an install-only deploy costs against fleet size: bytes and wall "
                                               "time of a first install and a no-op, a fresh lab per N (replaces it)")
    a.add_argument("--hosts", default="1,2,4,8", help="host counts, one fresh lab each (default 1,2,4,8)")
    a.add_argument("--out", default=".cache/bench", help="folder of the JSON, PNG and logs (default .cache/bench)")
    a.add_argument("--plot-only", metavar="RESULT.json", help="report and plot a saved result again; no lab is touched")
    p.set_defaults(run=lab)


def add_bench_parser(commands) -> None:
    from roles.plan.bench import DATASETS, MAX_NUM_PROMPTS

    p = commands.add_parser("bench", help="serving speed as users feel it (TTFT, ITL, tokens/s), with vLLM's own "
                                          "`vllm bench serve` of the fleet's release, at the edge or one instance")
    p.add_argument("inventory", nargs="?", help="a pyinfra inventory file, e.g. inventories/lab.py")
    p.add_argument("--concurrency", help="requests in flight, one point each (default 1,2,4)")
    p.add_argument("--rate", help="request rates in requests/s, one point each (instead of --concurrency)")
    p.add_argument("--num-prompts", type=int, default=40, help=f"requests per point (default 40, at most "
                                                                 f"{MAX_NUM_PROMPTS})")
    p.add_argument("--repeat", type=int, default=1, help="run the sweep K times; the report takes medians")
    p.add_argument("--dataset", default="random", choices=DATASETS,
                   help="random prompts, or shared-prefix (vLLM's prefix_repetition)")
    p.add_argument("--input-len", type=int, default=128, help="random: prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=32, help="output tokens of every request (default 32)")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens of each shared prefix")
    p.add_argument("--suffix-len", type=int, default=64, help="shared-prefix: tokens of each request's own suffix")
    p.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: how many prefixes")
    p.add_argument("--seed", type=int, help="the first seed of vLLM's prompt sampling; each point then takes the "
                   "next (default: a fresh one per run, recorded in its JSON)")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50 "
                                                                  "(keys ttft, tpot, e2el)")
    p.add_argument("--target", help="edge, direct or edge,direct (default: edge; direct with --direct)")
    p.add_argument("--direct", action="append", metavar="HOST:INSTANCE", help="an instance to measure straight")
    p.add_argument("--client", help="the client of clients.toml whose key the edge requests use "
                                    "(default: the only one)")
    p.add_argument("--label", help="the run's name in files and plots (default: its targets)")
    p.add_argument("--point-timeout", type=float, default=600, help="seconds one point may take (default 600)")
    p.add_argument("--out", help="folder of the run's JSON and PNG (default .cache/bench/); with --compare, "
                                 "the PNG file")
    p.add_argument("--compare", nargs="+", metavar="RUN.json", help="plot saved runs together instead of running")
    p.add_argument("--overhead", metavar="HOST:INSTANCE", help="the edge's cost: this instance direct and through "
                   "the edge with it as the only upstream (the others held down meanwhile), in turns")
    p.add_argument("--routing", metavar="POLICY,POLICY", help="compare routing policies through the edge, e.g. "
                   "least_conn,prefix: each deployed in turn; prefix-cache hit rate and load balance per policy")
    p.set_defaults(run=bench)


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
