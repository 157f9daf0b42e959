"""One vLLM instance over two lab hosts (inventories/lab_group.py): the lab's tiny model,
pipeline-parallel 2 over lab1 and lab2 (CPU, gloo over the lab bridge), deployed by the toolkit
and served behind lab1's nginx:

- the deploy starts the follower first and the leader waits for it; its smoke test passes, and a
  second run changes nothing;
- a streamed chat through the edge (OpenAI SDK);
- the group's ports answer its own hosts only: lab2 reaches lab1's master port, the control node
  (which stands for "outside") does not;
- start time and tokens/s against the same model on one host (lab1:a of inventories/lab.py),
  measured side by side in this run with `vllm bench serve`;
- kill -9 of the follower: systemd restarts it, the leader's watchdog restarts the leader, and
  the instance answers again;
- a changed setting restarts both stages in one slot of the rolling update;
- the lab's own inventory deployed back: the group's units and watchdogs are gone.

Bounded: every load has a request count and a time limit; traffic goes only to the lab's hosts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import requests

from roles import cli, secrets
from roles.rollout import REPORT_PATH
from tests.lab.labkit import REPO, deployed_lab, run_deploy, ssh

pytestmark = pytest.mark.lab

GROUP_INVENTORY = "inventories/lab_group.py"
GROUP, PORT, MASTER_PORT = "pp", 8003, 29500
# vllm bench serve: the same workload for both layouts, one point of 48 streamed requests.
BENCH_ARGS = ("--concurrency", "4", "--num-prompts", "48", "--input-len", "128", "--output-len", "64",
              "--seed", "7", "--target", "direct")
RECOVERY_S = 300
HEALTHY = re.compile(r"vllm@(\w+): healthy on port (\d+) after (\d+)s")


@pytest.fixture(scope="module")
def lab():
    return deployed_lab()


@pytest.fixture(scope="module")
def one_host(lab, tmp_path_factory) -> dict:
    """The baseline: lab1:a of the lab's own inventory (one host), before the group replaces it."""
    return bench("inventories/lab.py", "lab1:a", tmp_path_factory.mktemp("one-host"))


@pytest.fixture(scope="module")
def group(one_host):
    deployed = run_deploy(inventory=GROUP_INVENTORY)
    assert deployed.returncode == 0, deployed.output[-6000:]
    return deployed


