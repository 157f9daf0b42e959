"""`vllm-fleet status` on the hosts: through pyinfra's own connection (the inventory's ssh
settings), ask the fleet's Prometheus on the first monitor host, or, without a monitor group (or
with ``--direct``), read every instance on its own host. The queries, the arithmetic and the table
are in ``roles.plan.status``; this module only connects, runs and hands the answers over.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pyinfra.api import Config, State, StringCommand
from pyinfra.api.exceptions import ConnectError
from pyinfra.context import ctx_host, ctx_state
from pyinfra_cli.inventory import make_inventory

from roles.errors import FleetConfigError
from roles.paths import SAMPLE_INSTANCES
from roles.plan import status
from roles.plan.fleet import MONITOR_GROUP, HostPlan, plan_inventory
from roles.plan.monitoring import PROMETHEUS_ADDRESS
from roles.preflight import capacity_only

CONNECT_TIMEOUT_S = 10
# Each socket operation of the host script's requests to an instance: /health and /metrics
# answer in milliseconds when the instance is well, and a hung one must not hold the view.
REQUEST_TIMEOUT_S = 5.0

# Run on the monitor host, where Prometheus listens on loopback: every status query, one JSON answer.
_STATUS_SCRIPT = ("import json, sys, urllib.parse, urllib.request as u\n"
                  "answers = {}\n"
                  "for column, query in json.loads(sys.argv[2]).items():\n"
                  "    url = 'http://' + sys.argv[1] + '/api/v1/query?query=' + urllib.parse.quote(query, safe='')\n"
                  "    answers[column] = json.load(u.urlopen(url, timeout=30))['data']['result']\n"
                  "print(json.dumps(answers))\n")


def show(args) -> int:
    """The status view of inventory ``args.inventory``: from Prometheus when the fleet has a
    monitor group (unless ``args.direct``), else straight from the instances."""
    if not Path(args.inventory).is_file():
        raise FleetConfigError("`vllm-fleet status INVENTORY`", f"{args.inventory} is not a file.",
                               "give a pyinfra inventory file, e.g. inventories/lab.py.")
    window = status.check_sample_window(status.DEFAULT_SAMPLE_S if args.window is None else args.window)
    state, inventory = _load(args.inventory)
    monitors = inventory.get_group(MONITOR_GROUP, default=[])
    if monitors and not args.direct and args.window is not None:
        raise FleetConfigError("`vllm-fleet status --window`", f"is the sampling window of the view straight from "
                               f"the instances, but this fleet's view comes from Prometheus on {monitors[0].name} "
                               f"(over {status.WINDOW}).", "add --direct to read the instances, or leave --window out.")
    state.init(inventory, Config(CONNECT_TIMEOUT=CONNECT_TIMEOUT_S))
    with ctx_state.use(state):
        if monitors and not args.direct:
            return from_prometheus(monitors[0])
        return from_instances(inventory, window)


def _load(inventory_path: str):
    """pyinfra's State and the inventory, loaded as pyinfra loads it but planned for capacity only."""
    state = State()
    with ctx_state.use(state), capacity_only():
        inventory = make_inventory(inventory_path, cwd=os.getcwd())
    return state, inventory


def instance_metrics(inventory_path: str, names: list[str]) -> dict[str, str]:
    """Every instance's /metrics lines of ``names`` ("HOST:INSTANCE" -> lines), read once on its own
    host over ssh, all hosts at once. RuntimeError names the instances that could not be read."""
    state, inventory = _load(inventory_path)
    state.init(inventory, Config(CONNECT_TIMEOUT=CONNECT_TIMEOUT_S))
    with ctx_state.use(state):
        plan = plan_inventory(inventory, with_edge=False)
        answers = _sample_hosts([(inventory.get_host(h.name), h) for h in plan.hosts], 0.0, names)
    pages, unread = {}, []
    for host_plan in plan.hosts:
        answer = answers[host_plan.name]
        for instance in host_plan.serving:
            reading = answer[instance.name][1] if isinstance(answer, dict) else {"metrics": None, "error": answer}
            if reading["metrics"] is None:
                unread.append(f"{host_plan.name}:{instance.name} ({reading['error']})")
            pages[f"{host_plan.name}:{instance.name}"] = reading["metrics"]
    if unread:
        raise RuntimeError(f"/metrics not read from {', '.join(unread)}")
    return pages


def from_prometheus(host) -> int:
    command = shlex.join(["python3", "-c", _STATUS_SCRIPT, PROMETHEUS_ADDRESS, json.dumps(status.QUERIES)])
    try:
        output = _run(host, command)
    except (ConnectError, RuntimeError) as error:
        print(f"status: Prometheus on {host.name} did not answer: {error}", file=sys.stderr)
        return 1
    values = status.prometheus_values(json.loads(output))
    print(f"as Prometheus on {host.name} sees the fleet:\n{status.table(values, status.WINDOW)}")
    return 0


