#!/usr/bin/env python3
"""Health waits and smoke tests, run ON a fleet host (stdlib only: hosts have no extra packages).

    fleet_probe.py wait   --unit vllm@a --address 10.0.0.5 --port 8001 --timeout 900
    fleet_probe.py smoke  --address 10.0.0.5 --instance a:8001 ... --env-dir DIR [--report]
                          [--lb-port 443 --lb-name NAME --lb-ca FILE --lb-key-file FILE --model NAME]
    fleet_probe.py switch --name a --address 10.0.0.5 --port 8001 --model NAME --link L --target VENV
                          --timeout 900 --env-dir DIR
    fleet_probe.py reload-and-drain --upstream 10.0.0.5:8001 ... --timeout 120
    fleet_probe.py listen --address 10.0.0.5 --port 29500 --peers 1 --timeout 120
    fleet_probe.py reach  --address 10.0.0.5 --port 29500 --timeout 60

``wait`` prints progress while an instance loads and, on failure, the unit's last journal
lines. ``smoke`` prints one JSON object with every check's result; with ``--report`` it exits
non-zero when a check failed, after printing the failures and the journals of failing units.
``switch`` moves one instance to its staged environment and release, restarts it and proves
it (health and a completion); when that fails it puts the previous environment and release
back and proves those. Its last line is ``RESULT {json}``. ``reload-and-drain`` reloads nginx
and waits until its old workers have finished every request to the given upstreams.
``listen`` and ``reach`` are the preflight of a multi-host instance's rendezvous: ``listen`` on
the leader binds its master port (failing at once when something holds it) and leaves a listener
in the background that takes the followers' connections; ``reach`` on a follower connects to it.
A follower's ``switch`` (``--leader``) proves the stage by the leader's /health coming back.
Requests go to this host's own instances at the address they listen on (with their key, read
from their root-only environment file) and to its own edge on loopback, over TLS, with the
smoke test's client key. No key is ever on a command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection

JOURNAL_LINES = 40
# A follower's switch takes the leader's /health as proof only once it has seen the leader go
# down (it restarts in the same step), or after this long if it never saw it.
LEADER_RESTART_S = 30
PROMPT = "The capital of France is"


class _LoopbackHTTPS(HTTPSConnection):
    """TLS to this host's own nginx, verified as the name clients reach it at (its certificate
    need not name the loopback address)."""

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class Endpoint:
    """Where a request goes: a local instance (plain HTTP at ``address``) or this host's edge
    (HTTPS on loopback, verified as ``tls_name`` against ``ca``, or the system's CAs)."""

    port: int
    address: str = "127.0.0.1"
    tls_name: str | None = None
    ca: str | None = None

    def connection(self, timeout: float) -> HTTPConnection:
        if self.tls_name is None:
            return HTTPConnection(self.address, self.port, timeout=timeout)
        context = ssl.create_default_context(cafile=self.ca)
        # ``ca`` may be the edge's own certificate chain: trusting its leaf proves that nginx serves
        # the certificate the deploy installed, valid and for the name clients use.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return _LoopbackHTTPS(self.tls_name, self.port, timeout=timeout, context=context)


def http(method: str, endpoint: Endpoint, path: str, body: dict | None = None, timeout: float = 30.0,
         api_key: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn = endpoint.connection(timeout)
        try:
            conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()
    except (OSError, HTTPException) as e:
        return 0, str(e).encode()


def unit_state(unit: str) -> tuple[str, int]:
    """The unit's active state and how often systemd has restarted it."""
    out = subprocess.run(["systemctl", "show", "-p", "ActiveState", "-p", "NRestarts", unit],
                         capture_output=True, text=True)
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return props.get("ActiveState", "unknown"), int(props.get("NRestarts") or 0)


def journal(unit: str, since: str | None = None) -> str:
    """The unit's last lines, preceded by its distinct warning/error lines (the root cause of a
    failed start is often a warning printed long before the final traceback)."""
    args = ["journalctl", "-u", unit, "--no-pager", "-o", "cat"] + (["--since", since] if since else [])
    lines = subprocess.run(args, capture_output=True, text=True).stdout.splitlines()
    notable = []
    for line in lines:
        message = line.split("] ", 1)[-1]
        is_frame = message.startswith((" ", "File ", "^", "Traceback"))  # engine tracebacks are logged per line
        if (" WARNING " in line or " ERROR " in line) and not is_frame and line not in notable:
            notable.append(line)
    head = "\n".join(notable[:15])
    return f"{head}\n...\n" + "\n".join(lines[-JOURNAL_LINES:])


def wait(unit: str, instance: Endpoint, timeout: float, interval: float = 1.0) -> int:
    # The deploy started the unit just before this wait: its first lines are a few seconds older.
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 10))
    start = time.monotonic()
    last_note = start
    _, restarts_before = unit_state(unit)
    while True:
        status, _ = http("GET", instance, "/health", timeout=5)
        elapsed = time.monotonic() - start
        if status == 200:
            print(f"{unit}: healthy on port {instance.port} after {elapsed:.0f}s")
            return 0
        state, restarts = unit_state(unit)
        if state == "failed" or restarts > restarts_before:
            # A crash while loading repeats at every restart: report the first one, do not wait it out.
            print(f"{unit}: the instance exited while starting (unit {state}, restarted {restarts - restarts_before}"
                  f" time(s)). Journal:\n{journal(unit, since)}", file=sys.stderr)
            return 1
        if elapsed > timeout:
            print(f"{unit}: no healthy /health on port {instance.port} within {timeout:.0f}s (unit {state}). "
                  f"Journal:\n{journal(unit, since)}", file=sys.stderr)
            return 1
        if time.monotonic() - last_note >= 15:
            print(f"{unit}: still loading ({elapsed:.0f}s, unit {state})", flush=True)
            last_note = time.monotonic()
        time.sleep(interval)


