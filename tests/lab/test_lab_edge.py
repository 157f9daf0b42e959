"""The secure edge on the lab: TLS with the fleet's CA, client keys, per-client limits, the route
allowlist, instances reachable only from the load balancer, sandboxed units, and no secret
anywhere it should not be.

Traffic goes only to the lab's own hosts. Every loop is bounded in count and time. The test
adds clients to the lab's clients.toml and puts the file back as it found it.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests

from roles import cli, secrets
from roles.lab.config import BRIDGE, HOST_OFFSET, SUBNET
from roles.plan.edge import ClientEntry, Secret
from tests.lab.labkit import REPO, Deploy, Load, bring_up_lab, key_leaks, run_deploy, ssh

pytestmark = pytest.mark.lab

SECRETS = cli.lab_secrets()
ALLOWLIST = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"}
# Every pyinfra output of this module, searched for keys by the leak test.
OUTPUTS: list[str] = []


def deploy(*args: str) -> Deploy:
    result = run_deploy(*args)
    OUTPUTS.append(result.output)
    assert result.returncode == 0, result.output[-5000:]
    return result


@pytest.fixture(scope="module")
def lab():
    return bring_up_lab()


@pytest.fixture(scope="module")
def clients(lab):
    """The lab client plus alice (default limits), flood (1 request a second, no burst) and
    doomed (revoked later), deployed; the lab's own clients.toml comes back afterwards."""
    cli.ensure_lab_client()
    original = secrets.clients_file(SECRETS).read_bytes()
    entries = secrets.load_clients(SECRETS)
    for name, limits in (("alice", ()), ("flood", (("rate", 1), ("burst", 0))), ("doomed", ())):
        entries[name] = ClientEntry(name, (Secret(secrets.new_key()),), limits)
    secrets.write_clients(SECRETS, entries)
    try:
        pids = main_pids(lab)
        added = deploy()
        yield {name: entry.keys[-1].reveal() for name, entry in entries.items()}
        # Adding clients is a change at the edge only: no instance restarted for it.
        assert "will restart" not in added.output and main_pids(lab) == pids
    finally:
        secrets.write_private(secrets.clients_file(SECRETS), original)
        deploy()  # the fleet as the lab has it, for the tests that follow


@pytest.fixture(scope="module")
def edge(clients) -> cli.LabEdge:
    return cli.lab_endpoint()


def main_pids(lab) -> dict[str, str]:
    return {f"{h['name']}:{unit}": ssh(h["name"], f"systemctl show -p MainPID --value {unit}")
            for h in lab["hosts"] for unit in ssh(h["name"], "systemctl list-units --plain --no-legend "
                                                  "'vllm@*' | cut -d' ' -f1").split()}


def internal_key() -> str:
    return secrets.fleet_key(SECRETS, "internal").reveal()


def get(edge: cli.LabEdge, path: str, key: str | None, **kwargs) -> requests.Response:
    return edge.session(key or "").get(f"{edge.base_url.removesuffix('/v1')}{path}", timeout=30, **kwargs)


# ---- the allowlist, behind keys ---------------------------------------------------------------------

def openapi_paths(lab) -> list[str]:
    """The pinned vLLM's own route list, asked of an instance on the load balancer host, with the
    internal key (sent over ssh's stdin, never on a command line)."""
    lb = lab["hosts"][0]
    fetch = ("import sys, urllib.request as u; key = sys.stdin.read().strip(); "
             f"r = u.Request('http://{lb['address']}:8001/openapi.json', headers={{'Authorization': 'Bearer ' + key}}); "
             "print(u.urlopen(r, timeout=30).read().decode())")
    return list(json.loads(ssh(lb["name"], f'python3 -c "{fetch}"', stdin=internal_key()))["paths"])


def test_only_the_allowlist_answers_and_only_to_a_key(edge, clients, lab):
    probes = sorted({re.sub(r"\{[^}]*\}", "x", p) for p in openapi_paths(lab)}
                    | {"/invocations", "/metrics", "/pause", "/scale_elastic_ep", "/docs"})
    marker = f"edge-probe-{time.time_ns()}"
    rows = []
    for path in probes:
        statuses = [get(edge, path, key, params={"probe": marker})
                    for key in (clients["alice"], None, "vf-" + "x" * 40)]
        rows.append((path, *(r.status_code for r in statuses)))
        with_key, no_key, wrong_key = statuses
        if path == "/health":
            assert [r.status_code for r in statuses] == [200, 200, 200]
        elif path in ALLOWLIST:
            assert with_key.status_code not in (401, 404), (path, with_key.text[:300])
            for refused in (no_key, wrong_key):
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
                assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        else:
            for response in statuses:
                assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", \
                    (path, response.status_code, response.text[:300])
    log = ssh(lab["hosts"][0]["name"], f"grep -F {marker} /var/log/nginx/vllm-fleet.access.log")
    reached = {line.split('"GET ', 1)[1].split("?", 1)[0] for line in log.splitlines()
               if line.split("upstream=", 1)[1].split()[0] != "-"}
    assert reached == ALLOWLIST & set(probes), reached
    assert {re.search(r'client=(\S*) "', line).group(1) for line in log.splitlines()} == {"alice", ""}
    print(f"\n{len(probes)} routes through the edge (HTTP status with alice's key / no key / a wrong key):")
    for path, *statuses in rows:
        print(f"  {path:36} {' / '.join(map(str, statuses))}{'  (reaches vLLM)' if path in ALLOWLIST else ''}")


