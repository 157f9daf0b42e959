"""The fallback provider on the lab (nginx_fallback), against a stand-in provider on the last lab
host (roles/lab/provider.py: a real vLLM serving another model name, behind an nginx of its own
with TLS from a CA of its own and a key of its own), which the edge reaches as any provider:

- a wrong provider key is refused by the deploy before nginx is given it, and the right one is
  in no command line, world-readable file, log or pyinfra output;
- failover: every fleet instance stopped under a steady stream (OpenAI SDK): the provider answers
  while the fleet is down and the fleet again once it is back; only requests the instances had when
  they were stopped may fail (vLLM 0.32 aborts them on SIGTERM; they were sent, so never re-sent);
- overflow: caps of 2 per instance and a burst of 4x the fleet's total cap: none fails, and the
  provider's share is about what the caps imply;
- with the fallback off, the same outage fails requests;
- a host cut off the lab bridge for 2 minutes: requests in flight on it end within 45 s, no other
  request fails, and it serves again once its link is back.

Traffic goes only to the lab's own hosts; every load is bounded in count and time. The lab's
inventory (fallback off) is deployed again at the end.
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from roles import cli
from roles.lab import provider as lab_provider
from roles.lab.config import veth_name
from roles.plan.fallback import FALLBACK_KEY_FILE
from tests.lab.labkit import Deploy, Load, Result, deployed_lab, key_leaks, run_deploy, ssh, vllm_journal

pytestmark = pytest.mark.lab

FLEET_MODEL = "tiny-llama"
LOG = "/var/log/nginx/vllm-fleet.access.log"
# The edge's configuration names the provider's upstream only where the fallback is on.
PROVIDER_UPSTREAM = "upstream vllm_fleet_provider {"
# nginx takes a failed instance back after nginx_fail_timeout (10 s); a margin on top.
BACK_IN_NGINX_S = 15


@pytest.fixture(scope="module")
def lab():
    # The provider runs on the release and model the fleet's deploy staged on its host.
    return deployed_lab()


@pytest.fixture(scope="module")
def provider(lab):
    stand_in = lab_provider.up(cli.lab_secrets())
    yield stand_in
    lab_provider.down()
    put_back = run_deploy()
    assert put_back.returncode == 0, put_back.output[-5000:]


@pytest.fixture(scope="module")
def edge(provider):
    return cli.lab_endpoint()


def deploy_with(settings: dict) -> Deploy:
    return run_deploy(*[arg for name, value in settings.items() for arg in ("--data", f"{name}={value}")])


def instances_of(lab) -> dict[str, str]:
    """Each lab host's running vLLM units, as `systemctl start` takes them."""
    return {h["name"]: " ".join(ssh(h["name"], "systemctl list-units --plain --no-legend --state=active "
                                                "'vllm@*.service' | awk '{print $1}'").split()) for h in lab["hosts"]}


def stop_fleet(lab) -> dict[str, str]:
    units = instances_of(lab)
    with ThreadPoolExecutor(len(units)) as pool:
        list(pool.map(lambda host: ssh(host, "systemctl stop 'vllm@*'"), units))
    return units


def start_fleet(lab, units: dict[str, str]) -> None:
    """Start the units again and wait until every instance answers /health."""
    addresses = {h["name"]: h["address"] for h in lab["hosts"]}

    def start(host: str) -> None:
        ssh(host, f"systemctl start {units[host]}")
        for unit in units[host].split():
            port = ssh(host, f"grep -o -- '--port [0-9]*' /etc/vllm-fleet/instances/{unit[5:-8]}.env").split()[1]
            ssh(host, f"python3 /usr/local/lib/vllm-fleet/fleet_probe.py wait --unit {unit[:-8]} "
                      f"--address {addresses[host]} --port {port} --timeout 280")
    with ThreadPoolExecutor(len(units)) as pool:
        list(pool.map(start, units))


def served(results: list[Result], model: str) -> list[Result]:
    return [r for r in results if r.ok and r.model == model]


# ---- the key --------------------------------------------------------------------------------------

def test_a_wrong_provider_key_is_refused_before_nginx_has_it(provider, lab):
    key_file = cli.lab_secrets() / FALLBACK_KEY_FILE
    right = key_file.read_text()
    lb = lab["hosts"][0]["name"]
    wrong = "sk-wrong-" + right.strip()[::-1][:24]
    try:
        key_file.write_text(wrong + "\n")
        refused = deploy_with(provider.settings("failover"))
    finally:
        key_file.write_text(right)
    print(f"\nwrong provider key: deploy rc={refused.returncode} in {refused.seconds:.1f}s")
    assert refused.returncode != 0 and "the provider refused its key: HTTP 401" in refused.output
    assert wrong not in refused.output
    assert ssh(lb, f"grep -c '{PROVIDER_UPSTREAM}' /etc/nginx/conf.d/vllm-fleet.conf || true") == "0"
    assert key_leaks(lb, [wrong], journal=True) == []


