"""Releases side by side and rolling updates on the real lab, under a bounded load through nginx.

The lab inventory pins release A (cpu-vllm-0.32.0); `--data vllm_release=B` is the upgrade to
cpu-vllm-0.32.0-tf5.18 (another lock: the previous transformers), and the plain deploy is the
rollback (the inventory pins A again). Traffic goes only to the lab's own hosts.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from roles import cli
from roles.lab.config import APT_PROXY_LOG, BRIDGE, veth_name
from tests.lab.labkit import REPO, Load, bring_up_lab, release_new_to_the_fleet, release_venv, run_deploy, ssh

pytestmark = pytest.mark.lab

RELEASE_A = "cpu-vllm-0.32.0"
RELEASE_B = "cpu-vllm-0.32.0-tf5.18"
REPORT = REPO / ".cache" / "rollout-report.json"
INSTANCES = [("lab1", "a"), ("lab1", "b"), ("lab2", "a")]


@pytest.fixture(scope="module")
def lab():
    return bring_up_lab()


@pytest.fixture(scope="module")
def on_release_a(lab):
    """The lab fleet on release A, whatever an earlier run left on the hosts."""
    deploy = run_deploy()
    assert deploy.returncode == 0, deploy.output[-5000:]
    return lab


def bytes_sent() -> int:
    """What this machine (the control node) has sent into the lab network: its bridge's transmits."""
    return int(Path(f"/sys/class/net/{BRIDGE}/statistics/tx_bytes").read_text())


def bytes_received(lab) -> dict[str, int]:
    """What each lab host has received over its network link (its bridge-side veth's transmits)."""
    return {h["name"]: int(Path(f"/sys/class/net/{veth_name(h['name'])}/statistics/tx_bytes").read_text())
            for h in lab["hosts"]}


def apt_proxy_fetches() -> int:
    """Lines in the lab apt proxy's transfer log: one per package file a host fetched."""
    return len(APT_PROXY_LOG.read_text().splitlines()) if APT_PROXY_LOG.exists() else 0


def main_pids() -> dict[tuple[str, str], str]:
    return {(h, i): ssh(h, f"systemctl show -p MainPID --value vllm@{i}") for h, i in INSTANCES}


def instance_venvs() -> dict[tuple[str, str], str]:
    return {(h, i): ssh(h, f"readlink /opt/vllm-fleet/instances/{i}") for h, i in INSTANCES}


def deploy_under_load(*pyinfra_args: str):
    """A deploy while two clients send streamed and plain requests through nginx (bounded). Two
    seconds between requests: the lab's two cores also install the release and start instances,
    and each vLLM-CPU worker busy-polls for a second after every request, starving the rest."""
    with Load(cli.lab_endpoint(), pause=2.0, max_requests=5000, max_seconds=1500) as load:
        time.sleep(2)
        deploy = run_deploy(*pyinfra_args)
        time.sleep(2)
    failed = [r for r in load.results if not r[1]]
    return deploy, len(load.results), failed


def report() -> dict:
    return json.loads(REPORT.read_text())


