"""The edge's configuration for each routing policy, read by the real nginx (Debian's, with its njs
module for the prefix policy; the Makefile installs both): `nginx -t` accepts it, and a running
nginx routes with it. Each nginx runs in a folder of its own, on loopback ports, as it would under
Debian's nginx.conf (which includes conf.d/ inside http), with the secrets file and the TLS
certificate the deploy installs."""

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from roles import nginx, paths, secrets
from roles.plan.edge import plan_fleet_edge
from roles.plan.fleet import plan_fleet

NGINX = Path("/usr/sbin/nginx")
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
pytestmark = pytest.mark.skipif(not (NGINX.exists() and NJS_MODULE.exists()),
                                reason=f"{NGINX} or its njs module is not installed (the Makefile installs nginx and "
                                       "libnginx-mod-http-js)")
POLICIES = ("least_conn", "session", "prefix")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Edge:
    """The rendered edge of a one-host fleet on loopback (instances a, b, c), in ``folder``, each
    instance stood in for by an nginx server that answers with its name."""

    def __init__(self, host_data, folder: Path, routing: str, **lb_data):
        self.folder = folder
        self.port, *instance_ports = free_ports(4)
        self.instances = dict(zip("abc", instance_ports))
        data = host_data(ssh_hostname="127.0.0.1", vllm_instances=[{"name": n, "port": p}
                                                                    for n, p in self.instances.items()])
        secrets_dir = folder / "secrets"
        secrets.add_client_key(secrets_dir, "alice")
        self.data = {**data, "nginx_secrets_dir": str(secrets_dir), "nginx_listen_port": self.port,
                     "nginx_routing": routing, "nginx_client_rate": 1000, "nginx_client_burst": 1000, **lb_data}
        self.plan = replace(plan_fleet([("h1", self.data)], ["h1"]),
                            edges=plan_fleet_edge([("h1", self.data)], folder))
        self.key = secrets.load_clients(secrets_dir)["alice"].keys[0].reveal()
        self.ca = secrets_dir / "ca" / "fleet-ca.pem"

    def write(self, down=frozenset()) -> Path:
        """nginx.conf and what it includes, the deploy's host paths moved into the folder."""
        edge = self.plan.edge("h1")
        chain, key = nginx.tls_material(edge, "h1", self.data)
        moved = {paths.NGINX_SECRETS_CONF: "secrets.conf", paths.EDGE_CERTIFICATE: "edge.pem",
                 paths.EDGE_KEY: "edge.key", paths.NGINX_PREFIX_KEY: "prefix_key.js", "/var/log/nginx/": ""}
        conf = nginx.render_conf(self.plan, "h1", self.data, down)
        for host_path, name in moved.items():
            conf = conf.replace(host_path, str(self.folder / name) + ("/" if not name else ""))
        (self.folder / "vllm-fleet.conf").write_text(conf)
        (self.folder / "secrets.conf").write_text(nginx.render_secrets(edge, self.data))
        (self.folder / "edge.pem").write_text(chain)
        (self.folder / "edge.key").write_text(key)
        (self.folder / "prefix_key.js").write_text(paths.PREFIX_KEY_JS.read_text())
        backends = "".join(f'    server {{ listen 127.0.0.1:{port}; location / {{ return 200 "{name}\\n"; }} }}\n'
                           for name, port in self.instances.items())
        main = self.folder / "nginx.conf"
        main.write_text(
            f"load_module {NJS_MODULE};\npid {self.folder}/nginx.pid;\nevents {{}}\nhttp {{\n"
            + "".join(f"    {kind}_temp_path {self.folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                                   "uwsgi", "scgi"))
            + f"    include {self.folder}/vllm-fleet.conf;\n{backends}}}\n")
        return main

    def nginx(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(NGINX), "-p", str(self.folder), "-e", str(self.folder / "error.log"),
                               "-c", str(self.folder / "nginx.conf"), *args], capture_output=True, text=True,
                              timeout=30, check=check)

    def post(self, route: str, body, headers=None) -> str:
        """The instance that answered a request through the edge."""
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{route}", data=data, method="POST", headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **(headers or {})})
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False  # the certificate is for the fleet's names; its CA is checked
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.read().decode().strip()


@pytest.fixture
def running(host_data, tmp_path):
    """Start the edge of a policy (and stop it at the end of the test)."""
    started = []

    def start(routing: str, down=frozenset(), **lb_data) -> Edge:
        edge = Edge(host_data, tmp_path, routing, **lb_data)
        edge.write(down)
        edge.nginx()
        started.append(edge)
        for _ in range(100):
            if (tmp_path / "nginx.pid").exists():
                break
            time.sleep(0.05)
        return edge

    yield start
    for edge in started:
        edge.nginx("-s", "quit", check=False)


@pytest.mark.parametrize("routing", POLICIES)
def test_nginx_accepts_each_policy(host_data, tmp_path, routing):
    edge = Edge(host_data, tmp_path, routing, nginx_instances_down=["h1:c"])
    edge.write(down={edge.plan.upstreams[1]})
    done = edge.nginx("-t", check=False)
    assert done.returncode == 0, done.stderr


def test_one_session_goes_to_one_instance_and_none_to_least_conn(running):
    edge = running("session")
    for session in ("s-1", "s-2", "s-3", "s-4"):
        answered = {edge.post("/v1/chat/completions", {"messages": []}, {"X-Session-ID": session}) for _ in range(4)}
        assert len(answered) == 1, (session, answered)
    without = Counter(edge.post("/v1/chat/completions", {"messages": []}) for _ in range(6))
    assert len(without) == 3, without  # one upstream after the other while none has a request in flight


def test_prompts_sharing_a_prefix_go_to_one_instance(running):
    edge = running("prefix", nginx_prefix_chars=16)
    for system in ("first system prompt", "second system prompt", "a third system prompt", "yet another one"):
        answered = {edge.post("/v1/chat/completions", {"messages": [{"role": "system", "content": system},
                                                                   {"role": "user", "content": f"question {i}"}]})
                    for i in range(4)}
        assert len(answered) == 1, (system, answered)
    # No prompt (not JSON): least_conn over every instance.
    assert len(Counter(edge.post("/v1/completions", "not json") for _ in range(6))) == 3


@pytest.mark.parametrize("routing", ["session", "prefix"])
def test_a_down_instance_gets_no_request_under_any_policy(running, routing):
    edge = running(routing, nginx_instances_down=["h1:a"], nginx_prefix_chars=16)
    answered = Counter()
    for i in range(24):
        answered[edge.post("/v1/completions", {"prompt": f"prompt number {i:04d} and more"}, {"X-Session-ID": str(i)})] += 1
        answered[edge.post("/v1/completions", "no prompt")] += 1
    assert set(answered) == {"b", "c"}, answered


def test_the_prefix_redirect_counts_a_request_once_and_keeps_the_key_check(running):
    # One request a second without a burst: counted twice (before and after js_content's redirect
    # to the named location), the first request would already be refused.
    edge = running("prefix", nginx_client_rate=1, nginx_client_burst=0)
    assert edge.post("/v1/completions", {"prompt": "counted once"}) in edge.instances
    edge.key = "x" * 40
    with pytest.raises(urllib.error.HTTPError) as refused:
        edge.post("/v1/completions", {"prompt": "no key"})
    assert refused.value.code == 401
