"""End to end on the local lab: a real deploy of real vLLM (CPU) and nginx to systemd-nspawn hosts.

Traffic goes only to the lab's own hosts, in network namespaces the lab created. Every load
loop is bounded in request count and in time.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from roles import cli
from tests.lab.labkit import DEPLOY_TIMEOUT, PYINFRA, REPO, Deploy, Load, bring_up_lab, run_deploy, ssh

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab():
    return bring_up_lab()


@pytest.fixture(scope="module")
def first_deploy(lab) -> Deploy:
    """The deploy of this test run: the first on fresh lab hosts, or a deploy onto whatever an
    earlier run left (hosts just booted, instances still loading, another release)."""
    return run_deploy()


@pytest.fixture(scope="module")
def endpoint(first_deploy) -> cli.LabEdge:
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
    # Each upstream block (least_conn, and the lab's prefix-hashed one) lists the three instances.
    servers = ssh(first, "awk '/^upstream /{name=$2} /^    server /{print name, $2}' "
                         "/etc/nginx/conf.d/vllm-fleet.conf")
    blocks: dict[str, list[str]] = {}
    for name, server in (line.split() for line in servers.splitlines()):
        blocks.setdefault(name, []).append(server)
    assert sorted(blocks) == ["vllm_fleet", "vllm_fleet_prefix"], servers
    assert all(sorted(s) == sorted(blocks["vllm_fleet"]) and len(set(s)) == 3 for s in blocks.values()), servers


def test_second_run_reports_no_changes(endpoint):
    again = run_deploy()
    assert again.returncode == 0, again.output[-5000:]
    totals = again.totals()
    print(f"second run: {totals['unchanged']} operations unchanged, {totals['changed']} changed, "
          f"{again.seconds:.1f}s")
    assert totals["changed"] == 0 and totals["errors"] == 0, again.output[-5000:]


def test_openai_sdk_streams_through_the_load_balancer(endpoint):
    chunks, seconds, text = cli.stream_chat(endpoint)
    print(f"openai stream: {chunks} chunks in {seconds:.2f}s")
    assert chunks > 2 and text


# ---- kill -9 under load ----------------------------------------------------------------------------

def test_kill_9_under_load_recovers(endpoint, lab):
    target, address = lab["hosts"][0]["name"], lab["hosts"][0]["address"]
    unit = "vllm@a"
    before = ssh(target, f"systemctl show -p MainPID -p NRestarts --value {unit}").split()
    with Load(endpoint) as load:
        time.sleep(5)
        killed_at = time.monotonic()
        ssh(target, f"kill -9 {before[0]}")
        # systemd restarts the unit after RestartSec; then the probe waits for /health.
        restarted = f"test $(systemctl show -p NRestarts --value {unit}) -gt {before[1]}"
        ssh(target, f"for i in $(seq 100); do {restarted} && break; sleep 0.2; done; {restarted}")
        ssh(target, f"python3 /usr/local/lib/vllm-fleet/fleet_probe.py wait --unit {unit} --address {address} "
                    "--port 8001 --timeout 280")
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
