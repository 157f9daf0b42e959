"""The artifact cache on the lab (lab1, the load balancer): it answers the fleet's hosts and nobody
else; a wheel damaged on it fails the install on every host, naming the wheel and the hash mismatch,
while the fleet keeps serving its release; and a gated hub model, served by a stand-in Hub on this
machine's lab address (roles/lab/hub.py: 401 without the token), is asked for with the token stored
in the lab's secrets, downloaded once, on the cache, and staged on every host, under a bounded load
that loses no request; without the token the deploy stops before any host changes, naming the
setting; the token shows nowhere on the hosts, in pyinfra's output or in the journal.

Traffic goes only to the lab's own hosts and to this machine's bridge address; every load is
bounded in count and time. The lab's own model is deployed again at the end.
"""

from __future__ import annotations

import hashlib
import secrets as random
import subprocess
import time

import pytest
import requests

from roles import cli
from roles.artifact_sources import HUB_TOKEN_FILE
from roles.lab.config import bridge_address
from roles.lab.hosts import ssh_command
from roles.lab.hub import StandInHub
from roles.release.wheelhouse import build_wheelhouse, wheel_files
from tests.lab.labkit import (
    CACHE_MODELS,
    CACHE_WHEELS,
    MODEL,
    MODELS_DIR,
    REPO,
    WHEEL_STORE,
    Load,
    deployed_lab,
    release_lock,
    release_new_to_the_fleet,
    release_venv,
    run_deploy,
    ssh,
)

pytestmark = pytest.mark.lab

RELEASE_A, RELEASE_B = "cpu-vllm-0.32.0", "cpu-vllm-0.32.0-tf5.18"

CACHE_PORT = 8480
HOSTS = ("lab1", "lab2")


@pytest.fixture(scope="module")
def lab():
    return deployed_lab()


def fetch_from(host: str, url: str) -> str:
    """What a GET of ``url`` gets from lab host ``host``: the HTTP status (lab hosts have no curl)."""
    code = ("import sys, urllib.request, urllib.error\n"
            "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n"
            "except OSError as e:\n    print('unreachable', e)\n")
    return ssh(host, f"python3 -c '{code}' {url}")


def test_the_cache_answers_the_fleets_hosts_and_nobody_else(lab):
    cache = f"http://{lab['hosts'][0]['address']}:{CACHE_PORT}"
    wheel = wheel_files(release_lock(RELEASE_A))[0].path
    assert fetch_from("lab2", f"{cache}/wheels/{wheel}") == "200"
    assert fetch_from("lab1", f"{cache}/wheels/{wheel}") == "200"
    # No listing, nothing outside wheels/ and models/ (incoming/ is what is still being checked).
    assert fetch_from("lab2", f"{cache}/wheels/") == "403"
    assert fetch_from("lab2", f"{cache}/incoming/") == "404"
    # This machine's own address on the lab network stands for "outside the fleet": the cache host's
    # firewall drops it, so the connection is never answered.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{cache}/wheels/{wheel}", timeout=3)
    rule = ssh("lab1", f"nft list table inet vllm_fleet | grep 'tcp dport {CACHE_PORT}'")
    fleet = ", ".join(h["address"] for h in lab["hosts"])
    assert f"ip saddr {{ {fleet} }} tcp dport {CACHE_PORT} accept" in rule, rule


def test_a_wheel_damaged_on_the_cache_fails_every_install_and_the_fleet_keeps_serving(lab):
    damaged = release_new_to_the_fleet(lab, RELEASE_B, RELEASE_A)[0]
    # On the cache as the control node would have sent it, then one byte changed: same name, same size.
    source = build_wheelhouse(release_lock(RELEASE_B)) / damaged.path
    subprocess.run(ssh_command("lab1") + [f"cat > {CACHE_WHEELS}/{damaged.path}"], input=source.read_bytes(),
                   check=True, timeout=120)
    middle = damaged.size // 2
    ssh("lab1", f"python3 -c 'import sys; f = open(sys.argv[1], \"r+b\"); f.seek({middle}); b = f.read(1); "
                f"f.seek({middle}); f.write(bytes([b[0] ^ 1]))' {CACHE_WHEELS}/{damaged.path}")
    before = {h: ssh(h, "readlink /opt/vllm-fleet/instances/a") for h in HOSTS}
    try:
        with Load(cli.lab_endpoint(), pause=1.0, max_requests=2000, max_seconds=900) as load:
            refused = run_deploy("--data", f"vllm_release={RELEASE_B}")
            stopped = time.monotonic()
            time.sleep(10)  # and after it: the fleet serves on, on its release
        failed = [r for r in load.results if not r.ok]
        print(f"\ndamaged {damaged.path} on the cache: deploy rc={refused.returncode} in {refused.seconds:.1f}s; "
              f"{len(load.results)} requests through the edge meanwhile, {len(failed)} failed")
        assert refused.returncode != 0
        for host in HOSTS:
            assert f"[{host}]" in refused.output and \
                f"{damaged.path}: sha256 mismatch: expected {damaged.sha256}, got " in refused.output, \
                refused.output[-5000:]
            # Nothing half-installed: no venv of B, no partial download, the damaged wheel not in the store.
            left = ssh(host, f"ls -d {release_venv(RELEASE_B)} {WHEEL_STORE}/.*.partial {WHEEL_STORE}/{damaged.path} "
                             "2>/dev/null; true")
            assert left == "", (host, left)
            assert ssh(host, "readlink /opt/vllm-fleet/instances/a") == before[host] == release_venv(RELEASE_A)
            assert ssh(host, "systemctl is-active vllm@a") == "active"
        assert failed == [] and sum(r.start > stopped for r in load.results) >= 5, sorted({r.detail for r in failed})
    finally:
        ssh("lab1", f"rm -f {CACHE_WHEELS}/{damaged.path}")  # the next deploy sends it again


