"""The lab's stand-in for a hosted OpenAI-compatible API, the fallback provider of nginx_fallback's
lab tests: on the last lab host, a real vLLM of the lab's release serving the lab's model under
another name (``MODEL``) with a key of its own, behind an nginx of its own speaking TLS on
``PROVIDER_PORT`` with a certificate from a CA of its own. The fleet's edge reaches it as it would
any provider: by name, over TLS checked against that CA, with the key the operator stored
(``fallback.key`` in the lab's secrets).

It runs on what the fleet's deploy staged on that host (the release's venv, the model), so the
fleet is deployed first. `up` is idempotent; `down` takes it all away.
"""

from __future__ import annotations

import json
import shlex
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from roles import secrets
from roles.errors import LabError
from roles.lab.config import PROVIDER_PORT, STATE_DIR, load_state
from roles.lab.hosts import ssh_command
from roles.plan.fallback import FALLBACK_KEY_FILE

PROVIDER_DIR = STATE_DIR / "provider"
MODEL = "lab-provider"
ENGINE_PORT = 9001
# The fleet instance on that host whose release and model the provider runs.
INSTANCE = "a"
HOST_SCRIPT = Path(__file__).with_name("provider_host.py")
READY_S = 300


@dataclass(frozen=True)
class LabProvider:
    host: str
    address: str
    ca: Path

    @property
    def url(self) -> str:
        """As the edge is given it (nginx_fallback_url): by the host's name, which the lab's /etc/hosts knows."""
        return f"https://{self.host}:{PROVIDER_PORT}/v1"

    def settings(self, mode: str) -> dict:
        """The load balancers' settings that make it the fleet's fallback."""
        return {"nginx_fallback": mode, "nginx_fallback_url": self.url, "nginx_fallback_model": MODEL,
                "nginx_fallback_ca": str(self.ca)}


def provider_host() -> dict:
    return load_state()["hosts"][-1]


def on_host(name: str, action: str, stdin: str = "") -> None:
    done = subprocess.run(ssh_command(name) + [f"python3 -c {shlex.quote(HOST_SCRIPT.read_text())} {action}"],
                          input=stdin, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise LabError(f"lab provider {action} on {name} failed:\n{done.stderr[-3000:]}")


def up(secrets_dir: Path) -> LabProvider:
    """The provider up and answering with its key; its key stored as the fleet's fallback.key."""
    host = provider_host()
    PROVIDER_DIR.mkdir(parents=True, exist_ok=True)
    folder = secrets.private_dir(PROVIDER_DIR / "secrets")
    chain, tls_key = secrets.edge_certificate(folder, host["name"], [host["name"], host["address"]])
    key_path = folder / "api.key"
    if not key_path.exists():
        secrets.write_private(key_path, f"{secrets.new_key()}\n".encode())
    api_key = key_path.read_text().strip()
    given = {"cert": chain.decode(), "key": tls_key.reveal(), "api_key": api_key, "instance": INSTANCE,
             "model": MODEL, "port": PROVIDER_PORT, "engine_port": ENGINE_PORT}
    on_host(host["name"], "up", json.dumps(given))
    secrets.write_private(Path(secrets_dir) / FALLBACK_KEY_FILE, f"{api_key}\n".encode())
    provider = LabProvider(host["name"], host["address"], secrets.ca_certificate(folder))
    wait_ready(provider, api_key)
    return provider


def wait_ready(provider: LabProvider, api_key: str) -> None:
    """Until its /v1/models answers with its model, through its nginx, over TLS (by address: the
    certificate names it too)."""
    context = ssl.create_default_context(cafile=str(provider.ca))
    request = urllib.request.Request(f"https://{provider.address}:{PROVIDER_PORT}/v1/models",
                                     headers={"Authorization": f"Bearer {api_key}"})
    deadline = time.monotonic() + READY_S
    while True:
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                if MODEL in [m["id"] for m in json.load(response)["data"]]:
                    return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise LabError(f"the lab provider on {provider.host} did not answer within {READY_S} s")
        time.sleep(2)


def down() -> None:
    on_host(provider_host()["name"], "down")