def from_instances(inventory, window: float) -> int:
    """Every instance host sampled at once; its instances' values in one table. A host that could
    not be read is named, with its instances, and the exit code is 1."""
    plan = plan_inventory(inventory, with_edge=False)
    hosts = [(inventory.get_host(h.name), h) for h in plan.hosts]
    answers = _sample_hosts(hosts, window)
    values: dict[tuple[str, str], dict[str, Any]] = {}
    notes = []
    for host, host_plan in hosts:
        answer = answers[host.name]
        if isinstance(answer, str):
            notes.append(f"status: host {host.name}: not read: {answer}. Left out of the table: "
                         f"{', '.join(f'{host.name}:{i.name}' for i in host_plan.serving)}.")
            continue
        for instance in host_plan.serving:
            values[(host.name, instance.name)], note = _instance_values(host_plan, instance.name, answer)
            notes += [note] if note else []
    print(f"straight from the instances, sampled over {window:g} s:\n{status.table(values, f'{window:g}s')}")
    for note in notes:
        print(note, file=sys.stderr)
    return 1 if any(isinstance(answer, str) for answer in answers.values()) else 0


def _instance_values(host_plan: HostPlan, name: str, answer: dict) -> tuple[dict[str, Any], str | None]:
    """One instance's values from its host's answer, and what went wrong reading it (or None)."""
    first, second = answer[name]
    where = f"status: {host_plan.name}:{name}"
    try:
        values = status.sampled_values(first, second, host_plan.release.name)
    except ValueError as error:  # a page that is not Prometheus's text format: its numbers are unknown
        unread = {"metrics": None}
        return status.sampled_values({**first, **unread}, {**second, **unread}, host_plan.release.name), \
            f"{where}: {error}"
    failed = [f"{which} reading: {r['error']}" for which, r in (("first", first), ("second", second)) if r["error"]]
    return values, f"{where}: {'; '.join(failed)}" if failed else None


def _sample_hosts(hosts: list[tuple[Any, HostPlan]], window: float,
                  names: list[str] | None = None) -> dict[str, dict | str]:
    """Each host's answer (instance name -> its two readings), or why there is none.

    All hosts at once, each in a thread of its own: every host's sampling takes the whole window,
    so one host after another would make the view take a window per host. Each thread is given up
    on at a deadline, whatever holds it: pyinfra's own command timeout is a gevent timer, which a
    read blocked outside gevent (paramiko's, without the monkey-patching pyinfra's CLI installs and
    this one does not) may never let fire. Daemon threads, so a hung one does not keep the command
    from exiting.
    """
    answers: dict[str, dict | str] = {}

    def sample(host, host_plan: HostPlan) -> None:
        try:
            answers[host.name] = json.loads(_run(host, _sample_command(host_plan, window, names)))
        except Exception as error:  # whatever stops one host is that host's failure; the others still show
            answers[host.name] = str(error) or type(error).__name__

    threads = [threading.Thread(target=sample, args=pair, daemon=True) for pair in hosts]
    longest = max(_deadline_s(len(h.instances), window) for _, h in hosts)
    deadline = time.monotonic() + longest
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {host.name: answers.get(host.name, f"no answer within {longest:.0f} s") for host, _ in hosts}


def _deadline_s(instances: int, window: float) -> float:
    """How long one host may take: connecting and logging in, the window, and both readings'
    two requests per instance at their timeout."""
    return 3 * CONNECT_TIMEOUT_S + window + 2 * 2 * instances * REQUEST_TIMEOUT_S


def _sample_command(host_plan: HostPlan, window: float, names: list[str] | None = None) -> str:
    # The instances listen on the host's listen address (its advertised one unless set apart), as
    # the smoke test and the rolling update reach them from the host itself.
    return shlex.join(["python3", "-c", SAMPLE_INSTANCES.read_text(), "--address", host_plan.listen_address,
                       *[arg for i in host_plan.serving for arg in ("--instance", f"{i.name}:{i.port}")],
                       *[arg for name in names or status.sampled_metric_names() for arg in ("--metric", name)],
                       "--window", f"{window:g}", "--timeout", f"{REQUEST_TIMEOUT_S:g}"])


def _run(host, command: str) -> str:
    """``command``'s stdout on ``host``, over pyinfra's connection (opened and closed here)."""
    with ctx_host.use(host):
        host.connect(show_errors=False, raise_exceptions=True)
        try:
            ok, output = host.run_shell_command(StringCommand(command))
        finally:
            host.disconnect()
    if not ok:
        raise RuntimeError(f"the command failed: {output.stderr.strip() or 'no error output'}")
    return output.stdout
