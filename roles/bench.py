"""`vllm-fleet bench`: serving speed as users feel it, measured with vLLM's own `vllm bench serve`
of the fleet's pinned release, from the control node.

The release is installed once into ``.cache/bench-venv/<release>``, offline from its wheelhouse
with the lock's hashes. Each point of a sweep is one `vllm bench serve` subprocess against one
target: the edge (as a client: TLS checked with the fleet's CA, a client key) or one instance
straight (the instances' internal key). Keys go to the subprocess in its environment, never in its
argv. The flags, summaries, medians and the table are ``roles.plan.bench``; the plot is
``roles.bench_plot``.

Reusable pieces: ``bench_venv``, ``load_fleet``, ``edge_target``, ``direct_target``, ``run_point``,
``sweep``, ``write_run``, ``read_runs`` (and ``roles.bench_plot.plot_runs``).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from roles import secrets
from roles.common import endpoint
from roles.errors import FleetConfigError
from roles.plan import bench as plan
from roles.plan import edge, settings
from roles.plan.bench import Point, Target, Workload
from roles.plan.fleet import LB_GROUP, FleetPlan
from roles.release.lock import lock_path, read_lock
from roles.release.manifest import RELEASES_DIR, load_release
from roles.release.wheelhouse import WHEELHOUSE_CACHE

BENCH_VENVS = Path(".cache/bench-venv")
DEFAULT_OUT = Path(".cache/bench")
DEFAULT_POINT_TIMEOUT_S = 600
CONNECT_TIMEOUT_S = 5
INSTALL_TIMEOUT_S = 1800
# Written last into a bench venv: the digest of the lock installed, so a changed lock re-creates it.
STAMP = ".lock-digest"
# `vllm bench serve` without the `vllm` console script, which wants a usable platform (a GPU, or
# vLLM's CPU backend set up) even on a control node that only sends requests.
BENCH_SCRIPT = ("import argparse, sys\n"
                "from vllm.benchmarks import serve\n"
                "parser = argparse.ArgumentParser()\n"
                "serve.add_cli_args(parser)\n"
                "serve.main(parser.parse_args(sys.argv[1:]))\n")


class BenchError(RuntimeError):
    """A benchmark that could not run (not a refused input): one paragraph, no traceback."""


# ---- the bench venv -------------------------------------------------------------------------------

def bench_venv(release: str, releases_dir: Path = RELEASES_DIR, root: Path = BENCH_VENVS,
               wheelhouse_root: Path = WHEELHOUSE_CACHE) -> Path:
    """The venv of ``release`` on the control node, installed once, offline, from the wheelhouse
    (``vllm-fleet release wheelhouse``) with the lock's pins and hashes; installed again when the
    lock changes."""
    lock = read_lock(lock_path(load_release(release, releases_dir), releases_dir))
    venv = root / release
    stamp = venv / STAMP
    if stamp.is_file() and stamp.read_text().strip() == lock.digest and (venv / "bin" / "python").exists():
        return venv
    wheelhouse = wheelhouse_root / lock.digest[:16]
    if not (wheelhouse / "COMPLETE").is_file():
        raise FleetConfigError(f"the wheelhouse of release {release}", f"{wheelhouse} is missing or incomplete; the "
                               "bench installs the release's vLLM from it, offline.",
                               f"run `vllm-fleet release wheelhouse {release}` (it downloads the wheels once), then "
                               "the bench again.")
    python = shutil.which(f"python{lock.python}") or "python3"
    print(f"bench: installing {release} into {venv} from its wheelhouse (one time) ...", flush=True)
    started = time.monotonic()
    # As on the hosts: no index, the lock's hashes, this machine's pip configuration ignored.
    steps = [[python, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "--no-index", "--no-deps", "--require-hashes", "--find-links", str(wheelhouse), "-r", str(lock.path)]]
    for step in steps:
        done = subprocess.run(step, env={**os.environ, "PIP_CONFIG_FILE": os.devnull}, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            raise BenchError(f"bench: installing {release} into {venv} failed ({' '.join(step[:4])} ...: exit "
                             f"{done.returncode}, its output is above). Delete {venv} and run the bench again.")
    stamp.write_text(lock.digest + "\n")
    print(f"bench: {release} installed in {time.monotonic() - started:.0f} s", flush=True)
    return venv


# ---- the fleet and its targets --------------------------------------------------------------------

def load_fleet(inventory_path: str):
    """The inventory as pyinfra loads it, and its capacity plan (no host is contacted)."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from roles.plan.fleet import plan_inventory
    from roles.preflight import capacity_only

    if not Path(inventory_path).is_file():
        raise FleetConfigError("`vllm-fleet bench INVENTORY`", f"{inventory_path} is not a file.",
                               "give a pyinfra inventory file, e.g. inventories/lab.py.")
    with ctx_state.use(State()), capacity_only():
        inventory = make_inventory(inventory_path, cwd=os.getcwd())
    return inventory, plan_inventory(inventory, with_edge=False)