def bench(inventory: str, instance: str, out) -> dict:
    done = subprocess.run([sys.executable, "-m", "roles.cli", "bench", inventory, "--direct", instance, *BENCH_ARGS,
                           "--label", instance, "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (point,) = json.loads(next(out.glob("*.json")).read_text())["points"]
    return point["result"]


def internal_key() -> str:
    return secrets.fleet_key(cli.lab_secrets(), "internal").reveal()


def completion(address: str, timeout: float) -> bool:
    try:
        answer = requests.post(f"http://{address}:{PORT}/v1/completions", timeout=timeout,
                               headers={"Authorization": f"Bearer {internal_key()}"},
                               json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4})
        return answer.status_code == 200
    except requests.RequestException:
        return False


def test_the_deploy_starts_the_follower_first_and_its_smoke_test_passes(lab, group):
    output = group.output
    follower_started = output.index("a follower stage: its leader waits for it")
    assert follower_started < output.index(f"Start vllm@{GROUP} if new (waits for /health")
    healthy = [m for m in HEALTHY.finditer(output) if m.group(1) == GROUP]
    assert healthy and int(healthy[0].group(2)) == PORT
    print(f"\ngroup: the leader was healthy {healthy[0].group(3)}s after its start (follower started first)")
    leader, follower = (h["name"] for h in lab["hosts"][:2])
    for name in (leader, follower):
        assert ssh(name, f"systemctl is-active vllm@{GROUP} vllm-group-watch") == "active\nactive"
        assert ssh(name, "ls /etc/vllm-fleet/instances") == f"{GROUP}.env"  # the single-host instances retired
    assert "VLLM_API_KEY" not in ssh(follower, f"cat /etc/vllm-fleet/instances/{GROUP}.env")  # no API, no key
    assert "--headless" in ssh(follower, f"cat /etc/vllm-fleet/instances/{GROUP}.env")
    again = run_deploy(inventory=GROUP_INVENTORY)
    totals = again.totals()
    print(f"second run: {totals['unchanged']} operations unchanged, {totals['changed']} changed")
    assert again.returncode == 0 and totals["changed"] == 0 and totals["errors"] == 0, again.output[-5000:]


def test_a_streamed_chat_through_the_edge(lab, group):
    chunks, seconds, text = cli.stream_chat(cli.lab_endpoint())
    print(f"\nopenai stream through the edge to the group: {chunks} chunks in {seconds:.2f}s")
    assert chunks > 2 and text
    conf = ssh(lab["hosts"][0]["name"], "cat /etc/nginx/conf.d/vllm-fleet.conf")
    upstream_servers = set(re.findall(r"server (\S+):(\d+)", conf))
    assert upstream_servers == {(lab["hosts"][0]["address"], str(PORT))}  # the leader only


def test_the_group_ports_answer_its_own_hosts_only(lab, group):
    leader, follower = lab["hosts"][:2]
    assert ssh(follower["name"], f"python3 -c \"import socket; socket.create_connection(('{leader['address']}', "
                                 f"{MASTER_PORT}), 5).close(); print('reached')\"") == "reached"
    try:
        subprocess.run(["python3", "-c", f"import socket; socket.create_connection(('{leader['address']}', "
                                         f"{MASTER_PORT}), 5)"], check=True, capture_output=True, timeout=20)
        reached = True
    except subprocess.CalledProcessError:
        reached = False
    assert not reached, "the control node reached the group's master port"


def test_tokens_per_second_against_one_host(lab, group, one_host, tmp_path):
    spanning = bench(GROUP_INVENTORY, f"{lab['hosts'][0]['name']}:{GROUP}", tmp_path)
    assert spanning["completed"] == one_host["completed"] == 48
    print(f"\n2-core lab, 48 streamed requests of 128+64 tokens at concurrency 4, straight to the instance: one host "
          f"{one_host['output_throughput']:.0f} tok/s, TTFT p50 {one_host['median_ttft_ms']:.0f} ms; pipeline-parallel "
          f"2 over lab1+lab2 {spanning['output_throughput']:.0f} tok/s, TTFT p50 {spanning['median_ttft_ms']:.0f} ms "
          f"({spanning['output_throughput'] / one_host['output_throughput']:.2f}x)")


def test_kill_9_of_the_follower_is_recovered(lab, group):
    leader, follower = lab["hosts"][:2]
    assert completion(leader["address"], 30)
    restarts = int(ssh(follower["name"], f"systemctl show -P NRestarts vllm@{GROUP}"))
    pid = ssh(follower["name"], f"systemctl show -P MainPID vllm@{GROUP}")
    killed = time.monotonic()
    ssh(follower["name"], f"kill -9 {pid}")
    # Until systemd has restarted it, the stage's worker may still answer for a moment.
    while int(ssh(follower["name"], f"systemctl show -P NRestarts vllm@{GROUP}")) == restarts:
        assert time.monotonic() - killed < 30, "systemd did not restart the killed follower"
        time.sleep(1)
    while not completion(leader["address"], 10):
        assert time.monotonic() - killed < RECOVERY_S, ssh(leader["name"], "journalctl -u vllm-group-watch -n 20")
        time.sleep(2)
    recovered = time.monotonic() - killed
    watch = ssh(leader["name"], "journalctl -q -u vllm-group-watch --no-pager -o cat")
    print(f"\nkill -9 of the follower: the instance answered again {recovered:.0f}s later; leader's watchdog:\n"
          + "\n".join(watch.splitlines()[-4:]))


def test_a_changed_setting_moves_the_group_as_one_slot(lab, group):
    changed = run_deploy("--data", "vllm_max_num_seqs=8", inventory=GROUP_INVENTORY)
    assert changed.returncode == 0, changed.output[-6000:]
    assert "Rolling update slot 1/1: switch" in changed.output and "slot 2/" not in changed.output
    report = json.loads((REPO / REPORT_PATH).read_text())
    switched = {i["instance"]: (i.get("outcome"), i.get("seconds")) for i in report["instances"]}
    print(f"\nthe group's rolling update, one slot: {switched}")
    assert {name: outcome for name, (outcome, _) in switched.items()} == {"lab1:pp": "switched", "lab2:pp": "switched"}
    assert completion(lab["hosts"][0]["address"], 30)


def test_the_labs_own_inventory_comes_back_without_the_group(lab, group):
    back = run_deploy()
    assert back.returncode == 0, back.output[-6000:]
    for h in lab["hosts"][:2]:
        assert ssh(h["name"], "test -e /etc/systemd/system/vllm-group-watch.service && echo left || true") == ""
        assert ssh(h["name"], f"test -e /etc/vllm-fleet/instances/{GROUP}.env && echo left || true") == ""
    one = [m.group(3) for m in HEALTHY.finditer(back.output) if m.group(1) == "a" and m.group(2) == "8001"]
    print(f"\none host: vllm@a healthy {', '.join(one)}s after its start (each host's instance a)")
