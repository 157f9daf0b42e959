"""`vllm-fleet lab deploy-cost`: what installing the fleet costs as it grows, measured on the lab.

For each host count N, ascending: a fresh lab of N hosts (`lab down --keep-base`, `lab up --hosts
N`, their package indexes refreshed one host after another), the install-only deploy (`pyinfra -y inventories/lab.py deploys/install.py`: artifact cache,
release venv, staged model, no vLLM started) with pyinfra's default parallelism (every host at
once), then the same deploy again, which must change nothing. Each deploy is timed, its Grand total
kept, and its bytes read from the kernel's counters of the lab network: the bridge's tx_bytes is
what the control node sent into the lab (traffic between hosts, such as the hosts pulling from the
cache host lab1, is switched inside the bridge and never reaches it), its rx_bytes what came back,
and each host's bridge-side veth's tx_bytes what that host received, from anywhere. CPU seconds
are read from the cgroups (each lab host's own, and this machine's), with the time some task waited
for a CPU (the kernel's pressure stall): what bounds the wall time on two cores.

The release's wheelhouse is built before the first round, outside the measurement. The hosts are
fresh, but this machine's apt proxy keeps its cache across labs: Debian packages are served from
it, never downloaded from the mirror again. They cross the bridge too, yet a real fleet gets them
from its distribution's mirror, not from the control node: what the proxy served during a deploy
(its transfer log) is recorded apart, and the goal is judged on the rest.

The figures, the goals, the table and the plot are ``roles.lab.deploy_cost_report``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roles.bench import machine_info, now
from roles.errors import LabError
from roles.lab.config import APT_PROXY_LOG, BRIDGE, HOST_OFFSET, SUBNET, host_name, veth_name
from roles.lab.hosts import CGROUP_PARENT, ssh_command
from roles.lab.deploy_cost_report import KIND, grand_total, not_noops, parse_hosts, plot, read_result, report, succeeded
from roles.lab.rootfs import require_root
from roles.plan.bench import time_stamp
from roles.release.lock import lock_path, read_lock
from roles.release.manifest import RELEASES_DIR, load_release
from roles.release.wheelhouse import build_wheelhouse

REPO = Path(__file__).resolve().parents[2]
INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/install.py"
# A first install of eight hosts on two cores takes minutes; one that hangs is stopped here.
DEPLOY_TIMEOUT_S = 40 * 60
# `lab up` of eight hosts from a kept base, or `lab down` of them.
LAB_TIMEOUT_S = 20 * 60
# Host labN takes the (HOST_OFFSET + N)th address, below the broadcast address.
MOST_HOSTS = SUBNET.num_addresses - HOST_OFFSET - 2
SYS_NET = Path("/sys/class/net")
# The cgroup v2 tree of this machine: each lab host's processes are in CGROUP_PARENT/<host> there.
CGROUP_V2 = Path("/sys/fs/cgroup/unified")
APT_NOTE = ("fresh hosts, their package indexes refreshed one host after another before the measurement (the lab's "
            "apt proxy hangs some concurrent updates); their Debian packages come from this machine's apt proxy (its "
            "cache kept across labs), which a real fleet's hosts get from their mirror: counted apart from what "
            "leaves the control node")


def lab_settings(text: str) -> dict[str, Any]:
    """The lab fleet's constant settings (``_FLEET`` in inventories/lab.py), read without running the
    file: it needs lab.json of a running lab, and this command replaces the lab."""
    for node in ast.parse(text).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(target, ast.Name) and target.id == "_FLEET" for target in node.targets)):
            return {key.value: value.value for key, value in zip(node.value.keys, node.value.values)
                    if isinstance(key, ast.Constant) and isinstance(value, ast.Constant)}
    raise LabError(f"{INVENTORY} has no `_FLEET = {{...}}` of settings: deploy-cost reads the release from it")


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(path.stat().st_size for path in folder.rglob(pattern) if path.is_file())


def read_counters(devices: list[str], root: Path = SYS_NET) -> dict[str, dict[str, int]]:
    """Each device's bytes sent and received so far, as the kernel counts them."""
    def read(device: str, name: str) -> int:
        return int((root / device / "statistics" / f"{name}_bytes").read_text())

    return {device: {"tx": read(device, "tx"), "rx": read(device, "rx")} for device in devices}


def traffic(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], hosts: list[str]) -> dict[str, Any]:
    """The bytes of one deploy from two readings: out of the control node (into the bridge), back
    to it, and into each host (out of the bridge's port to it)."""
    def delta(device: str, name: str) -> int:
        return after[device][name] - before[device][name]

    return {"control_out_bytes": delta(BRIDGE, "tx"), "control_in_bytes": delta(BRIDGE, "rx"),
            "host_in_bytes": {host: delta(veth_name(host), "tx") for host in hosts}}