def _first_lb(inventory) -> tuple[str, dict[str, Any]]:
    hosts = inventory.get_group(LB_GROUP, default=[])
    if not hosts:
        raise FleetConfigError(f"inventory group `{LB_GROUP}`", "has no hosts, so the fleet has no edge to measure.",
                               "add a load balancer, or measure one instance: --direct HOST:INSTANCE.")
    return hosts[0].name, hosts[0].data.dict()


def routing_policy(inventory) -> str:
    """The edge's routing policy (nginx_routing of the first load balancer)."""
    _, data = _first_lb(inventory)
    return settings.value(data, "nginx_routing")


def tokenizer_of(fleet: FleetPlan) -> str:
    model = fleet.hosts[0].model
    return str(model.local_path) if model.local_path else str(model.model_id)


def edge_target(inventory, fleet: FleetPlan, client: str | None = None) -> Target:
    """The first load balancer as a client reaches it: ``https://{nginx_server_name or its
    address}:{port}``, checked with the fleet CA (the system's CAs for an operator's certificate),
    with a key of ``client`` (default: the only client of clients.toml)."""
    lb_name, data = _first_lb(inventory)
    directory = edge.secrets_dir(lb_name, data, Path.cwd())
    entries = secrets.load_clients(directory)
    if client is None and len(entries) != 1:
        raise FleetConfigError("`vllm-fleet bench --client`", f"{secrets.clients_file(directory)} has "
                               f"{len(entries)} clients ({', '.join(entries) or 'none'}); which one sends the "
                               "requests?", "give --client NAME (its rate limits apply to the benchmark).")
    entry = secrets.client(directory, entries, client or next(iter(entries)))
    ca_file = None
    if not settings.value(data, "nginx_tls_certificate"):
        ca_file = secrets.ca_certificate(directory)
        if not ca_file.is_file():
            raise FleetConfigError(f"host {lb_name}: the fleet CA", f"{ca_file} does not exist: the fleet has not "
                                   "been deployed, so the edge has no certificate yet.", "deploy the fleet first.")
    name = edge.server_name(lb_name, data)
    port = settings.value(data, "nginx_listen_port")
    url_host = f"[{name}]" if ":" in name else name
    return Target(label=f"edge {routing_policy(inventory)}", kind="edge",
                  base_url=f"https://{url_host}{'' if port == 443 else f':{port}'}", api_key=entry.keys[-1],
                  ca_file=ca_file, served_model=fleet.served_model_name, tokenizer=tokenizer_of(fleet), host=lb_name)