def test_upgrade_moves_only_what_changed_loses_no_request_and_the_rollback_downloads_nothing(on_release_a):
    lab = on_release_a
    added = release_new_to_the_fleet(lab, RELEASE_B, RELEASE_A)

    received, fetches, sent = bytes_received(lab), apt_proxy_fetches(), bytes_sent()
    up, up_requests, up_failed = deploy_under_load("--data", f"vllm_release={RELEASE_B}")
    after_up = report()
    received_up = {h: n - received[h] for h, n in bytes_received(lab).items()}
    sent_up = bytes_sent() - sent
    fetches_up = apt_proxy_fetches() - fetches
    assert up.returncode == 0, up.output[-5000:]
    assert instance_venvs() == {key: release_venv(RELEASE_B) for key in INSTANCES}

    received, fetches = bytes_received(lab), apt_proxy_fetches()
    back, back_requests, back_failed = deploy_under_load()
    after_back = report()
    received_back = {h: n - received[h] for h, n in bytes_received(lab).items()}
    fetches_back = apt_proxy_fetches() - fetches
    assert back.returncode == 0, back.output[-5000:]
    assert instance_venvs() == {key: release_venv(RELEASE_A) for key in INSTANCES}

    print(f"\nupgrade {RELEASE_A} -> {RELEASE_B} (adds {', '.join(w.path for w in added)}): {up.seconds:.1f}s, "
          f"{up_requests} requests through nginx, {len(up_failed)} failed; the control node sent "
          f"{sent_up / 1e6:.1f} MB, hosts received {', '.join(f'{h} {n / 1e6:.1f} MB' for h, n in received_up.items())}, "
          f"{fetches_up} apt fetches; switches: {[i['seconds'] for i in after_up['instances']]} s")
    print(f"rollback {RELEASE_B} -> {RELEASE_A}: {back.seconds:.1f}s, {back_requests} requests, {len(back_failed)} "
          f"failed; hosts received {', '.join(f'{h} {n / 1e6:.2f} MB' for h, n in received_back.items())}, "
          f"{fetches_back} apt fetches; switches: {[i['seconds'] for i in after_back['instances']]} s")

    for requests_sent, failed in ((up_requests, up_failed), (back_requests, back_failed)):
        assert requests_sent > 50
        assert failed == [], sorted({r[2] for r in failed})
    assert [(i["instance"], i["release"], i["outcome"]) for i in after_up["instances"]] == \
        [(f"{h}:{i}", RELEASE_B, "switched") for h, i in INSTANCES]
    assert [(i["instance"], i["release"], i["outcome"]) for i in after_back["instances"]] == \
        [(f"{h}:{i}", RELEASE_A, "switched") for h, i in INSTANCES]
    # The rollback reused the kept venv: no wheels pushed, nothing installed, no package fetched.
    assert re.search(rf"Release {RELEASE_A} venv .*?\s2\s+-\s+-\s+2\s", back.output), back.output[-3000:]
    assert fetches_back == 0
    assert all(n < 5e6 for n in received_back.values()), received_back
    # The upgrade moved B's new wheels (about 12 MB) once to the cache and once into each host, not the
    # whole release (617 MB): the rest of B is A's wheels, already in every host's store.
    assert all(n < 50e6 for n in received_up.values()), received_up
    assert received_up[lab["hosts"][1]["name"]] > sum(w.size for w in added), received_up
    assert sent_up < 50e6, sent_up
    assert back.seconds < up.seconds


def test_release_whose_engine_cannot_start_stops_at_the_canary(on_release_a):
    """B with a tokenizer path that does not exist: vLLM's parser takes it, the engine dies at
    start. The canary (lab1:a) goes back to A, nothing else restarts, nginx never fails a request."""
    before = main_pids()
    broken, requests_sent, failed = deploy_under_load(
        "--data", f"vllm_release={RELEASE_B}", "--data", 'vllm_extra_args=["--tokenizer","/nonexistent-tokenizer"]')
    after = main_pids()
    print(f"\nbroken release: stopped after {broken.seconds:.1f}s, {requests_sent} requests, {len(failed)} failed; "
          f"report: {report()['halted']}")
    assert broken.returncode != 0
    assert "rollout STOPPED: lab1:a reverted: vllm@a did not become healthy" in broken.output, broken.output[-5000:]
    assert "rollout stopped: vllm@a reverted" in broken.output
    assert failed == [], sorted({r[2] for r in failed})
    assert after[("lab1", "a")] != before[("lab1", "a")]
    assert {k: v for k, v in after.items() if k != ("lab1", "a")} == \
        {k: v for k, v in before.items() if k != ("lab1", "a")}
    assert instance_venvs() == {key: release_venv(RELEASE_A) for key in INSTANCES}
    assert "--tokenizer" not in ssh("lab1", "cat /etc/vllm-fleet/instances/a.env")
    assert " down;" not in ssh("lab1", "cat /etc/nginx/conf.d/vllm-fleet.conf")
    assert [(i["instance"], i["release"]) for i in report()["instances"]] == [(f"{h}:{i}", RELEASE_A) for h, i in INSTANCES]


def test_flags_the_release_refuses_stop_before_any_restart(on_release_a):
    before = main_pids()
    refused = run_deploy("--data", 'vllm_extra_args=["--no-such-flag"]')
    assert refused.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in refused.output, refused.output[-5000:]
    assert re.search(r"rollout STOPPED: flags refused on lab[12]: vllm@a: .*--no-such-flag", refused.output)
    assert main_pids() == before
    assert "--no-such-flag" not in ssh("lab1", "cat /etc/vllm-fleet/instances/a.env")
