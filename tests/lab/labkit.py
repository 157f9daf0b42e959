"""What the lab tests share: running the lab deploy, ssh to lab hosts, and a bounded load
through the load balancer. Traffic goes only to the lab's own hosts, in network namespaces the
lab created; every load loop is bounded in request count and in time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import requests

from roles.cli import LabEdge, openai_client
from roles.common import ArtifactFile
from roles.lab.config import load_state
from roles.lab.hosts import ssh_command
from roles.release.lock import Lock, lock_path, read_lock
from roles.release.manifest import RELEASES_DIR, load_release
from roles.release.wheelhouse import wheel_files

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")
MODEL = REPO / ".cache" / "models" / "tiny-llama"
DEPLOY_TIMEOUT = 1800
# Where a lab host keeps the wheels its releases were built from, and where the cache (lab1) serves them.
WHEEL_STORE = "/opt/vllm-fleet/wheels"
CACHE_WHEELS = "/var/lib/vllm-fleet/cache/wheels"
# Where a lab host keeps its staged models, and where the cache serves them.
MODELS_DIR = "/var/lib/vllm-fleet/models"
CACHE_MODELS = "/var/lib/vllm-fleet/cache/models"


def bring_up_lab() -> dict:
    subprocess.run([sys.executable, "-m", "roles.cli", "lab", "up", "--hosts", "2"], cwd=REPO, check=True)
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-m", "roles.cli", "lab", "model", str(MODEL)], cwd=REPO, check=True)
    return load_state()


def deployed_lab() -> dict:
    """The lab, up, with the lab inventory's fleet deployed on it (whatever an earlier test left)."""
    state = bring_up_lab()
    deployed = run_deploy()
    assert deployed.returncode == 0, deployed.output[-5000:]
    return state


def release_lock(release: str) -> Lock:
    return read_lock(lock_path(load_release(release, REPO / RELEASES_DIR), REPO / RELEASES_DIR))


def release_venv(release: str) -> str:
    """Where a lab host keeps ``release``'s venv."""
    return f"/opt/vllm-fleet/venvs/{release_lock(release).digest[:16]}"


def release_new_to_the_fleet(lab: dict, new: str, old: str) -> list[ArtifactFile]:
    """``new`` as on the day it ships, whatever an earlier run left: its venv gone from every host, and
    the wheels it adds to ``old`` gone from the hosts' stores and from the cache. Returns those wheels."""
    in_old = {f.path for f in wheel_files(release_lock(old))}
    added = [f for f in wheel_files(release_lock(new)) if f.path not in in_old]
    for host in lab["hosts"]:
        ssh(host["name"], f"rm -rf {release_venv(new)} && rm -f {' '.join(f'{WHEEL_STORE}/{w.path}' for w in added)}")
    ssh(lab["hosts"][0]["name"], f"rm -f {' '.join(f'{CACHE_WHEELS}/{w.path}' for w in added)}")
    return added


def key_leaks(host: str, keys: list[str], journal: bool = False) -> list[str]:
    """Where any of ``keys`` shows on a lab host outside root-only files: its process table, files
    others may read or that root does not own (found with the keys on grep's stdin, never its
    command line) and, with ``journal``, its journal."""
    found = []
    processes = ssh(host, "ps -eo args")
    found += [f"{host}: ps" for key in keys if key in processes]
    given = "\n".join(keys) + "\n"
    holders = ssh(host, "grep -rlsF -f /dev/stdin /etc /var /run /tmp /root /home /usr/local /srv "
                        "/opt/vllm-fleet/instances; true", stdin=given).split()
    modes = ssh(host, "stat -c '%a %U %n' " + " ".join(holders)) if holders else ""
    for mode, owner, path in (line.split(" ", 2) for line in modes.splitlines()):
        if int(mode, 8) & 0o077 or owner != "root":
            found.append(f"{host}: {path} ({mode} {owner})")
    if journal and ssh(host, "journalctl -q --no-pager | grep -cF -f /dev/stdin; true", stdin=given) not in ("", "0"):
        found.append(f"{host}: journal")
    print(f"\n{host}: keys only in root-only files: {', '.join(holders)}")
    return found


class Result(NamedTuple):
    """One request of a Load: when it ended, whether it succeeded, what happened, when it started
    and the model that answered (the fleet's, or the fallback provider's)."""

    end: float
    ok: bool
    detail: str
    start: float
    model: str


@dataclass
class Deploy:
    returncode: int
    output: str
    seconds: float

    def totals(self) -> dict[str, int]:
        """pyinfra's 'Grand total' row: hosts, changed ('Success'), errors, unchanged."""
        match = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", self.output)
        assert match, self.output[-3000:]
        values = [0 if v == "-" else int(v) for v in match.groups()]
        return dict(zip(("operations", "changed", "errors", "unchanged"), values))