def apt_proxy_bytes(start: float, end: float, log: Path = APT_PROXY_LOG) -> int:
    """What the lab's apt proxy served (its "O" lines) between two moments (epoch seconds)."""
    if not log.is_file():
        return 0
    served = 0
    for line in log.read_text(errors="replace").splitlines():
        fields = line.split("|")
        if len(fields) >= 3 and fields[1] == "O" and fields[0].isdigit() and fields[2].isdigit() \
                and start - 1 <= int(fields[0]) <= end + 1:
            served += int(fields[2])
    return served


def run_pyinfra(log: Path, timeout_s: float) -> tuple[int | None, bool]:
    """The install-only deploy of the lab, its output into ``log``: (exit code, timed out)."""
    command = [str(Path(sys.executable).with_name("pyinfra")), "-y", INVENTORY, DEPLOY]
    with log.open("w") as out:
        try:
            proc = subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return None, True
    return proc.returncode, False


def cpu_readings(hosts: list[str], root: Path = CGROUP_V2) -> dict[str, float]:
    """CPU seconds so far: each lab host's (its own cgroup, which every process of that host is in),
    this whole machine's, and how long some task of this machine waited for a CPU (pressure stall)."""
    def usage(group: Path) -> float:
        stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
        return int(stat["usage_usec"]) / 1e6

    some = (root / "cpu.pressure").read_text().splitlines()[0]
    return {**{host: usage(root / CGROUP_PARENT / host) for host in hosts}, "machine": usage(root),
            "stalled": int(some.rsplit("total=", 1)[1]) / 1e6}


def cpu_used(before: dict[str, float], after: dict[str, float], hosts: list[str]) -> dict[str, float]:
    """What one deploy cost in CPU: the hosts' seconds, the machine's, and the seconds it was short of CPUs."""
    return {"hosts_s": round(sum(after[h] - before[h] for h in hosts), 1),
            "machine_s": round(after["machine"] - before["machine"], 1),
            "stalled_s": round(after["stalled"] - before["stalled"], 1), "cpus": os.cpu_count()}


def measure_deploy(hosts: list[str], log: Path, timeout_s: float = DEPLOY_TIMEOUT_S) -> dict[str, Any]:
    """One deploy of the lab of ``hosts``: wall seconds, exit code, Grand total, bytes and CPU."""
    devices = [BRIDGE, *(veth_name(host) for host in hosts)]
    before, cpu_before, wall_start = read_counters(devices), cpu_readings(hosts), time.time()
    started = time.monotonic()
    returncode, timed_out = run_pyinfra(log, timeout_s)
    seconds = time.monotonic() - started
    after, cpu_after = read_counters(devices), cpu_readings(hosts)
    return {"seconds": round(seconds, 2), "returncode": returncode, "timed_out": timed_out,
            "totals": grand_total(log.read_text(errors="replace")), **traffic(before, after, hosts),
            "apt_proxy_bytes": apt_proxy_bytes(wall_start, time.time()),
            "cpu": cpu_used(cpu_before, cpu_after, hosts), "log": str(log)}


def lab_cli(*args: str) -> None:
    """`vllm-fleet lab ARGS` as its own process, as an operator runs it (`up` also writes the lab
    client's key that inventories/lab.py needs)."""
    subprocess.run([sys.executable, "-m", "roles.cli", "lab", *args], cwd=REPO, check=True, timeout=LAB_TIMEOUT_S)


def _why(measurement: dict[str, Any]) -> str:
    if measurement["timed_out"]:
        return "pyinfra ran past its timeout and was stopped"
    return f"pyinfra exited {measurement['returncode']}"


def refresh_indexes(hosts: list[str]) -> None:
    """Each fresh host's Debian package indexes, one host after another, before the measurement: the
    lab's apt proxy left some of four or eight hosts updating at once hung for minutes on an index it
    was revalidating (their connections in CLOSE-WAIT, apt's http method never noticing; seen here).
    The stamp tells the deploy the indexes are fresh, so it does not update them again. Which
    Debian packages a host installs, and their bytes, stay in the measurement."""
    for host in hosts:
        subprocess.run(ssh_command(host) + ["apt-get update -q >/dev/null && "
                                            "touch /var/lib/apt/periodic/update-success-stamp"],
                       check=True, timeout=LAB_TIMEOUT_S)