def direct_target(inventory, fleet: FleetPlan, spec: str) -> Target:
    """Instance ``HOST:INSTANCE`` straight, over plain HTTP at the address the load balancer
    reaches it at, with the instances' internal key."""
    host_name, _, instance_name = spec.rpartition(":")
    host_plan = fleet.host(host_name)
    instances = [f"{h.name}:{i.name}" for h in fleet.hosts for i in h.serving]
    instance = next((i for i in host_plan.serving if i.name == instance_name), None) if host_plan else None
    if instance is None:
        raise FleetConfigError(f"`vllm-fleet bench --direct {spec}`", "is no instance of this fleet.",
                               f"give HOST:INSTANCE, one of {', '.join(instances)}.")
    lb_name, data = _first_lb(inventory)
    key_file = edge.secrets_dir(lb_name, data, Path.cwd()) / "internal.key"
    if not key_file.is_file():
        raise FleetConfigError(f"`vllm-fleet bench --direct {spec}`", f"{key_file} (the instances' key) does not "
                               "exist: the fleet has not been deployed.", "deploy the fleet first.")
    return Target(label=f"direct {spec}", kind="direct", base_url=f"http://{endpoint(host_plan.address, instance.port)}",
                  api_key=secrets.fleet_key(key_file.parent, "internal"), ca_file=None,
                  served_model=fleet.served_model_name, tokenizer=tokenizer_of(fleet), host=host_name)


def check_reachable(target: Target) -> None:
    """Refuse, in one paragraph, a target this machine cannot open a connection to."""
    url = urlsplit(target.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        return
    except OSError as error:
        why = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error))
    if target.kind == "direct":
        raise BenchError(f"bench: {target.label}: this machine cannot connect to {target.base_url} on host "
                         f"{target.host} ({why}). The host's firewall opens the instances' ports to the load "
                         "balancers (and the monitor) only. Fix: allow this machine in the instance hosts' "
                         "`firewall_instance_allow_from` setting (its address or network) and deploy again, or "
                         "measure through the edge (leave out --direct).")
    raise BenchError(f"bench: {target.label}: this machine cannot connect to {target.base_url} on load balancer "
                     f"{target.host} ({why}). Check that the fleet is deployed and that this machine can reach "
                     "the edge's address and port (nginx_server_name, nginx_listen_port).")


# ---- running points -------------------------------------------------------------------------------