TOKEN = "hf_" + random.token_urlsafe(24)  # this run's; the stand-in Hub admits it alone


@pytest.fixture
def hub(lab):
    """The stand-in Hub on this machine's lab address, serving the lab's model as a gated revision."""
    with StandInHub(MODEL, TOKEN, address=bridge_address()) as stand_in:
        yield stand_in


def hub_model(hub) -> list[str]:
    return ["--data", "vllm_model_path=null", "--data", f"vllm_model_id={hub.repo_id}",
            "--data", f"vllm_model_revision={hub.revision}", "--data", f"vllm_hf_endpoint={hub.url}",
            "--data", f"vllm_model_config={MODEL.relative_to(REPO)}/config.json"]


def token_anywhere(host: str, token: str) -> str:
    """Where ``token`` shows on lab host ``host``: any file (root-only ones too), the process table,
    the journal."""
    files = ssh(host, "grep -rlsF -f /dev/stdin /etc /var /run /tmp /root /home /usr/local /srv /opt; true",
                stdin=token + "\n")
    processes = token in ssh(host, "ps -eo args")
    journal = ssh(host, "journalctl -q --no-pager | grep -cF -f /dev/stdin; true", stdin=token + "\n")
    return " ".join(filter(None, [files, "ps" if processes else "", f"journal {journal}" if journal != "0" else ""]))


def test_a_gated_hub_model_is_staged_on_every_host_from_one_download(lab, hub):
    token_file = cli.lab_secrets() / HUB_TOKEN_FILE
    token_file.unlink(missing_ok=True)
    dirname = f"lab--tiny-llama-gated-{hub.revision[:12]}"
    # The revision is the lab model's, so an earlier run's copy may still be there: the model as on
    # the day it is first deployed is on no host and not on the cache.
    for host in HOSTS:
        ssh(host, f"rm -rf {MODELS_DIR}/{dirname} {MODELS_DIR}/{dirname}.partial")
    ssh("lab1", f"rm -rf {CACHE_MODELS}/{dirname}")
    try:
        without = run_deploy(*hub_model(hub))
        assert without.returncode != 0 and "host lab1: `vllm_model_id`" in without.output, without.output[-3000:]
        assert f"{hub.repo_id} at {hub.url} is gated" in without.output and "vllm-fleet keys hub" in without.output
        assert "Starting operation" not in without.output  # refused before any host was touched
        assert hub.downloads("model.safetensors") == 0

        from roles import secrets

        secrets.write_private(token_file, (TOKEN + "\n").encode())
        with Load(cli.lab_endpoint(), pause=1.0, max_requests=3000, max_seconds=1200) as load:
            staged = run_deploy(*hub_model(hub))
        failed = [r for r in load.results if not r.ok]
        print(f"\ngated hub model: deploy rc={staged.returncode} in {staged.seconds:.1f}s, model.safetensors "
              f"downloaded {hub.downloads('model.safetensors')} time(s); {len(load.results)} requests, "
              f"{len(failed)} failed")
        assert staged.returncode == 0, staged.output[-5000:]
        assert hub.downloads("model.safetensors") == 1 and hub.downloads("config.json") == 1
        for host in HOSTS:
            staged_dir = f"{MODELS_DIR}/{dirname}"
            sums = ssh(host, f"cd {staged_dir} && sha256sum model.safetensors config.json tokenizer.json")
            for line in sums.splitlines():
                digest, name = line.split()
                assert digest == hashlib.sha256((MODEL / name).read_bytes()).hexdigest(), (host, name)
            assert f"--model {staged_dir} " in ssh(host, "grep ENGINE_ARGS /etc/vllm-fleet/instances/a.env")
            assert token_anywhere(host, TOKEN) == "", host
        assert TOKEN not in staged.output and TOKEN not in without.output
        assert failed == [] and len(load.results) > 20, sorted({r.detail for r in failed})
    finally:
        token_file.unlink(missing_ok=True)
        back = run_deploy()
        assert back.returncode == 0, back.output[-5000:]