def run_rounds(counts: list[int], run_dir: Path, result: dict[str, Any], save: Callable[[], None],
               lab: Callable[..., None] = lab_cli, measure: Callable[..., dict] = measure_deploy,
               refresh: Callable[[list[str]], None] = refresh_indexes) -> bool:
    """Every round into ``result['rounds']``, saved after each deploy; the first failure is put in
    ``result['failed']`` and stops the run (False)."""
    for n in counts:
        hosts = [host_name(i) for i in range(1, n + 1)]
        print(f"deploy-cost: N={n}: a fresh lab of {n} hosts", flush=True)
        try:
            lab("down", "--keep-base")
            lab("up", "--hosts", str(n))
            refresh(hosts)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            result["failed"] = {"n": n, "step": "fresh lab", "problem": str(error), "log": None}
            save()
            return False
        entry: dict[str, Any] = {"n": n, "hosts": hosts}
        result["rounds"].append(entry)
        for which, step in (("first", "first install"), ("noop", "no-op re-run")):
            log = run_dir / f"N{n}-{which}.log"
            print(f"deploy-cost: N={n}: {step} ({DEPLOY}), log {log}", flush=True)
            entry[which] = measured = measure(hosts, log)
            save()
            if not succeeded(measured):
                result["failed"] = {"n": n, "step": step, "problem": _why(measured), "log": str(log)}
                save()
                return False
            print(f"deploy-cost: N={n}: {step} in {measured['seconds']:.1f} s, "
                  f"{measured['control_out_bytes'] / 1e6:.1f} MB out of the control node", flush=True)
    return True


def prepare() -> dict[str, Any]:
    """Outside the measurement: the lab release's wheelhouse on this machine and the lab's model."""
    settings = lab_settings((REPO / INVENTORY).read_text())
    release = settings["vllm_release"]
    releases = REPO / RELEASES_DIR
    wheelhouse = build_wheelhouse(read_lock(lock_path(load_release(release, releases), releases)))
    model = REPO / settings["vllm_model_path"]
    built_now = not (model / "config.json").is_file()
    if built_now:
        subprocess.run([sys.executable, "-m", "roles.cli", "lab", "model", str(model)], cwd=REPO, check=True,
                       timeout=LAB_TIMEOUT_S)
    return {"release": release,
            "wheelhouse": {"path": str(wheelhouse), "bytes": folder_bytes(wheelhouse, "*.whl"), "prebuilt": True},
            "model": {"path": settings["vllm_model_path"], "bytes": folder_bytes(model), "built_now": built_now}}


def replot(path: Path) -> int:
    """`--plot-only`: the plot and report of a saved result again; no lab is touched."""
    result = read_result(path)
    print(report(result))
    print(f"deploy-cost: {plot(result, path.with_suffix('.png'))}")
    return 0


def command(args) -> int:
    """`vllm-fleet lab deploy-cost`: every round, then the JSON, the PNG and the report."""
    if args.plot_only:
        return replot(Path(args.plot_only))
    counts = parse_hosts(args.hosts, MOST_HOSTS)
    require_root()
    started = now()
    out = Path(args.out)
    run_dir = out / f"deploy-cost-{time_stamp(started)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{time_stamp(started)}-deploy-cost.json"
    result: dict[str, Any] = {
        "kind": KIND, "started": started, "finished": None, "machine": machine_info(), **prepare(),
        "deploy": f"pyinfra -y {INVENTORY} {DEPLOY}", "hosts": counts, "apt_proxy_cache_kept": True,
        "apt_note": APT_NOTE, "logs": str(run_dir), "rounds": [], "failed": None}

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")

    save()
    print(f"deploy-cost: N = {', '.join(map(str, counts))}; each round replaces the lab ({APT_NOTE})", flush=True)
    completed = run_rounds(counts, run_dir, result, save)
    if completed:
        try:
            lab_cli("down", "--keep-base")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            result["failed"] = {"n": counts[-1], "step": "lab down --keep-base", "problem": str(error), "log": None}
            completed = False
    result["finished"] = now()
    save()
    png = plot(result, json_path.with_suffix(".png"))
    print(report(result))
    print(f"deploy-cost: {json_path}, {png}, logs in {run_dir}")
    if completed:
        print("the lab is down (base rootfs and key kept): `make lab` brings the lab fleet back (it installs again)")
    else:
        print("the lab is left as the failed round left it, to look at; `vllm-fleet lab down --keep-base`, then "
              "`make lab`, brings the lab fleet back")
    return 0 if completed and not not_noops(result["rounds"]) else 1