# ---- failover ------------------------------------------------------------------------------------------

def test_every_instance_stopped_the_provider_answers_and_only_what_they_had_fails(provider, edge, lab):
    deployed = deploy_with(provider.settings("failover"))
    assert deployed.returncode == 0, deployed.output[-5000:]
    assert f"fallback provider {provider.host}:8443 accepts the key" in deployed.output
    key = (cli.lab_secrets() / FALLBACK_KEY_FILE).read_text().strip()
    assert key not in deployed.output
    assert key_leaks(lab["hosts"][0]["name"], [key], journal=True) == []
    load_began = time.time()
    with Load(edge, sdk=True, workers=2, pause=0.2, max_requests=2000, max_seconds=600) as load:
        time.sleep(8)
        stopped_at = time.monotonic()
        units = stop_fleet(lab)
        all_stopped = time.monotonic()
        time.sleep(20)
        started_at = time.monotonic()
        start_fleet(lab, units)
        healthy_at = time.monotonic()
        time.sleep(BACK_IN_NGINX_S + 10)
    results = load.results
    failed = [r for r in results if not r.ok]
    # vLLM 0.32 aborts what it is generating when it gets SIGTERM (--shutdown-timeout 0): a request
    # an instance had when it was stopped is lost there, and was sent, so it is not sent again.
    in_flight = [r for r in results if r.start < all_stopped and r.end > stopped_at]
    down = [r for r in results if all_stopped < r.start and r.end < started_at]
    back = [r for r in results if r.start > healthy_at + BACK_IN_NGINX_S]
    by_provider = served(results, lab_provider.MODEL)
    first = min(r.end for r in by_provider) - stopped_at
    returned = min((r.end for r in served(results, FLEET_MODEL) if r.start > started_at), default=float("nan"))
    print(f"\nfailover: {len(results)} requests (OpenAI SDK, streamed and plain), {len(failed)} failed; "
          f"{len(served(results, FLEET_MODEL))} by the fleet, {len(by_provider)} by the provider; stop of every "
          f"instance took {all_stopped - stopped_at:.1f}s, first provider answer {first:.1f}s after it began; "
          f"instances healthy {healthy_at - started_at:.1f}s after their start, first fleet answer "
          f"{returned - started_at:.1f}s after it; {len(in_flight)} requests in flight during the stop; failed: "
          f"{sorted({r.detail for r in failed})[:3]}")
    assert set(failed) <= set(in_flight) and len(failed) <= load.workers, "\n".join(
        f"{h['name']}'s vLLM journal since the load began:\n{vllm_journal(h['name'], load_began)}"
        for h in lab["hosts"])
    assert down and all(r.model == lab_provider.MODEL for r in down)
    assert back and all(r.model == FLEET_MODEL for r in back)


# ---- overflow ------------------------------------------------------------------------------------------

def test_a_burst_over_the_caps_overflows_to_the_provider(provider, edge, lab):
    cap, instances = 2, 3
    deployed = deploy_with({**provider.settings("overflow"), "nginx_instance_cap": cap,
                            "nginx_client_concurrency": 64, "nginx_client_burst": 64})
    assert deployed.returncode == 0, deployed.output[-5000:]
    burst = 4 * cap * instances
    sessions = [edge.session() for _ in range(burst)]
    for session in sessions:  # each one's TLS connection open before the burst, so that it arrives at once
        assert session.get(f"{edge.base_url}/models", timeout=30).status_code == 200
    at_once = threading.Barrier(burst)

    def completion(session) -> tuple[int, str]:
        at_once.wait(timeout=60)
        # Long enough to hold its slot while the rest of the burst arrives (no early end of sequence).
        r = session.post(f"{edge.base_url}/completions", timeout=300, json={
            "model": edge.model, "prompt": "Tell a long story.", "max_tokens": 400, "ignore_eos": True})
        return r.status_code, r.json().get("model", "") if r.status_code == 200 else r.text[:200]
    with ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(completion, sessions))
    failed = [answer for status, answer in answers if status != 200]
    to_provider = sum(answer == lab_provider.MODEL for status, answer in answers if status == 200)
    implied = 1 - cap * instances / burst
    print(f"\noverflow: caps of {cap} on {instances} instances, a burst of {burst} completions at once: "
          f"{len(failed)} failed, {to_provider} ({to_provider / burst:.0%}) answered by the provider; the caps "
          f"imply {implied:.0%}")
    assert failed == []
    assert abs(to_provider / burst - implied) <= 0.15


