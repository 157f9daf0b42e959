"""Rolling updates: instances restart one batch at a time, out of nginx while they do, and a
first instance (the canary) that fails stops the rollout with the fleet on what it ran before.

Every host of a run adds the same operations in the same order (one take-out, switch and
put-back per slot), so pyinfra runs them as one fleet-wide sequence: slot 1's take-out on the
load balancer, its switch on the instance's host, its put-back, then slot 2, and so on. Which
instances restart is decided at execute time, from facts, by each host's `decide` operation;
the decisions and outcomes live in one `Rollout` per pyinfra run, which the operations of every
host share (pyinfra runs all hosts in one process).

An instance's switch (``fleet_probe.py switch`` on its host) moves its environment file and its
release link together, restarts it and proves it with /health and a completion; when that fails
it puts both back and proves the instance again. A failed or reverted switch, or flags that the
new release's own argument parser refuses, halts the rollout: later slots do nothing, and the
report at the end fails the hosts concerned with the reason.
"""

from __future__ import annotations

import json
import shlex
import time
import weakref
from dataclasses import dataclass, field
from io import StringIO
from math import ceil
from pathlib import Path

from pyinfra import host, state
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand, deploy, operation
from pyinfra.api.state import State
from pyinfra.context import ctx_state
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Command
from pyinfra.facts.systemd import SystemdStatus

from roles import gates, nginx, paths
from roles.common import endpoint
from roles.facts import InstanceReleases
from roles.plan import settings
from roles.plan.fleet import FleetPlan, HostPlan
from roles.private_files import upload_commands

REPORT_PATH = Path(".cache/rollout-report.json")


@dataclass(frozen=True)
class Member:
    """One instance of the fleet, as the rollout sees it."""

    host: str
    name: str
    port: int
    address: str  # where nginx reaches it
    group: str | None = None  # the instance group it is a stage of, if any
    serves: bool = True  # False for a group's follower stages: no API, not in nginx

    def __str__(self) -> str:
        return f"{self.host}:{self.name}"

    @property
    def upstream(self) -> str:
        return endpoint(self.address, self.port)


def slot_count(instances: int, batch_size: int) -> int:
    """Slots a rollout of ``instances`` needs at most: the canary alone, then batches."""
    return 0 if instances == 0 else 1 + ceil((instances - 1) / batch_size)


def moving_together(members: list[Member]) -> list[list[Member]]:
    """``members`` as what restarts as one: an instance alone, a multi-host instance with all its
    stages (they form one engine: a stage of another release cannot join it)."""
    units: dict[str, list[Member]] = {}
    for member in members:
        units.setdefault(member.group or f"{member.host}:{member.name}", []).append(member)
    return list(units.values())


def schedule(pending: list[Member], batch_size: int) -> list[list[Member]]:
    """The canary (the first instance that restarts) alone, then batches of ``batch_size``
    instances; a multi-host instance counts as one, its stages in the same slot."""
    units = moving_together(pending)
    if not units:
        return []
    rest = units[1:]
    return [units[0]] + [sum(rest[i:i + batch_size], []) for i in range(0, len(rest), batch_size)]