def bench_environment(target: Target) -> dict[str, str]:
    """The subprocess's environment: the key in OPENAI_API_KEY (vLLM's request functions send it
    as a bearer token), the CA in SSL_CERT_FILE (OpenSSL's default verify paths, which aiohttp's
    default context loads), no proxy, and no hub access (the tokenizer is a local folder)."""
    inherited = {k: v for k, v in os.environ.items()
                 if not k.upper().startswith(("OPENAI_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "SSL_CERT_"))}
    env = {**inherited, "OPENAI_API_KEY": target.api_key.reveal(), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NO_PROXY": "*"}
    if target.ca_file:
        env["SSL_CERT_FILE"] = str(target.ca_file)
    return env


def _last_error_line(output: str) -> str:
    """The line of a failed run's output that says why (a traceback's last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_point(venv: Path, target: Target, workload: Workload, point: Point, num_prompts: int,
              goodput: dict[str, float] | None = None, timeout_s: float = DEFAULT_POINT_TIMEOUT_S,
              work_dir: Path | None = None) -> dict[str, Any]:
    """One `vllm bench serve` run: the point's record (target, load, flags, vLLM's summarized
    result, or the error that kept it from one). ``work_dir`` keeps vLLM's raw result and its output."""
    with tempfile.TemporaryDirectory(prefix="vllm-fleet-bench-") as tmp:
        folder = Path(work_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        result_file = f"{target.kind}-{point.axis}{point.value:g}-{time.time_ns()}.json"
        args = plan.vllm_bench_args(target, workload, point, num_prompts, goodput or {}, folder, result_file)
        record: dict[str, Any] = {"target": target.label, "axis": point.axis, "value": point.value,
                                  "num_prompts": num_prompts, "vllm_bench_args": args, "result": None, "error": None,
                                  "started": now()}
        started = time.monotonic()
        try:
            done = subprocess.run([str(venv / "bin" / "python"), "-c", BENCH_SCRIPT, *args], env=bench_environment(target),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
            output = done.stdout
            (folder / f"{result_file}.log").write_text(output)
            if done.returncode != 0:
                record["error"] = f"vllm bench serve exited {done.returncode}: {_last_error_line(output)}"
        except subprocess.TimeoutExpired:
            record["error"] = f"no result within the point's timeout of {timeout_s:g} s"
        record["seconds"] = round(time.monotonic() - started, 2)
        if record["error"] is None:
            record["result"] = plan.summarize(json.loads((folder / result_file).read_text()))
    return record


Progress = Callable[[str], None]


def _print_progress(line: str) -> None:
    print(line, flush=True)


def sweep(venv: Path, targets: list[Target], workload: Workload, points: list[Point], num_prompts: int,
          repeat: int = 1, goodput: dict[str, float] | None = None, timeout_s: float = DEFAULT_POINT_TIMEOUT_S,
          progress: Progress = _print_progress, seed_offset: int = 0) -> list[dict[str, Any]]:
    """Every point of every target, ``repeat`` times: the targets take turns at each load level
    (a slow drift of a shared machine then hits all of them alike), and each repeat runs the whole
    sweep again rather than one point K times in a row. Point ``i`` (from 0) of the sweep samples its
    prompts with seed ``workload.seed + seed_offset + i``."""
    total, done, records = repeat * len(points) * len(targets), 0, []
    for repeat_index in range(repeat):
        for point in points:
            for target in targets:
                # Prompts of its own for every point (the next seed): a point that sent the prompts
                # of one before it would find them in the instances' prefix caches.
                prompts = replace(workload, seed=workload.seed + seed_offset + done)
                done += 1
                progress(f"bench [{done}/{total}] {target.label} {point.short} ({num_prompts} requests)...")
                record = run_point(venv, target, prompts, point, num_prompts, goodput, timeout_s)
                record["repeat"] = repeat_index
                records.append(record)
                progress(plan.point_summary(target.label, point, record["result"]) if record["result"]
                         else f"  {target.label} {point.short}: FAILED: {record['error']}")
    return records


# ---- records --------------------------------------------------------------------------------------

def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    """The control node that sent the requests (on a shared lab machine, also the one serving them)."""
    model = platform.processor()
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    except OSError:
        pass
    return {"node": platform.node(), "cpus": os.cpu_count(), "cpu_model": model or "unknown",
            "platform": platform.platform(), "python": platform.python_version()}


def write_run(record: dict[str, Any], out_dir: Path = DEFAULT_OUT) -> Path:
    """The run record as ``OUT_DIR/<time>-<label>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / plan.record_file_name(record["label"], record["started"])
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_runs(paths: list[str]) -> list[dict[str, Any]]:
    """Saved run records, each checked; a missing or foreign file is refused by name."""
    records = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FleetConfigError(f"`vllm-fleet bench --compare {name}`", "does not exist.",
                                   "give the JSON files a bench run wrote (in --out, default .cache/bench/).")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            data = None
        records.append(plan.check_record(data, name))
    return records


# ---- the command ----------------------------------------------------------------------------------

def command(args) -> int:
    """`vllm-fleet bench`: a sweep of INVENTORY's fleet, or ``--compare`` of saved runs."""
    from roles import bench_edge  # the measurements that change the edge while they run

    try:
        if args.compare:
            return compare(args)
        if args.overhead:
            return bench_edge.overhead_command(args)
        return bench_edge.routing_command(args) if args.routing else measure(args)
    except BenchError as error:
        print(error, file=sys.stderr)
        return 1


def workload_of(args) -> Workload:
    return plan.check_workload(Workload(dataset=args.dataset, input_len=args.input_len, output_len=args.output_len,
                                        prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                                        num_prefixes=args.num_prefixes,
                                        seed=fresh_seed() if args.seed is None else args.seed))


def fresh_seed() -> int:
    """A seed no earlier run is likely to have used: the instances' prefix caches outlive a run,
    and prompts an earlier run sent would be served from them, faster than new ones."""
    return random.SystemRandom().randrange(1 << 30)


def _targets(args, kinds: list[str], inventory, fleet: FleetPlan) -> list[Target]:
    edges = [edge_target(inventory, fleet, args.client)] if "edge" in kinds else []
    return edges + ([direct_target(inventory, fleet, spec) for spec in args.direct] if "direct" in kinds else [])


def measure(args) -> int:
    """Check every value, load the fleet, reach every target, then sweep and save JSON and PNG."""
    points = plan.sweep_points(args.concurrency, args.rate)
    num_prompts, repeat = plan.check_num_prompts(args.num_prompts), plan.check_repeat(args.repeat)
    goodput, workload = plan.parse_goodput(args.goodput), workload_of(args)
    kinds = plan.target_kinds(args.target, args.direct)
    if not args.inventory:
        raise FleetConfigError("`vllm-fleet bench`", "needs an INVENTORY (or --compare FILES).",
                               "e.g. vllm-fleet bench inventories/lab.py --concurrency 1,2.")
    inventory, fleet = load_fleet(args.inventory)
    targets = _targets(args, kinds, inventory, fleet)
    for target in targets:
        check_reachable(target)
    first = fleet.hosts[0]
    releases = sorted({h.release.name for h in fleet.hosts})
    if len(releases) > 1:
        print(f"bench: the fleet runs {', '.join(releases)}; the requests are sent with {first.release.name}'s vLLM")
    venv = bench_venv(first.release.name, Path(first.get("vllm_releases_dir")))
    started = now()
    results = sweep(venv, targets, workload, points, num_prompts, repeat, goodput, args.point_timeout)
    record = plan.run_record(
        label=args.label or " + ".join(t.label for t in targets), release=first.release.name,
        inventory=args.inventory, hosts=len(fleet.hosts), instances=sum(len(h.instances) for h in fleet.hosts),
        routing=routing_policy(inventory) if inventory.get_group(LB_GROUP, default=[]) else "none", targets=targets,
        workload=workload, points=points, num_prompts=num_prompts, repeat=repeat, goodput=goodput,
        machine=machine_info(), started=started, ended=now(), results=results)
    path = write_run(record, Path(args.out or DEFAULT_OUT))
    from roles.bench_plot import plot_runs  # matplotlib: only a finished run needs it

    png = plot_runs([record], path.with_suffix(".png"))
    print(plan.table(plan.median_points(results)))
    print(f"bench: wrote {path} and {png}")
    troubled = [r for r in results if r["error"] or (r["result"] or {}).get("failed")]
    if troubled:
        print(f"bench: {len(troubled)} of {len(results)} points had failed requests or did not run (above)",
              file=sys.stderr)
    return 1 if troubled else 0


def compare(args) -> int:
    """Saved runs in one plot (one line per run and target) and their tables."""
    records = read_runs(args.compare)
    from roles.bench_plot import plot_runs  # matplotlib
    out = Path(args.out) if args.out else DEFAULT_OUT / f"compare-{plan.time_stamp(now())}.png"
    if out.suffix != ".png":
        raise FleetConfigError("`vllm-fleet bench --compare ... --out`", f"{out} is not a .png file.",
                               "give --out FILE.png (a bench run's --out is a folder; a comparison's is the image).")
    for name, record in zip(args.compare, records):
        print(f"run {record['label']!r} ({name}; {record['release']}, {record['workload']['description']}, "
              f"started {record['started']}):")
        print(plan.table(plan.median_points(record["points"])))
    print(f"bench: wrote {plot_runs(records, out)}")
    return 0