# ---- instances only behind the edge -----------------------------------------------------------------

PROBE = ("import sys, urllib.request as u, urllib.error as e\n"
         "key = sys.stdin.read().strip()\n"
         "for url in sys.argv[1:]:\n"
         "    r = u.Request(url, headers={'Authorization': 'Bearer ' + key} if key else {})\n"
         "    try: print(url, u.urlopen(r, timeout=3).status)\n"
         "    except e.HTTPError as x: print(url, x.code)\n"
         "    except Exception as x: print(url, 'unreachable', type(x).__name__)\n")


def from_host(host: str, urls: list[str], key: str = "") -> dict[str, str]:
    """PROBE's answers from lab host ``host``, or from this machine for "control node"."""
    if host == "control node":
        out = subprocess.run([sys.executable, "-c", PROBE, *urls], input=key, capture_output=True,
                             text=True, check=True).stdout
    else:
        ssh(host, "cat > /tmp/port_probe.py", stdin=PROBE)
        out = ssh(host, "python3 /tmp/port_probe.py " + " ".join(urls), stdin=key)
    return dict(line.split(" ", 1) for line in out.splitlines())


@contextlib.contextmanager
def stranger_on_the_lab_network():
    """A second address of the control node on the lab bridge, one no inventory setting names:
    connections from it stand for any machine of the network. Removed on the way out."""
    address = str(SUBNET.network_address + HOST_OFFSET - 1)
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", BRIDGE], check=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", BRIDGE], check=True)


def connect_from(source: str, url: str) -> str:
    host, port = url.split("/")[2].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=3, source_address=(source, 0)).close()
        return "connected"
    except OSError as error:
        return f"unreachable ({type(error).__name__})"


def test_instance_ports_answer_only_the_load_balancer_with_the_internal_key(edge, lab):
    lb, other = lab["hosts"][0], lab["hosts"][1]
    instances = [f"http://{lb['address']}:8001/v1/models", f"http://{lb['address']}:8002/v1/models",
                 f"http://{other['address']}:8001/v1/models"]
    table = {}
    with stranger_on_the_lab_network() as stranger:
        for url in instances:  # dropped by the hosts' firewalls
            table[(f"stranger {stranger}", url)] = connect_from(stranger, url)
    # The control node is let in by the lab's firewall_instance_allow_from (vllm-fleet bench
    # --direct, --overhead), so it answers only with the key; lab2 is no load balancer but the
    # lab's monitoring host (Prometheus scrapes /metrics there).
    for name, key in (("control node", ""), (other["name"], ""), (other["name"], internal_key()),
                      (lb["name"], ""), (lb["name"], internal_key())):
        for url, result in from_host(name, instances, key).items():
            table[(f"{name} {'with' if key else 'without'} the internal key", url)] = result
    print("\ninstance ports:")
    for (source, url), result in table.items():
        print(f"  {source:38} {url:36} {result}")
    assert all(r.startswith("unreachable") for (s, _), r in table.items() if s.startswith("stranger"))
    for source in ("control node", other["name"], lb["name"]):
        for url in instances:
            assert table[(f"{source} without the internal key", url)] == "401"
    for url in instances:
        assert table[(f"{lb['name']} with the internal key", url)] == "200"


# ---- clients: the SDK, limits, rotation ---------------------------------------------------------------

def test_openai_sdk_verifies_the_lab_ca_and_streams_with_a_client_key(edge, clients):
    chunks, seconds, text = cli.stream_chat(edge, api_key=clients["alice"])
    print(f"\nOpenAI SDK over TLS (lab CA) with alice's key: {chunks} chunks in {seconds:.2f}s")
    assert chunks > 2 and text
    with pytest.raises(openai.AuthenticationError):
        cli.stream_chat(edge, api_key="vf-" + "0" * 43)
    # Without the lab CA the certificate is not trusted.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{edge.base_url}/models", timeout=10)


