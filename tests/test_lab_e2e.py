"""End to end on the local lab: a real deploy of real vLLM (CPU) and nginx to systemd-nspawn hosts.

Traffic goes only to the lab's own hosts, in network namespaces the lab created. Every load
loop is bounded in request count and in time.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from roles import cli
from roles.lab import load_state, ssh_command

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
PYINFRA = Path(sys.executable).with_name("pyinfra")
MODEL = REPO / ".cache" / "models" / "tiny-llama"
DEPLOY_TIMEOUT = 1800


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


def run_deploy() -> Deploy:
    start = time.monotonic()
    proc = subprocess.run([str(PYINFRA), "-y", "inventories/lab.py", "deploys/vllm.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    result = Deploy(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)
    print(f"\ndeploy: rc={result.returncode} in {result.seconds:.1f}s")
    return result


def ssh(host: str, command: str, check: bool = True) -> str:
    proc = subprocess.run(ssh_command(host) + [command], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{host}: {command}: {proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def lab():
    subprocess.run([sys.executable, "-m", "roles.lab", "up", "--hosts", "2"], cwd=REPO, check=True)
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-m", "roles.tiny_model", str(MODEL)], cwd=REPO, check=True)
    return load_state()


@pytest.fixture(scope="module")
def first_deploy(lab) -> Deploy:
    return run_deploy()


@pytest.fixture(scope="module")
def endpoint(first_deploy) -> tuple[str, str]:
    assert first_deploy.returncode == 0, first_deploy.output[-5000:]
    return cli.lab_endpoint()


def test_deploy_passes_its_smoke_test(first_deploy, lab):
    assert first_deploy.returncode == 0, first_deploy.output[-5000:]
    assert first_deploy.totals()["errors"] == 0
    for host in lab["hosts"]:
        assert re.search(rf"\[{host['name']}\].*smoke test passed", first_deploy.output), first_deploy.output[-3000:]
    assert "load balancer streamed /v1/chat/completions" in first_deploy.output


def test_three_instances_on_two_hosts_behind_nginx(endpoint, lab):
    first, second = (h["name"] for h in lab["hosts"][:2])
    assert ssh(first, "systemctl is-active vllm@a vllm@b nginx").split() == ["active"] * 3
    assert ssh(second, "systemctl is-active vllm@a") == "active"
    # Each instance has its own cores (two cores, two instances on lab1).
    binds = ssh(first, "grep -h CPU_OMP /etc/vllm-fleet/instances/a.env /etc/vllm-fleet/instances/b.env")
    assert binds.splitlines() == ['VLLM_CPU_OMP_THREADS_BIND="0"', 'VLLM_CPU_OMP_THREADS_BIND="1"']
    assert ssh(second, "grep -h CPU_OMP /etc/vllm-fleet/instances/a.env") == 'VLLM_CPU_OMP_THREADS_BIND="1"'
    upstream = ssh(first, "grep -c '^    server ' /etc/nginx/conf.d/vllm-fleet.conf")
    assert upstream == "3"


def test_second_run_reports_no_changes(endpoint):
    again = run_deploy()
    assert again.returncode == 0, again.output[-5000:]
    totals = again.totals()
    print(f"second run: {totals['unchanged']} operations unchanged, {totals['changed']} changed, "
          f"{again.seconds:.1f}s")
    assert totals["changed"] == 0 and totals["errors"] == 0, again.output[-5000:]


def test_openai_sdk_streams_through_the_load_balancer(endpoint):
    base_url, model = endpoint
    chunks, seconds, text = cli.stream_chat(base_url, model)
    print(f"openai stream: {chunks} chunks in {seconds:.2f}s")
    assert chunks > 2 and text


# ---- kill -9 under load ----------------------------------------------------------------------------

@dataclass
class Load:
    """A bounded load through the load balancer: alternately streamed chat and plain completions."""

    base_url: str
    model: str
    # A steady stream, not a flood: two clients with a pause between requests leave the two
    # cores room for the killed instance to restart.
    workers: int = 2
    pause: float = 0.1
    max_requests: int = 5000
    max_seconds: float = 300
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, bool, str]] = field(default_factory=list)  # (end time, ok, detail)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, n: int) -> tuple[bool, str]:
        try:
            if n % 2:
                r = requests.post(f"{self.base_url}/completions", timeout=60,
                                  json={"model": self.model, "prompt": "Hello", "max_tokens": 16})
                return r.status_code == 200 and bool(r.json()["choices"]), f"completion HTTP {r.status_code}"
            with requests.post(f"{self.base_url}/chat/completions", timeout=60, stream=True,
                               json={"model": self.model, "stream": True, "max_tokens": 16,
                                     "messages": [{"role": "user", "content": "Hi"}]}) as r:
                events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
                ok = r.status_code == 200 and events[-1:] == [b"data: [DONE]"]
                return ok, f"stream HTTP {r.status_code}, {len(events)} events"
        except requests.RequestException as e:
            return False, f"{type(e).__name__}: {e}"

    def worker(self, first: int, deadline: float) -> None:
        n = first
        while not self.stop.is_set() and time.monotonic() < deadline:
            with self.lock:
                if len(self.results) >= self.max_requests:
                    return
            ok, detail = self.one(n)
            with self.lock:
                self.results.append((time.monotonic(), ok, detail))
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


def test_kill_9_under_load_recovers(endpoint, lab):
    base_url, model = endpoint
    target = lab["hosts"][0]["name"]
    unit = "vllm@a"
    before = ssh(target, f"systemctl show -p MainPID -p NRestarts --value {unit}").split()
    with Load(base_url, model) as load:
        time.sleep(5)
        killed_at = time.monotonic()
        ssh(target, f"kill -9 {before[0]}")
        # systemd restarts the unit after RestartSec; then the probe waits for /health.
        restarted = f"test $(systemctl show -p NRestarts --value {unit}) -gt {before[1]}"
        ssh(target, f"for i in $(seq 100); do {restarted} && break; sleep 0.2; done; {restarted}")
        ssh(target, f"python3 /usr/local/lib/vllm-fleet/fleet_probe.py wait --unit {unit} --port 8001 --timeout 280")
        healthy_at = time.monotonic()
        time.sleep(5)
    after = ssh(target, f"systemctl show -p MainPID -p NRestarts --value {unit}").split()
    total = len(load.results)
    failed = [r for r in load.results if not r[1]]
    after_recovery = [r for r in failed if r[0] > healthy_at]
    print(f"\nkill -9 of {unit} on {target} (pid {before[0]}): back healthy in {healthy_at - killed_at:.1f}s "
          f"as pid {after[0]} (restarts {before[1]} -> {after[1]}); {total} requests through nginx, "
          f"{len(failed)} failed: {sorted({r[2] for r in failed})}")
    assert after[0] != before[0] and int(after[1]) == int(before[1]) + 1
    # systemd stopped the killed instance's engine processes too (nothing orphaned).
    engines = ssh(target, "ps -eo ppid=,comm= | awk '$2 ~ /VLLM::EngineCor/ && $1 == 1' | wc -l")
    assert engines == "0"
    assert total > 20
    # Only requests already in flight on the killed instance can fail; nginx sends new ones elsewhere.
    assert len(failed) <= load.workers
    assert after_recovery == []


def test_lab_host_declared_nvidia_is_stopped_unchanged(endpoint, lab, tmp_path):
    """lab2 has no NVIDIA GPU: declared `accelerator: nvidia`, the deploy must stop it with "no
    NVIDIA GPU found" and change nothing there, while lab1 is deployed as usual."""
    first, second = lab["hosts"][0], lab["hosts"][1]
    snapshot = ("ls -la --time-style=full-iso /etc/apt/sources.list.d /etc/apt/preferences.d "
                "/etc/vllm-fleet/instances /opt/vllm-fleet; dpkg -l | md5sum; systemctl is-active vllm@a")
    before = ssh(second["name"], snapshot, check=False)
    inventory = tmp_path / "gpu_lab.py"
    inventory.write_text(
        "import runpy\n"
        f"lab = runpy.run_path({str(REPO / 'inventories' / 'lab.py')!r})\n"
        "hosts = dict(lab['vllm'])\n"
        f"gpu = {{**hosts[{second['name']!r}], 'vllm_release': 'nvidia-vllm-0.32.0', 'vllm_accelerator': 'nvidia',\n"
        "       'vllm_gpu_type': 'h200', 'vllm_gpu_count': 1, 'nvidia_repo_url': 'https://cuda-mirror.example/repos'}\n"
        f"vllm = [({first['name']!r}, hosts[{first['name']!r}]), ({second['name']!r}, gpu)]\n"
        "lb = lab['lb']\n")
    proc = subprocess.run([str(PYINFRA), "-y", str(inventory), "deploys/vllm.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert f"{second['name']}: no NVIDIA GPU found" in output, output[-4000:]
    assert ssh(second["name"], snapshot, check=False) == before
    assert re.search(rf"\[{first['name']}\].*smoke test passed", output), output[-4000:]