@dataclass
class Rollout:
    """What one deploy run restarts, in which order, and how each switch went."""

    plan: FleetPlan
    members: list[Member]
    batch_size: int
    pending: dict[Member, str] = field(default_factory=dict)  # member -> why it restarts
    running: dict[Member, str] = field(default_factory=dict)  # member -> release venv it runs now
    release_names: dict[str, str] = field(default_factory=dict)  # release venv -> release name
    outcomes: dict[Member, dict] = field(default_factory=dict)  # member -> fleet_probe switch result
    refusals: dict[str, str] = field(default_factory=dict)  # host -> flags the new release refuses
    fresh: set[Member] = field(default_factory=set)  # members the host has no environment of: first starts
    started: float = field(default_factory=time.monotonic)
    _slots: dict[int, list[Member]] = field(default_factory=dict)

    @classmethod
    def for_plan(cls, plan: FleetPlan) -> "Rollout":
        members = [Member(h.name, i.name, i.port, h.address, i.node.group if i.node else None, i.serves)
                   for h in plan.hosts for i in h.instances]
        sizes = {h.get("vllm_rollout_batch_size") for h in plan.hosts}
        return cls(plan=plan, members=members, batch_size=min(sizes))

    def members_on(self, host_name: str) -> list[Member]:
        """This host's instances, in fleet order."""
        return [m for m in self.members if m.host == host_name]

    @property
    def slots(self) -> int:
        return slot_count(len(moving_together(self.members)), self.batch_size)

    def leader_of(self, member: Member) -> Member | None:
        """The stage that serves a follower's multi-host instance; None for an instance of one host."""
        if member.serves:
            return None
        return next(m for m in self.members if m.group == member.group and m.serves)

    def group_starts(self, group: str) -> bool:
        """Whether a stage of ``group`` is started or restarted in this run (decided by now)."""
        return any(m.group == group and (m in self.pending or m in self.fresh) for m in self.members)

    def group_restarts(self, group: str) -> bool:
        """Whether ``group`` restarts whole in the rolling update: one of its stages restarts or is
        new while others run (a running leader does not take a new follower in). A group new on
        every host is started whole by its first start instead."""
        stages = [m for m in self.members if m.group == group]
        return self.group_starts(group) and not all(m in self.fresh for m in stages)

    def failed_stages(self, group: str) -> list[str]:
        """The hosts of ``group`` that failed in this run: without them its other stages cannot form."""
        failed = {h.name for h in state.failed_hosts}
        return [m.host for m in self.members if m.group == group and m.host in failed]

    def halted(self) -> str | None:
        """Why the rollout stopped, or None while it goes on."""
        # An instance restarts only once every load balancer has taken it out: one that failed
        # in this run (a configuration nginx refused) would still send it requests.
        failed = {h.name for h in state.failed_hosts}
        reasons = [f"load balancer {name} failed in this run, so no instance can be taken out of its nginx"
                   for name in self.plan.lb_hosts if name in failed]
        reasons += [f"flags refused on {name}: {reason}" for name, reason in self.refusals.items()]
        reasons += [f"instance group {group} lost {', '.join(hosts)} in this run, so its other stages cannot form"
                    for group in dict.fromkeys(m.group for m in self.members if m.group)
                    if (hosts := self.failed_stages(group))]
        reasons += [f"{m} {o['outcome']}: {o['detail']}" for m, o in self.outcomes.items() if o["outcome"] != "switched"]
        return reasons[0] if reasons else None

    def batch(self, index: int) -> list[Member]:
        """The instances of slot ``index``, or none once the rollout has halted. Fixed when first
        asked (by the slot's take-out), so the take-out, switch and put-back of a slot agree."""
        if index not in self._slots:
            for member in self.members:  # a stage restarts with the rest of its instance group
                if member.group and member not in self.pending and self.group_restarts(member.group):
                    self.pending[member] = "its instance group restarts with another stage"
            batches = schedule([m for m in self.members if m in self.pending], self.batch_size)
            self._slots[index] = batches[index] if index < len(batches) and not self.halted() else []
        return self._slots[index]

    def runs(self, member: Member, venv: str, release: str) -> None:
        self.running[member], self.release_names[venv] = venv, release

    def release_of(self, member: Member) -> str:
        venv = self.running.get(member)
        return self.release_names.get(venv, venv) if venv else "not in this run"

    def mine(self, index: int) -> list[Member]:
        return [m for m in self.batch(index) if m.host == host.name]


_RUNS: "weakref.WeakKeyDictionary[State, Rollout]" = weakref.WeakKeyDictionary()


def for_run(plan: FleetPlan) -> Rollout:
    """The rollout of the current pyinfra run (one per State: tests run several in one process)."""
    run = ctx_state.get()  # the State itself, not pyinfra's context proxy for it
    if run not in _RUNS:
        _RUNS[run] = Rollout.for_plan(plan)
    return _RUNS[run]


# ---- operations, added on every host in the same order ---------------------------------------------


def _refused_flags(python: str, check_script: str, args: dict[str, list[str]]) -> dict[str, str]:
    """Instance -> the new release's own argument parser's complaint, for the instances it refuses."""
    found = host.get_fact(Command, command=shlex.join([python, check_script, json.dumps(args)]))
    return {name: error for name, error in json.loads(found or "{}").items() if error}