def run_deploy(*pyinfra_args: str, inventory: str = "inventories/lab.py") -> Deploy:
    """`pyinfra -y inventories/lab.py deploys/vllm.py` with extra arguments (e.g. --data), or
    another inventory of the lab."""
    start = time.monotonic()
    proc = subprocess.run([str(PYINFRA), "-y", *pyinfra_args, inventory, "deploys/vllm.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    result = Deploy(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)
    print(f"\ndeploy: rc={result.returncode} in {result.seconds:.1f}s")
    return result


def ssh(host: str, command: str, check: bool = True, stdin: str | None = None) -> str:
    """Run ``command`` on a lab host; ``stdin`` carries what must stay off command lines (keys)."""
    proc = subprocess.run(ssh_command(host) + [command], capture_output=True, text=True, timeout=300, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{host}: {command}: {proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


def vllm_journal(host: str, since: float, lines: int = 60) -> str:
    """The last ``lines`` of the host's vLLM units' journal since ``since`` (time.time()): what a
    failing load test prints, so that an instance that died under it says why."""
    return ssh(host, f"journalctl -q --no-pager -o short-precise -u 'vllm@*' --since @{int(since)} "
                     f"| tail -n {lines}", check=False)


@dataclass
class Load:
    """A bounded load through the load balancer, over TLS with a client key (the lab client's
    unless ``api_key`` is given): alternately streamed chat and plain completions, each opening
    with one of ``conversations`` texts, so that the `prefix` policy spreads them too."""

    edge: LabEdge
    api_key: str | None = None
    # A steady stream, not a flood: two clients with a pause between requests leave the two
    # cores room for the killed instance to restart.
    workers: int = 2
    pause: float = 0.1
    max_requests: int = 5000
    max_seconds: float = 300
    conversations: int = 12
    # The longest answer asked for; a long one is still in flight when something happens to its host.
    max_tokens: int = 16
    # Through the OpenAI SDK, as a user's application sends them, instead of plain HTTP.
    sdk: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, session: requests.Session, n: int) -> tuple[bool, str, str]:
        """One request: whether it succeeded, what happened, and the model that answered."""
        base_url, model = self.edge.base_url, self.edge.model
        opening = f"Conversation {n % self.conversations}: hello"
        try:
            if n % 2:
                r = session.post(f"{base_url}/completions", timeout=60,
                                 json={"model": model, "prompt": opening, "max_tokens": self.max_tokens})
                ok = r.status_code == 200 and bool(r.json()["choices"])
                return ok, f"completion HTTP {r.status_code}", r.json().get("model", "") if ok else ""
            with session.post(f"{base_url}/chat/completions", timeout=60, stream=True,
                              json={"model": model, "stream": True, "max_tokens": self.max_tokens,
                                    "messages": [{"role": "user", "content": opening}]}) as r:
                events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
                ok = r.status_code == 200 and events[-1:] == [b"data: [DONE]"]
                answered = json.loads(events[0].removeprefix(b"data: ")).get("model", "") if ok else ""
                return ok, f"stream HTTP {r.status_code}, {len(events)} events", answered
        except requests.RequestException as e:
            return False, f"{type(e).__name__}: {e}", ""

    def one_sdk(self, client, n: int) -> tuple[bool, str, str]:
        """``one`` through the OpenAI SDK."""
        import openai

        opening = f"Conversation {n % self.conversations}: hello"
        try:
            if n % 2:
                done = client.completions.create(model=self.edge.model, prompt=opening, max_tokens=self.max_tokens)
                return bool(done.choices), "sdk completion", done.model
            chunks = list(client.chat.completions.create(
                model=self.edge.model, messages=[{"role": "user", "content": opening}], max_tokens=self.max_tokens,
                stream=True))
            return bool(chunks), f"sdk stream, {len(chunks)} chunks", chunks[0].model if chunks else ""
        except openai.OpenAIError as e:
            return False, f"{type(e).__name__}: {e}", ""

    def worker(self, first: int, deadline: float) -> None:
        n = first
        # One per thread: sessions are not thread-safe.
        session = openai_client(self.edge, self.api_key) if self.sdk else self.edge.session(self.api_key)
        one = self.one_sdk if self.sdk else self.one
        while not self.stop.is_set() and time.monotonic() < deadline:
            with self.lock:
                if len(self.results) >= self.max_requests:
                    return
            start = time.monotonic()
            ok, detail, model = one(session, n)
            with self.lock:
                self.results.append(Result(time.monotonic(), ok, detail, start, model))
            n += 1
            self.stop.wait(self.pause)

    def __enter__(self):
        deadline = time.monotonic() + self.max_seconds
        self.threads = [threading.Thread(target=self.worker, args=(i, deadline)) for i in range(self.workers)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
