"""The fallback provider: an OpenAI-compatible API the edge sends a request to when no instance of
the fleet can take it (``nginx_fallback``), planned on the control node before any host is touched.

``failover`` sends a request there when every instance is down or refuses the connection;
``overflow`` also when every instance already has ``nginx_instance_cap`` requests in flight. A
request that reached an instance is never sent again: the instance may be generating it still.
The provider's key is ``fallback.key`` in ``nginx_secrets_dir``, beside the clients' keys: never
in the inventory, never in a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from roles.errors import FleetConfigError
from roles.plan import settings
from roles.plan.edge import Secret, load_certificates, read_key_file, resolve

FALLBACK_KEY_FILE = "fallback.key"
# The routes whose requests may go to the provider: they generate, and their body names the model.
# /v1/models stays the fleet's own (a client must not see the provider's list as the fleet's).
FALLBACK_ROUTES = ("/v1/completions", "/v1/chat/completions")
SET_KEY = "`vllm-fleet keys fallback {folder}` (it asks for the key without showing it)"


@dataclass(frozen=True)
class Provider:
    """Where the fallback goes and how: ``base_path`` is the URL's path (e.g. /v1), without a
    trailing slash; ``ca`` the operator's CA bundle on the control node, None for the load
    balancer's system CAs."""

    mode: str
    host: str
    port: int
    base_path: str
    model: str
    key: Secret
    ca: Path | None
    connect_timeout: int
    read_timeout: int

    @property
    def authority(self) -> str:
        """The Host header: the name, and the port unless it is HTTPS's."""
        return self.host if self.port == 443 else f"{self.host}:{self.port}"

    @property
    def models_url(self) -> str:
        return f"https://{self.authority}{self.base_path}/models"

    def uri(self, route: str) -> str:
        """The provider's path for a fleet route: /v1/chat/completions -> {base_path}/chat/completions."""
        return self.base_path + route.removeprefix("/v1")


def plan_provider(lb_name: str, data: Mapping[str, Any], secrets_dir: Path, base_dir: Path) -> Provider | None:
    """Load balancer ``lb_name``'s fallback provider, checked, or None when nginx_fallback is off."""
    mode = settings.value(data, "nginx_fallback")
    if mode == "off":
        return None
    where = f"host {lb_name}"
    url, model = settings.value(data, "nginx_fallback_url"), settings.value(data, "nginx_fallback_model")
    for name, given, example in (("nginx_fallback_url", url, "https://api.example.com/v1"),
                                 ("nginx_fallback_model", model, "the provider's name for the model")):
        if not given:
            raise FleetConfigError(f"{where}: `{name}`", f"is unset, but nginx_fallback is {mode!r}: the edge "
                                   "would have nowhere to send what the fleet cannot take.",
                                   f"set `{name}` ({example}), or nginx_fallback = 'off'.")
    parts = urlsplit(url)
    ca = settings.value(data, "nginx_fallback_ca")
    ca_path = resolve(ca, base_dir) if ca else None
    if ca_path is not None:
        load_certificates(f"{where}: `nginx_fallback_ca`", ca_path)
    return Provider(mode=mode, host=parts.hostname, port=parts.port or 443, base_path=parts.path.rstrip("/"),
                    model=model, key=provider_key(lb_name, secrets_dir), ca=ca_path,
                    connect_timeout=settings.value(data, "nginx_fallback_connect_timeout"),
                    read_timeout=settings.value(data, "nginx_fallback_read_timeout"))


def provider_key(lb_name: str, secrets_dir: Path) -> Secret:
    """The provider's key from ``fallback.key``: only its owner may read the file, and the key
    goes verbatim into nginx's configuration and an Authorization header."""
    path = Path(secrets_dir) / FALLBACK_KEY_FILE
    fix = SET_KEY.format(folder=secrets_dir)
    if not path.is_file():
        raise FleetConfigError(f"host {lb_name}: `nginx_fallback`",
                               f"needs the provider's API key in {path}, which does not exist.",
                               f"write it there with {fix}.")
    return read_key_file(path, "the nginx configuration and an HTTP header", f"write the provider's key again with {fix}")


def instance_cap(data: Mapping[str, Any], max_num_seqs: int) -> int:
    """How many requests nginx sends one instance at once in overflow mode: nginx_instance_cap, else
    what the instance batches (more would queue inside vLLM, which overflow is there to avoid)."""
    return settings.value(data, "nginx_instance_cap") or max_num_seqs


def keepalive_probes(dead_peer_timeout: int) -> dict[str, int]:
    """TCP keepalive on the load balancer's sockets to the instances, so that a connection whose
    peer vanished (a host cut off the network) is dropped within ``dead_peer_timeout`` seconds:
    3 probes a sixth of it apart after the connection was idle for the rest. A live host's kernel
    answers the probes however long a generation is silent, so a slow request is never cut."""
    interval = max(1, dead_peer_timeout // 6)
    idle = dead_peer_timeout - 3 * interval
    return {"net.ipv4.tcp_keepalive_time": idle, "net.ipv4.tcp_keepalive_intvl": interval,
            "net.ipv4.tcp_keepalive_probes": 3}