@operation()
def decide(rollout: Rollout, env_texts: dict[str, str], engine_args: dict[str, list[str]], env_dir: str,
           links_dir: str, target: str, target_release: str, check_script: str, host_changes):
    """Which of this host's instances restart in this run and why, read from the host as it is
    now; the flags of every instance that will (re)start are checked first by the new release's
    own argument parser. ``host_changes()`` names a change that restarts every instance (unit
    file, model) or is None. Changes nothing itself."""
    links = host.get_fact(InstanceReleases, links_dir=links_dir)
    active = host.get_fact(SystemdStatus, services=[f"vllm@{name}.service" for name in env_texts])
    for_all = host_changes() if state.is_executing else None
    to_check = {}
    mine = rollout.members_on(host.name)
    # Decided again at execute time (after pyinfra's change detection): what counts is the host now.
    rollout.refusals.pop(host.name, None)
    for member in mine:
        rollout.pending.pop(member, None)
        rollout.fresh.discard(member)
    for member in mine:
        env = host.get_fact(FileContents, path=f"{env_dir}/{member.name}.env")
        link = links.get(member.name)
        on_target = link is not None and link["venv"] == target
        if link is not None:
            rollout.runs(member, link["venv"], target_release if on_target else link["release"])
        if env is None:
            to_check[member.name] = engine_args[member.name]  # new: started on its own, before nginx has it
            rollout.fresh.add(member)
            continue
        reasons = []
        if not on_target:
            reasons.append(f"release {link['release'] if link else 'unknown'} -> {target_release}")
            to_check[member.name] = engine_args[member.name]
        if "\n".join(env) + "\n" != env_texts[member.name]:
            reasons.append("configuration changed")
            to_check[member.name] = engine_args[member.name]
        if for_all:
            reasons.append(for_all)
        if not active.get(f"vllm@{member.name}.service"):
            reasons.append("not running")
        if reasons:
            rollout.pending[member] = ", ".join(reasons)
            host.log_styled(f"vllm@{member.name} will restart: {rollout.pending[member]}", fg="blue")
    python = f"{target}/bin/python"
    if to_check and not state.is_executing and host.get_fact(File, path=python) is None:
        # Change detection (--dry) before the new release is installed: it checks them when it runs.
        host.log_styled(f"the flags of {', '.join(to_check)} are checked once {target_release} is installed")
        to_check = {}
    refused = _refused_flags(python, check_script, to_check) if to_check else {}
    if refused:
        rollout.refusals[host.name] = "; ".join(f"vllm@{name}: {error}" for name, error in refused.items())
        host.log_styled(f"{target_release} refuses the flags of {rollout.refusals[host.name]}; no instance "
                        "is restarted", fg="red")
    yield from ()  # an operation that only reads facts and changes nothing


def _edge_conf(text: str):
    """The edge's configuration replaced in one step (a rename over it). Slots follow each other
    within a second, and nginx reads its files after `systemctl reload` has returned: written in
    place, the file it read for the previous slot's reload was seen half-written (the lab's CI:
    "pread() returned only 0 bytes"), and a file cut after a complete block parses without the
    server that listens on 443, which then refuses connections until the next reload."""
    staged = f"{paths.NGINX_CONF}.next"  # outside conf.d/*.conf: nginx never reads it
    yield FileUploadCommand(StringIO(text), staged)
    yield StringCommand(f"mv -f {staged} {paths.NGINX_CONF}")


@operation()
def take_out(rollout: Rollout, index: int, render_conf, probe: str, drain_timeout: int):
    """On load balancers: mark the slot's instances down, reload, wait for their requests to end."""
    if not state.is_executing or host.name not in rollout.plan.lb_hosts:
        return
    batch = [m for m in rollout.batch(index) if m.serves]  # a group's followers are not in nginx
    if not batch:
        return
    yield from _edge_conf(render_conf(down={m.upstream for m in batch}))
    yield StringCommand("nginx -t -q")
    upstreams = [arg for m in batch for arg in ("--upstream", m.upstream)]
    command = shlex.join(["python3", probe, "reload-and-drain", *upstreams, "--timeout", str(drain_timeout)])
    yield FunctionCommand(run_logged, (command,), {})


def run_logged(state, host, command: str) -> bool:
    """Run ``command`` and log what it printed: how long the drain took is worth seeing."""
    ok, output = host.run_shell_command(StringCommand(command))
    for line in output.output_lines:
        host.log_styled(line, fg="blue" if ok else "red")
    return ok


def _run_switch(state, host, rollout: Rollout, member: Member, command: str, target: str, target_release: str) -> bool:
    """Run one switch on the host, print its progress, and keep its outcome for the rollout."""
    ok, output = host.run_shell_command(StringCommand(command), print_output=True)
    results = [line[len("RESULT "):] for line in output.stdout_lines if line.startswith("RESULT ")]
    if not results:
        rollout.outcomes[member] = {"outcome": "broken", "detail": "the switch did not finish: "
                                    + " | ".join(output.stderr_lines[-5:]), "seconds": None}
        return False
    outcome = rollout.outcomes[member] = json.loads(results[-1])
    if outcome["outcome"] == "switched":
        rollout.runs(member, target, target_release)
        host.log_styled(f"vllm@{member.name} now runs {target_release} ({outcome['seconds']}s)", fg="green")
    else:
        host.log_styled(f"vllm@{member.name} {outcome['outcome']}: {outcome['detail']}", fg="red")
    return ok