# ---- without the fallback -------------------------------------------------------------------------------

def test_with_the_fallback_off_the_same_outage_fails_requests(provider, edge, lab):
    deployed = run_deploy()
    assert deployed.returncode == 0, deployed.output[-5000:]
    assert ssh(lab["hosts"][0]["name"], f"grep -c '{PROVIDER_UPSTREAM}' /etc/nginx/conf.d/vllm-fleet.conf || true") == "0"
    with Load(edge, sdk=True, workers=2, pause=0.2, max_requests=2000, max_seconds=400) as load:
        time.sleep(5)
        units = stop_fleet(lab)
        outage_from = time.monotonic()
        time.sleep(8)
        outage_to = time.monotonic()
        start_fleet(lab, units)
    during = [r for r in load.results if outage_from < r.start and r.end < outage_to]
    print(f"\nfallback off, every instance stopped: {len(during)} requests during the outage, "
          f"{sum(not r.ok for r in during)} failed")
    assert during and not any(r.ok for r in during)


# ---- a host cut off -------------------------------------------------------------------------------------

def opening_served_by(edge, lb: str, address: str) -> str:
    """A prompt the prefix policy sends to the instance at ``address`` (found from the access log)."""
    session = edge.session()
    for n in range(60):
        opening = f"Conversation {n} with the host that goes away"
        session.post(f"{edge.base_url}/completions", timeout=60,
                     json={"model": edge.model, "prompt": opening, "max_tokens": 1}).raise_for_status()
        if f"upstream={address}:" in ssh(lb, f"tail -n 1 {LOG}"):
            return opening
    raise AssertionError(f"no prompt of 60 went to {address}")


def long_stream(edge, opening: str, outcome: dict) -> None:
    """A streamed chat that generates for a while: its end (time) and how it ended, in ``outcome``."""
    try:
        with edge.session().post(f"{edge.base_url}/chat/completions", timeout=120, stream=True, json={
                "model": edge.model, "stream": True, "max_tokens": 900, "ignore_eos": True,
                "messages": [{"role": "user", "content": opening}]}) as r:
            outcome["first"] = time.monotonic()
            events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
            outcome["ok"] = events[-1:] == [b"data: [DONE]"]
    except requests.RequestException as e:
        outcome["ok"], outcome["error"] = False, type(e).__name__
    outcome["end"] = time.monotonic()


def test_a_host_cut_off_fails_only_its_requests_in_flight_and_serves_again(edge, lab):
    lb, cut = lab["hosts"][0]["name"], lab["hosts"][-1]
    link = veth_name(cut["name"])
    pinned = opening_served_by(edge, lb, cut["address"])
    stream: dict = {}
    with Load(edge, workers=2, pause=0.2, max_requests=2000, max_seconds=400) as load:
        time.sleep(5)
        streaming = threading.Thread(target=long_stream, args=(edge, pinned, stream))
        streaming.start()
        while "first" not in stream and streaming.is_alive():
            time.sleep(0.05)
        cut_at = time.monotonic()
        subprocess.run(["ip", "link", "set", link, "down"], check=True)
        try:
            streaming.join(timeout=110)
            time.sleep(max(0.0, 120 - (time.monotonic() - cut_at)))
        finally:
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        back_at = time.monotonic()
        log_lines = int(ssh(lb, f"wc -l < {LOG}"))
        time.sleep(BACK_IN_NGINX_S + 15)
    results = load.results
    failed = [r for r in results if not r.ok]
    others = [r for r in failed if not r.start < cut_at < r.end]
    after = ssh(lb, f"tail -n +{log_lines + 1} {LOG}")
    served_again = [line for line in after.splitlines() if f"upstream={cut['address']}:" in line and '" 200 ' in line]
    print(f"\n{cut['name']} cut off for {back_at - cut_at:.0f}s: a stream in flight on it ended "
          f"{stream['end'] - cut_at:.1f}s after the cut ({'complete' if stream.get('ok') else 'cut short'}); "
          f"{len(results)} other requests, {len(failed)} failed (in flight at the cut: "
          f"{len(failed) - len(others)}), {len(served_again)} served by {cut['name']} after its link was back")
    assert not stream["ok"] and stream["end"] - cut_at <= 45
    assert others == [], [r.detail for r in others][:3]
    assert all(r.end - cut_at <= 45 for r in failed)
    assert served_again
