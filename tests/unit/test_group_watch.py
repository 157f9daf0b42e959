"""The watchdog of a multi-host instance (roles/files/group_watch.py, templates/vllm-group-watch.service.j2):
its decisions as pure state machines; the real script against a real HTTP server on loopback, with
a stand-in systemctl that records what it was asked; and its unit, rendered as the deploy renders it.

group_watch.py imports fleet_probe.py beside it as the top-level module ``fleet_probe`` (on a host
both sit in /usr/local/lib/vllm-fleet); here roles/files/ goes on sys.path the same way, so the tests
import the very modules a host runs."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pyinfra.api.util import get_template

from roles import paths
from tests.unit.systemd_units import offline_exposure, service

if str(paths.HOST_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(paths.HOST_SCRIPTS))

import group_watch  # noqa: E402  (from roles/files/, as on a host)
from group_watch import Completion, FollowerWatch, LeaderWatch, Outcome  # noqa: E402

SCRIPT = paths.HOST_SCRIPTS / "group_watch.py"
UNIT = "vllm@big"
KEY = "sk-group-watch-secret-4f1c9a"

HUNG = Completion(Outcome.FAILED, 0, "did not finish within 60s")
ERROR = Completion(Outcome.FAILED, 503, "failed with HTTP 503 (...)")
OK = Completion(Outcome.OK, 200, "finished")
UNAUTHORIZED = Completion(Outcome.REFUSED, 401, "was refused with HTTP 401 (...)")


# ---- the leader's decisions -------------------------------------------------------------------------

def feed(watch: LeaderWatch, *steps, start: float = 0.0, step: float = 5.0):
    """Observations (health_ok, completion) one interval apart: the actions, in order."""
    return [watch.observe(health, completion, start + i * step) for i, (health, completion) in enumerate(steps)]


def restarts(actions) -> int:
    return sum(a.restart for a in actions)


def test_the_leader_restarts_after_n_hangs_in_a_row_while_healthy_not_after_one():
    watch = LeaderWatch(UNIT, failures=2)
    first, second = feed(watch, (True, HUNG), (True, HUNG))
    assert not first.restart and first.say is None
    assert second.restart
    assert second.say == (f"{UNIT}: /health answers 200 but a 1-token completion did not finish within 60s, "
                          "2 times in a row: a stage of the group is gone; restarting it")


@pytest.mark.parametrize("failure", [HUNG, ERROR], ids=["timeout", "5xx"])
def test_timeouts_and_5xx_count_alike(failure):
    assert restarts(feed(LeaderWatch(UNIT, failures=3), (True, failure), (True, HUNG), (True, failure))) == 1


def test_a_success_resets_the_count():
    watch = LeaderWatch(UNIT, failures=2)
    assert restarts(feed(watch, (True, HUNG), (True, OK), (True, HUNG), (True, OK), (True, HUNG))) == 0


def test_nothing_is_judged_while_health_is_not_200():
    watch = LeaderWatch(UNIT, failures=2)
    # A leader restarting by itself: a hang before it went down does not count with one after.
    assert restarts(feed(watch, (True, HUNG), (False, None), (True, HUNG))) == 0
    assert restarts(feed(LeaderWatch(UNIT, failures=1), *[(False, None)] * 10)) == 0
    assert watch.judging


def test_a_4xx_never_restarts_and_is_said_once():
    watch = LeaderWatch(UNIT, failures=1)
    actions = feed(watch, *[(True, UNAUTHORIZED)] * 5)
    assert restarts(actions) == 0
    said = [a.say for a in actions if a.say]
    assert len(said) == 1 and "HTTP 401" in said[0] and "restarting nothing" in said[0]
    # Another refusal is said; after a success, the same one is said again.
    not_found = Completion(Outcome.REFUSED, 404, "was refused with HTTP 404 (...)")
    assert [bool(a.say) for a in feed(watch, (True, not_found), (True, not_found), (True, OK),
                                      (True, not_found))] == [True, False, False, True]


def test_after_a_restart_it_waits_for_the_leader_to_go_down_and_come_back():
    watch = LeaderWatch(UNIT, failures=1, grace=1800)
    assert feed(watch, (True, HUNG))[0].restart
    assert not watch.judging
    # Still 200 (systemctl has not stopped it yet): not judged, whatever a completion would do.
    assert feed(watch, (True, HUNG), (True, HUNG), start=5) == [group_watch.NOTHING] * 2
    # Down while the group starts, then healthy: said once, and judging again.
    down_up = feed(watch, (False, None), (False, None), (True, None), start=15)
    assert [a.restart for a in down_up] == [False] * 3
    assert down_up[-1].say == f"{UNIT}: healthy again 25s after the restart; judging its completions again"
    assert watch.judging
    assert feed(watch, (True, HUNG), start=30)[0].restart


def test_after_a_restart_that_never_took_health_down_it_judges_again_after_the_grace():
    watch = LeaderWatch(UNIT, failures=1, grace=100)
    watch.observe(True, HUNG, 0)
    assert watch.observe(True, None, 99) == group_watch.NOTHING and not watch.judging
    again = watch.observe(True, None, 100)
    assert not again.restart and watch.judging
    assert again.say == (f"{UNIT}: /health never stopped answering 200 in the 100s since the restart; "
                         "judging its completions again")


@pytest.mark.parametrize("status, body, outcome, detail", [
    (200, b'{"choices": []}', Outcome.OK, "finished"),
    (0, b"timed out", Outcome.FAILED, "did not finish within 60s"),
    (0, b"[Errno 111] Connection refused", Outcome.FAILED, "got no answer ([Errno 111] Connection refused)"),
    (500, b"boom", Outcome.FAILED, "failed with HTTP 500 (boom)"),
    (401, b'{"error": "Unauthorized"}', Outcome.REFUSED, 'was refused with HTTP 401 ({"error": "Unauthorized"})'),
    (404, b"no model " + KEY.encode(), Outcome.REFUSED, "was refused with HTTP 404 (no model ***)"),
])
def test_completion_outcomes(status, body, outcome, detail):
    assert group_watch.completion_of(status, body, 60, KEY) == Completion(outcome, status, detail)


# ---- a follower's decisions -------------------------------------------------------------------------

def test_a_follower_never_restarts_before_the_leader_was_healthy():
    watch = FollowerWatch(UNIT, "10.0.0.5:8000")
    assert not any(watch.observe(False, "connection refused").restart for _ in range(10))


def test_a_follower_restarts_once_on_the_leader_going_down_and_again_only_after_a_new_200():
    watch = FollowerWatch(UNIT, "10.0.0.5:8000", misses=2)
    seen = [watch.observe(healthy, "HTTP 503") for healthy in (True, True, False, False, False, True, False, False)]
    assert [a.restart for a in seen] == [False, False, False, True, False, False, False, True]
    assert "is healthy;" in seen[0].say and seen[1].say is None
    assert seen[3].say == (f"{UNIT}: the leader 10.0.0.5:8000 stopped answering /health with 200, 2 checks in a "
                           "row (HTTP 503); restarting this stage so that it joins the leader's next start")
    assert seen[5].say == f"{UNIT}: the leader 10.0.0.5:8000 is healthy again after the restart"
    assert [a.say for a in (seen[2], seen[4])] == [None, None]


def test_a_leader_slow_to_answer_is_busy_not_gone():
    watch = FollowerWatch(UNIT, "10.0.0.5:8000", misses=2)
    seen = [watch.observe(True)] + [watch.observe(False, "timed out", timed_out=True) for _ in range(10)]
    assert not any(a.restart for a in seen)
    assert watch.observe(False, "[Errno 111] Connection refused").restart is False
    assert watch.observe(False, "[Errno 111] Connection refused").restart is True


def test_one_slow_answer_of_the_leader_restarts_no_follower():
    watch = FollowerWatch(UNIT, "10.0.0.5:8000", misses=3)
    seen = [watch.observe(healthy, "timed out") for healthy in (True, False, False, True, False, False, True)]
    assert not any(a.restart for a in seen)


# ---- the real script, against a real server ---------------------------------------------------------

class _Leader(BaseHTTPRequestHandler):
    """A leader whose /health answers 200 and whose completions hang (until the test ends)."""

    def do_GET(self):
        self.server.seen.append(("GET", self.path, self.headers.get("Authorization")))
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.seen.append(("POST", self.path, self.headers.get("Authorization"), body))
        self.server.released.wait(30)

    def log_message(self, *args):
        pass


@pytest.fixture
def leader_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Leader)
    server.daemon_threads = True
    server.seen, server.released = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def host(tmp_path):
    """A stand-in systemctl on PATH that appends its arguments to a file, and an instance env dir."""
    bin_dir, env_dir = tmp_path / "bin", tmp_path / "instances"
    bin_dir.mkdir()
    env_dir.mkdir(mode=0o700)
    calls = tmp_path / "systemctl.calls"
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\n')
    systemctl.chmod(0o755)
    (env_dir / "big.env").write_text(f'ENGINE_ARGS="--port 8000"\nVLLM_API_KEY="{KEY}"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    return {"env": env, "env_dir": env_dir, "calls": calls}


def start(host, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=host["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    return process.communicate(timeout=10)[0]


def calls(host) -> list[str]:
    return host["calls"].read_text().splitlines() if host["calls"].exists() else []


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_leader_watch_restarts_a_leader_whose_completions_hang(leader_server, host):
    port = leader_server.server_address[1]
    process = start(host, "leader", "--name", "big", "--address", "127.0.0.1", "--port", str(port),
                    "--env-dir", str(host["env_dir"]), "--model", "tiny", "--interval", "0.1",
                    "--hang-timeout", "0.3", "--failures", "2")
    try:
        assert wait_for(lambda: calls(host)), "no systemctl call within 10s"
        # Health still answers 200 and completions still hang: no second restart while it waits
        # for the leader to go down and come back.
        time.sleep(1.5)
        assert process.poll() is None
    finally:
        output = stop(process)
    assert calls(host) == ["restart vllm@big"], output
    posts = [s for s in leader_server.seen if s[0] == "POST"]
    assert len(posts) == 2, output
    assert all(s[1:] == ("/v1/completions", f"Bearer {KEY}", {"model": "tiny", "prompt": group_watch.fleet_probe.PROMPT,
                                                             "max_tokens": 1}) for s in posts)
    assert "vllm@big: /health answers 200 but a 1-token completion did not finish within 0.3s, 2 times in a row" \
        in output
    assert KEY not in output


def test_the_follower_watch_restarts_its_stage_once_when_the_leader_goes_down(leader_server, host):
    port = leader_server.server_address[1]
    process = start(host, "follower", "--name", "big", "--leader-address", "127.0.0.1", "--leader-port", str(port),
                    "--interval", "0.1")
    try:
        assert wait_for(lambda: len([s for s in leader_server.seen if s[1] == "/health"]) >= 2)
        assert calls(host) == []
        leader_server.shutdown()
        leader_server.server_close()
        assert wait_for(lambda: calls(host)), "no systemctl call within 10s"
        time.sleep(1.0)  # the leader stays down: no second restart
        assert process.poll() is None
    finally:
        output = stop(process)
    assert calls(host) == ["restart vllm@big"], output
    assert f"the leader 127.0.0.1:{port} stopped answering /health with 200" in output
    # No key is needed, or sent, to ask the leader's health.
    assert all(s[2] is None for s in leader_server.seen)


def test_the_follower_watch_waits_for_a_leader_it_never_saw_healthy(host):
    with ThreadingHTTPServer(("127.0.0.1", 0), _Leader) as unused:
        port = unused.server_address[1]  # closed: nothing listens there
    process = start(host, "follower", "--name", "big", "--leader-address", "127.0.0.1", "--leader-port", str(port),
                    "--interval", "0.1")
    try:
        time.sleep(1.0)
        assert process.poll() is None
    finally:
        output = stop(process)
    assert calls(host) == [], output
    assert "watching the group's leader" in output


# ---- the unit -------------------------------------------------------------------------------------

TEMPLATE = "vllm-group-watch.service.j2"
LEADER_ARGS = ("leader --name big --address 10.0.0.5 --port 8000 --env-dir /etc/vllm-fleet/instances --model m "
               "--interval 5 --hang-timeout 60 --failures 2")
SCRIPT_PATH = "/usr/local/lib/vllm-fleet/group_watch.py"


def render(**overrides) -> str:
    # What roles/group.py passes (the group's name as ``instance``: files.template takes ``name`` as the
    # operation's own). pyinfra's environment for files.template: StrictUndefined, keep_trailing_newline, no trimming.
    env = Environment(loader=FileSystemLoader(paths.TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True)
    data = {"instance": "big", "role": "leader", "watch_args": LEADER_ARGS, "script": SCRIPT_PATH, **overrides}
    return env.get_template(TEMPLATE).render(**data)


def test_the_unit_runs_the_watch_with_its_arguments():
    text = render()
    unit = service(text)
    assert unit["ExecStart"] == [f"/usr/bin/python3 {SCRIPT_PATH} {LEADER_ARGS}"]
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[2:4] == ["leader", "--name"] and group_watch.parse(argv[2:]).name == "big"
    assert (unit["Restart"], unit["RestartSec"]) == (["always"], ["5"])
    lines = text.splitlines()
    assert "Description=Watchdog of vLLM instance group big (vllm-fleet)" in lines
    assert "After=vllm@big.service network-online.target" in lines and "Wants=network-online.target" in lines
    assert text.endswith("[Install]\nWantedBy=multi-user.target\n")


def test_the_unit_runs_as_root_without_capabilities_and_writes_nothing():
    unit = service(render(role="follower", watch_args="follower --name big --leader-address 10.0.0.5 --leader-port 8000"))
    assert "User" not in unit and "DynamicUser" not in unit
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert not [key for key in unit if key.startswith(("ReadWritePaths", "StateDirectory", "CacheDirectory"))]
    assert (unit["PrivateTmp"], unit["ProtectHome"]) == (["yes"], ["yes"])
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups"):
        assert unit[key] == ["yes"], key
    # HTTP to the instances, systemd's socket for systemctl; no private network.
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"] and "PrivateNetwork" not in unit
    # The environment directory (/etc) stays readable.
    assert not [path for key in ("InaccessiblePaths", "TemporaryFileSystem") for path in unit.get(key, [])]


def test_pyinfra_renders_the_same_clean_unit():
    data = {"instance": "big", "role": "leader", "watch_args": LEADER_ARGS, "script": SCRIPT_PATH}
    text = get_template(str(paths.TEMPLATES / TEMPLATE)).render(**data)
    assert text == render()
    assert "{%" not in text and "{{" not in text and "\n\n\n" not in text and not text.startswith("\n")


def test_unit_exposure_is_low(tmp_path):
    unit_file = tmp_path / "vllm-group-watch.service"
    unit_file.write_text(render())
    exposure, report = offline_exposure(unit_file)
    assert exposure <= 2.0, report


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = "/usr/bin/systemd-analyze"
    if not Path(analyze).exists() or not Path("/usr/bin/python3").exists():
        pytest.skip("no systemd-analyze (or no /usr/bin/python3) on this machine")
    unit_file = tmp_path / "vllm-group-watch.service"
    unit_file.write_text(render())
    done = subprocess.run([analyze, "verify", str(unit_file)], check=False, capture_output=True, text=True,
                          timeout=60)
    # Only the unit's own problems: vllm@big.service is not installed here.
    problems = [line for line in done.stderr.splitlines() if "vllm-group-watch.service" in line]
    assert done.returncode == 0 and not problems, done.stderr