def env_values(lines) -> dict[str, str]:
    """The variables of an instance environment file, read as systemd reads the KEY="value"
    lines roles/plan/engine.py writes (a backslash or double quote inside the quotes is escaped).
    The one reader of that file: the control node's facts import it too."""
    values = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(["\\])', r"\1", value[1:-1])
        values[key] = value
    return values


def read_api_key(env_dir: str, name: str) -> str | None:
    """The instance's API key, read from its environment file (never passed on a command line)."""
    try:
        with open(f"{env_dir}/{name}.env") as fh:
            return env_values(fh).get("VLLM_API_KEY")
    except OSError:
        return None


def check_instance(name: str, instance: Endpoint, api_key: str | None) -> list[dict]:
    results = []
    status, _ = http("GET", instance, "/health")
    results.append({"check": f"{name} /health", "ok": status == 200, "detail": f"HTTP {status}",
                    "unit": f"vllm@{name}"})
    status, body = http("GET", instance, "/v1/models", api_key=api_key)
    ok = status == 200 and bool(json.loads(body or b"{}").get("data")) if status == 200 else False
    results.append({"check": f"{name} /v1/models", "ok": ok, "detail": f"HTTP {status}", "unit": f"vllm@{name}"})
    return results


def check_lb(edge: Endpoint, model: str, api_key: str | None) -> list[dict]:
    results = []
    status, body = http("POST", edge, "/v1/completions",
                        {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}, api_key=api_key)
    text = json.loads(body)["choices"][0]["text"] if status == 200 else body[:200].decode(errors="replace")
    results.append({"check": "load balancer /v1/completions", "ok": status == 200,
                    "detail": f"HTTP {status}: {text!r}"})
    status, body = http("POST", edge, "/v1/chat/completions",
                        {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                         "max_tokens": 8, "stream": True}, api_key=api_key)
    chunks = [line for line in body.decode(errors="replace").splitlines() if line.startswith("data: ")]
    ok = status == 200 and len(chunks) >= 2 and chunks[-1] == "data: [DONE]"
    results.append({"check": "load balancer streamed /v1/chat/completions", "ok": ok,
                    "detail": f"HTTP {status}, {len(chunks)} SSE events"})
    return results


def completion(instance: Endpoint, model: str, api_key: str | None) -> dict:
    """One real generation on an instance: proves the engine serves, not only that it listens."""
    status, body = http("POST", instance, "/v1/completions",
                        {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}, api_key=api_key)
    return {"check": f"completion on port {instance.port}", "ok": status == 200, "detail": f"HTTP {status}"}


def read_key_file(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def run_checks(args: argparse.Namespace) -> list[dict]:
    results = []
    for spec in args.instance:
        name, port = spec.rsplit(":", 1)
        results += check_instance(name, Endpoint(int(port), args.address), read_api_key(args.env_dir, name))
    if args.lb_port:
        edge = Endpoint(args.lb_port, tls_name=args.lb_name, ca=args.lb_ca)
        results += check_lb(edge, args.model, read_key_file(args.lb_key_file))
    return results


def wait_healthy(instances: list[Endpoint], timeout: float) -> None:
    """Wait until every instance answers /health: instances this deploy did not start may still be
    loading (the host just booted, or systemd restarted one)."""
    deadline = time.monotonic() + timeout
    for instance in instances:
        while http("GET", instance, "/health", timeout=5)[0] != 200 and time.monotonic() < deadline:
            time.sleep(1)


def smoke(args: argparse.Namespace) -> int:
    wait_healthy([Endpoint(int(spec.rsplit(":", 1)[1]), args.address) for spec in args.instance], args.wait_healthy)
    # A reload hands connections to new nginx workers gradually: for a few seconds an old
    # worker may still answer with the previous configuration. Retry until the checks pass
    # or the settle time is over.
    deadline = time.monotonic() + args.settle
    while True:
        results = run_checks(args)
        failed = [r for r in results if not r["ok"]]
        if not failed or time.monotonic() > deadline:
            break
        time.sleep(1)
    if not args.report:
        print(json.dumps({"ok": not failed, "results": results}))
        return 0
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {r['detail']}", file=sys.stderr if not r["ok"] else sys.stdout)
    for unit in sorted({r["unit"] for r in failed if r.get("unit")}):
        print(f"--- last journal lines of {unit} ---\n{journal(unit)}", file=sys.stderr)
    return 1 if failed else 0


def _point(link: str, target: str) -> None:
    """Switch a symlink in one step (rename over it): never missing, even for an instant."""
    os.symlink(target, link + ".new")
    os.replace(link + ".new", link)


def restart_and_prove(unit: str, name: str, instance: Endpoint, model: str, env_dir: str,
                      timeout: float) -> str | None:
    """Restart ``unit`` and prove it serves; None when it does, else what failed."""
    subprocess.run(["systemctl", "restart", unit], check=True)
    if wait(unit, instance, timeout) != 0:
        return f"{unit} did not become healthy (see its journal above)"
    key = read_api_key(env_dir, name)
    failed = [r for r in check_instance(name, instance, key) + [completion(instance, model, key)] if not r["ok"]]
    if failed:
        print(f"{unit}: smoke request failed: {failed}\n{journal(unit)}", file=sys.stderr)
        return f"{unit} smoke request failed: " + "; ".join(f"{r['check']} {r['detail']}" for r in failed)
    return None


def restart_follower(unit: str, leader: Endpoint, timeout: float) -> str | None:
    """Restart a follower stage of a multi-host instance and prove it: the leader restarts in the
    same step, and its /health comes back only once every stage has joined it. None when it does."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 10))
    subprocess.run(["systemctl", "restart", unit], check=True)
    started = time.monotonic()
    seen_down = False
    while time.monotonic() - started < timeout:
        healthy = http("GET", leader, "/health", timeout=5)[0] == 200
        seen_down = seen_down or not healthy
        if healthy and (seen_down or time.monotonic() - started > LEADER_RESTART_S):
            print(f"{unit}: the leader {leader.address}:{leader.port} is healthy with this stage after "
                  f"{time.monotonic() - started:.0f}s")
            return None
        if unit_state(unit)[0] == "failed":
            print(f"{unit}: the stage failed while joining. Journal:\n{journal(unit, since)}", file=sys.stderr)
            return f"{unit} failed while joining its leader"
        time.sleep(1)
    print(f"{unit}: the leader {leader.address}:{leader.port} was not healthy within {timeout:.0f}s. "
          f"Journal:\n{journal(unit, since)}", file=sys.stderr)
    return f"its leader {leader.address}:{leader.port} did not become healthy with {unit}"


def switch(args: argparse.Namespace) -> int:
    """The environment file ``<name>.env.next`` and the release ``target`` become the instance's,
    it restarts and must serve; otherwise the previous environment and release come back."""
    unit, started = f"vllm@{args.name}", time.monotonic()
    env, staged, kept = (f"{args.env_dir}/{args.name}.env{suffix}" for suffix in ("", ".next", ".previous"))
    previous_target = os.readlink(args.link) if os.path.islink(args.link) else None
    os.replace(env, kept)
    os.replace(staged, env)
    _point(args.link, args.target)
    instance = Endpoint(args.port, args.address)

    def restart() -> str | None:
        if args.leader:
            address, port = args.leader.rsplit(":", 1)
            return restart_follower(unit, Endpoint(int(port), address.strip("[]")), args.timeout)
        return restart_and_prove(unit, args.name, instance, args.model, args.env_dir, args.timeout)

    failure = restart()
    if failure is None:
        os.remove(kept)
        outcome = {"outcome": "switched", "detail": f"{unit} serves from {args.target}"}
    else:
        print(f"{unit}: {failure}; putting back its previous release {previous_target}", file=sys.stderr, flush=True)
        os.replace(kept, env)
        _point(args.link, previous_target)
        back = restart()
        outcome = {"outcome": "reverted" if back is None else "broken",
                   "detail": failure if back is None else f"{failure}; and on its previous release: {back}"}
    outcome["seconds"] = round(time.monotonic() - started, 1)
    print("RESULT " + json.dumps(outcome), flush=True)
    return 0


def listen(args: argparse.Namespace) -> int:
    """Bind the rendezvous port now (its failure is the preflight's answer), then take up to
    ``peers`` connections in a child that outlives this command, for at most ``timeout`` seconds."""
    server = socket.socket(socket.AF_INET6 if ":" in args.address else socket.AF_INET)
    # As torch's TCPStore binds it: the connections of a leader stopped a moment ago (TIME_WAIT)
    # do not keep the port; a process listening on it does.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((args.address, args.port))
    except OSError as e:
        print(f"port {args.port} on {args.address} cannot be bound ({e.strerror}): another process holds the "
              f"group's master port (`ss -ltnp 'sport = :{args.port}'` shows which), or {args.address} is not "
              "an address of this host", file=sys.stderr)
        return 1
    server.listen(args.peers)
    if os.fork():
        print(f"listening on {args.address}:{args.port} for {args.peers} follower(s), {args.timeout:.0f}s at most")
        return 0
    os.setsid()  # the deploy's ssh session ends now: nothing of it may be held open
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    server.settimeout(args.timeout)
    try:
        for _ in range(args.peers):
            server.accept()[0].close()
    except OSError:
        pass
    os._exit(0)


def reach(args: argparse.Namespace) -> int:
    """Connect to the leader's rendezvous port, retrying until ``timeout``."""
    deadline, error = time.monotonic() + args.timeout, None
    while time.monotonic() < deadline:
        try:
            socket.create_connection((args.address, args.port), timeout=5).close()
            print(f"reached {args.address}:{args.port}")
            return 0
        except OSError as e:
            error = e
            time.sleep(1)
    print(f"cannot reach {args.address}:{args.port} within {args.timeout:.0f}s: {error}", file=sys.stderr)
    return 1


def _nginx_workers() -> dict[int, str]:
    """nginx worker processes by pid, with their title ("nginx: worker process[ is shutting down]")."""
    workers = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith("nginx: worker process"):
            workers[int(pid)] = title
    return workers


def _hex_endpoint(address: str, port: int) -> str:
    """An endpoint as /proc/net/tcp{,6} writes it: the address in 32-bit words of host (little
    endian) byte order, the port big-endian."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    packed = socket.inet_pton(family, address)
    words = (packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
    return "".join(word.hex().upper() for word in words) + f":{port:04X}"


def connections_to(upstreams: list[str]) -> int:
    """Established TCP connections from this host to any of ``upstreams`` (HOST:PORT, [IPv6]:PORT)."""
    wanted = set()
    for upstream in upstreams:
        name, port = upstream.rsplit(":", 1)
        # nginx resolved a host name once, at reload; so does this.
        for *_, sockaddr in socket.getaddrinfo(name.strip("[]"), int(port), proto=socket.IPPROTO_TCP):
            wanted.add(_hex_endpoint(sockaddr[0], int(port)))
    established = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = [line.split() for line in fh.readlines()[1:]]
        except OSError:  # no IPv6 in this kernel
            continue
        established += sum(1 for row in rows if row[2] in wanted and row[3] == "01")
    return established


def reload_and_drain(args: argparse.Namespace) -> int:
    """Reload nginx, then wait until the old workers took no new request (they are shutting down
    or gone) and no connection to the given upstreams is left: their requests are finished."""
    started = time.monotonic()
    old = set(_nginx_workers())
    subprocess.run(["systemctl", "reload", "nginx"], check=True)
    deadline = started + args.timeout
    while time.monotonic() < deadline:
        workers = _nginx_workers()
        accepting_old = [pid for pid in old if workers.get(pid) == "nginx: worker process"]
        remaining = connections_to(args.upstream)
        if not accepting_old and remaining == 0:
            print(f"drained {', '.join(args.upstream)} in {time.monotonic() - started:.1f}s")
            return 0
        time.sleep(0.2)
    print(f"{', '.join(args.upstream)}: {connections_to(args.upstream)} connection(s) still open after "
          f"{args.timeout:.0f}s; going on (nginx_drain_timeout)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--unit", required=True)
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--timeout", type=float, required=True)
    s = sub.add_parser("smoke")
    s.add_argument("--lb-name", help="the name the edge's certificate is checked against")
    s.add_argument("--lb-ca", help="CA file the edge's certificate is checked against; unset: the system's")
    s.add_argument("--lb-key-file", help="root-only file holding the client key the smoke test uses at the edge")
    s.add_argument("--instance", action="append", default=[], help="NAME:PORT of a local instance")
    s.add_argument("--lb-port", type=int)
    s.add_argument("--model")
    s.add_argument("--env-dir", required=True, help="where instance API keys are")
    s.add_argument("--settle", type=float, default=20, help="seconds to retry failing checks")
    s.add_argument("--wait-healthy", type=float, default=0, help="seconds to wait for loading instances first")
    s.add_argument("--report", action="store_true")
    sw = sub.add_parser("switch")
    sw.add_argument("--name", required=True, help="instance name: unit vllm@NAME, environment NAME.env")
    sw.add_argument("--port", type=int, required=True)
    sw.add_argument("--model", required=True, help="served model name for the smoke completion")
    sw.add_argument("--link", required=True, help="the instance's release link")
    sw.add_argument("--target", required=True, help="release venv the link points to after the switch")
    sw.add_argument("--timeout", type=float, required=True)
    sw.add_argument("--env-dir", required=True, help="where the instance environment files are")
    sw.add_argument("--leader", help="ADDRESS:PORT of the leader: this is a follower stage, proved by its /health")
    for instance_parser in (w, s, sw):
        instance_parser.add_argument("--address", default="127.0.0.1", help="where this host's instances listen")
    d = sub.add_parser("reload-and-drain")
    d.add_argument("--upstream", action="append", required=True, help="ADDRESS:PORT taken out of nginx")
    d.add_argument("--timeout", type=float, required=True)
    li = sub.add_parser("listen")
    li.add_argument("--peers", type=int, required=True, help="connections to take before going")
    re_ = sub.add_parser("reach")
    for rendezvous in (li, re_):
        rendezvous.add_argument("--address", required=True)
        rendezvous.add_argument("--port", type=int, required=True)
        rendezvous.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command in ("listen", "reach"):
        return listen(args) if args.command == "listen" else reach(args)
    if args.command == "wait":
        return wait(args.unit, Endpoint(args.port, args.address), args.timeout)
    if args.command == "switch":
        return switch(args)
    if args.command == "reload-and-drain":
        return reload_and_drain(args)
    return smoke(args)


if __name__ == "__main__":
    sys.exit(main())