@operation()
def switch(rollout: Rollout, index: int, host_plan: HostPlan | None, env_texts: dict[str, str], env_dir: str,
           probe: str):
    """On the slot's instance hosts: switch each instance, proving it or putting it back."""
    if not state.is_executing or host_plan is None:
        return
    for member in rollout.mine(index):
        host.log_styled(f"vllm@{member.name}: restarting ({rollout.pending[member]})", fg="blue")
        yield from upload_commands(env_texts[member.name], f"{env_dir}/{member.name}.env.next")
        leader = rollout.leader_of(member)
        command = shlex.join([
            "python3", probe, "switch", "--name", member.name, "--address", host_plan.listen_address,
            "--port", str(member.port),
            "--model", host_plan.model.served_name, "--env-dir", env_dir,
            "--link", f"{host_plan.get('vllm_install_dir')}/instances/{member.name}", "--target", host_plan.venv_dir,
            "--timeout", str(host_plan.get("vllm_start_timeout")), *(["--leader", leader.upstream] if leader else [])])
        if member.group:
            # The group's watchdog would take the stages' restarts for a failure and restart them again.
            command = (f"systemctl stop {paths.GROUP_WATCH_UNIT}; {command}; switched=$?; "
                       f"systemctl start {paths.GROUP_WATCH_UNIT}; exit $switched")
        yield FunctionCommand(_run_switch, (rollout, member, command, host_plan.venv_dir, host_plan.release.name), {})


@operation()
def put_back(rollout: Rollout, index: int, render_conf):
    """On load balancers: the slot's instances back in, unless one is broken both ways."""
    if not state.is_executing or host.name not in rollout.plan.lb_hosts or not rollout.batch(index):
        return
    broken = {m.upstream for m, o in rollout.outcomes.items() if o["outcome"] == "broken"}
    yield from _edge_conf(render_conf(down=broken))
    yield StringCommand("nginx -t -q && systemctl reload nginx")


def fleet_table(rollout: Rollout) -> list[str]:
    """One line per instance: the release it runs, and what this run did to it."""
    lines = []
    for member in rollout.members:
        outcome = rollout.outcomes.get(member)
        if outcome:
            done = f"{outcome['outcome']} in {outcome['seconds']}s"
        elif member in rollout.pending:
            done = "not restarted: the rollout stopped first"
        else:
            done = "unchanged"
        lines.append(f"{str(member):<24} {rollout.release_of(member):<32} {done}")
    return lines


def _reporter(rollout: Rollout) -> str | None:
    """The host that logs the fleet's report: the first load balancer, else the first instance
    host, that is in this run and still going."""
    for name in (*rollout.plan.lb_hosts, *(m.host for m in rollout.members)):
        found = state.inventory.get_host(name, default=None)
        if found is not None and state.is_host_in_limit(found) and found not in state.failed_hosts:
            return name
    return None


@operation()
def report(rollout: Rollout, record: Path = REPORT_PATH):
    """The fleet's releases at the end of the run (logged once, kept as JSON on the control node);
    fails the hosts where the rollout stopped, with the reason."""
    if not state.is_executing:
        return
    if host.name == _reporter(rollout):
        halted = rollout.halted()
        host.log_styled(f"rollout {'STOPPED: ' + halted if halted else 'done'}; instances and releases:",
                        fg="red" if halted else "green")
        for line in fleet_table(rollout):
            host.log_styled("  " + line)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({
            "halted": halted, "seconds": round(time.monotonic() - rollout.started, 1),
            "instances": [{"instance": str(m), "release": rollout.release_of(m), "restart": rollout.pending.get(m),
                           **rollout.outcomes.get(m, {})} for m in rollout.members]}, indent=2) + "\n")
    problems = [f"flags refused: {rollout.refusals[host.name]}"] if host.name in rollout.refusals else []
    problems += [f"vllm@{m.name} {o['outcome']}: {o['detail']}" for m, o in rollout.outcomes.items()
                 if m.host == host.name and o["outcome"] != "switched"]
    if problems:
        yield gates.failure("rollout stopped: " + "; ".join(problems))


@deploy("Rolling update")
def rolling_update(rollout: Rollout, env_texts: dict[str, str], data, env_dir: str, probe: str) -> None:
    """Every slot's take-out, switch and put-back, on every host (see the module's docstring)."""
    host_plan = rollout.plan.host(host.name)

    def render_conf(down):
        return nginx.render_conf(rollout.plan, host.name, data, down)

    for index in range(rollout.slots):
        slot = f"slot {index + 1}/{rollout.slots}"
        take_out(name=f"Rolling update {slot}: out of nginx, drained", rollout=rollout, index=index,
                 render_conf=render_conf, probe=probe, drain_timeout=settings.value(data, "nginx_drain_timeout"))
        switch(name=f"Rolling update {slot}: switch, restart, prove (or put back)", rollout=rollout, index=index,
               host_plan=host_plan, env_texts=env_texts, env_dir=env_dir, probe=probe)
        put_back(name=f"Rolling update {slot}: back into nginx", rollout=rollout, index=index,
                 render_conf=render_conf)