def test_a_client_over_its_rate_gets_429_while_another_is_served(edge, clients):
    results: dict[str, list[requests.Response]] = {"flood": [], "alice": []}

    def send(name: str, count: int, pause: float) -> None:
        session = edge.session(clients[name])
        for _ in range(count):
            results[name].append(session.get(f"{edge.base_url}/models", timeout=30))
            time.sleep(pause)

    threads = [threading.Thread(target=send, args=("flood", 12, 0.05)),
               threading.Thread(target=send, args=("alice", 12, 0.25))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    flood = [r.status_code for r in results["flood"]]
    alice = [r.status_code for r in results["alice"]]
    print(f"\nflood (1 request/s, no burst): {flood.count(200)} served, {flood.count(429)} got 429; "
          f"alice (default limits), at the same time: {alice.count(200)} of {len(alice)} served")
    assert len(flood) == 12 and set(flood) == {200, 429} and flood.count(429) >= 8
    assert alice == [200] * 12
    limited = next(r for r in results["flood"] if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1" and limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_key_rotation_under_a_steady_stream_fails_no_request_and_restarts_nothing(edge, clients, lab):
    old = clients["alice"]
    pids = main_pids(lab)
    with Load(edge, api_key=old, workers=1, pause=0.5, max_seconds=600) as first:
        new, _ = secrets.add_client_key(SECRETS, "alice")
        secrets.remove_client(SECRETS, "doomed")  # and a revocation in the same deploy
        added = deploy("--debug", "--diff")  # the leak test searches pyinfra's most verbose output too
    assert get(edge, "/v1/models", clients["doomed"]).status_code == 401
    with Load(edge, api_key=new.reveal(), workers=1, pause=0.5, max_seconds=600) as second:
        secrets.remove_client_key(SECRETS, "alice", old[:secrets.MIN_KEY_PREFIX])
        removed = deploy()
    clients["alice_new"] = new.reveal()
    streams = {"old key, while the new one is added": first, "new key, while the old one is removed": second}
    for label, load in streams.items():
        failed = [r for r in load.results if not r[1]]
        print(f"\nrotation, {label}: {len(load.results)} requests, {len(failed)} failed")
        assert len(load.results) > 10 and failed == [], failed[:5]
    assert get(edge, "/v1/models", old).status_code == 401
    assert get(edge, "/v1/models", new.reveal()).status_code == 200
    assert main_pids(lab) == pids
    for output in (added.output, removed.output):
        assert "will restart" not in output


# ---- sandbox and secrets ----------------------------------------------------------------------------

def test_instances_run_sandboxed(edge, lab):
    host = lab["hosts"][0]["name"]
    report = ssh(host, "systemd-analyze security vllm@a.service")
    exposure = float(re.search(r"Overall exposure level for vllm@a.service: ([\d.]+)", report).group(1))
    print(f"\nsystemd-analyze security vllm@a.service on {host}: {exposure}")
    assert exposure <= 2.5
    # And it serves under the sandbox.
    response = edge.session().post(f"{edge.base_url}/completions", timeout=60,
                                   json={"model": edge.model, "prompt": "Hello", "max_tokens": 4})
    assert response.status_code == 200 and response.json()["choices"]


def every_key(clients) -> list[str]:
    return [*clients.values(), internal_key(), secrets.fleet_key(SECRETS, "smoke").reveal()]


def test_no_secret_in_ps_shared_files_pyinfra_output_reports_or_git(edge, clients, lab):
    keys = every_key(clients)
    assert OUTPUTS, "the rotation test's deploys are searched"
    found = []
    for host in (h["name"] for h in lab["hosts"]):
        found += key_leaks(host, keys)
    found += [f"pyinfra output {i}" for i, output in enumerate(OUTPUTS) for key in keys if key in output]
    for path in (p for p in (REPO / ".cache").rglob("*") if p.is_file() and p.stat().st_size < 50_000_000):
        data = path.read_bytes()
        found += [str(path) for key in keys if key.encode() in data]
    history = subprocess.run(["git", "log", "-p", "--all"], cwd=REPO, capture_output=True).stdout
    tree = subprocess.run(["git", "grep", "-I", "-F", "--untracked", "-f", "-"], cwd=REPO, capture_output=True,
                          input="\n".join(keys).encode()).stdout
    found += ["git history" for key in keys if key.encode() in history] + (["git tree"] if tree else [])
    assert found == [], found
    print(f"{len(keys)} keys: none in ps, in a file others can read, in {len(OUTPUTS)} pyinfra outputs "
          "(one with --debug --diff), in .cache/ or in git")
