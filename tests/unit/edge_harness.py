"""The edge of a one-host fleet rendered into a folder and run by the real nginx (Debian's, with its
njs module; the Makefile installs both) on loopback ports, as it would run under Debian's
nginx.conf (which includes conf.d/ inside http), with the secrets file and the TLS certificate the
deploy installs. `running` (tests/unit/conftest.py) starts one and stops it after the test."""

import json
import socket
import ssl
import subprocess
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from roles import nginx, paths, secrets
from roles.plan.edge import plan_fleet_edge
from roles.plan.fallback import plan_provider
from roles.plan.fleet import plan_fleet

NGINX = Path("/usr/sbin/nginx")
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
# Every module of tests that run nginx: pytestmark = needs_nginx.
needs_nginx = pytest.mark.skipif(not (NGINX.exists() and NJS_MODULE.exists()),
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

    def __init__(self, host_data, folder: Path, routing: str, stand_ins: bool = True, **lb_data):
        self.folder = folder
        self.stand_ins = stand_ins  # False: nothing of the edge's listens at the instances' ports
        self.port, *instance_ports = free_ports(4)
        self.instances = dict(zip("abc", instance_ports))
        data = host_data(ssh_hostname="127.0.0.1", vllm_instances=[{"name": n, "port": p}
                                                                    for n, p in self.instances.items()])
        secrets_dir = folder / "secrets"
        secrets.add_client_key(secrets_dir, "alice")
        self.data = {**data, "nginx_secrets_dir": str(secrets_dir), "nginx_listen_port": self.port,
                     "nginx_routing": routing, "nginx_client_rate": 1000, "nginx_client_burst": 1000, **lb_data}
        edges = plan_fleet_edge([("h1", self.data)], folder)
        self.plan = replace(plan_fleet([("h1", self.data)], ["h1"]), edges=edges,
                            providers=(("h1", plan_provider("h1", self.data, secrets_dir, folder)),))
        self.key = secrets.load_clients(secrets_dir)["alice"].keys[0].reveal()
        self.ca = secrets_dir / "ca" / "fleet-ca.pem"

    def write(self, down=frozenset()) -> Path:
        """nginx.conf and what it includes, the deploy's host paths moved into the folder."""
        edge = self.plan.edge("h1")
        chain, key = nginx.tls_material(edge, "h1", self.data)
        moved = {paths.NGINX_SECRETS_CONF: "secrets.conf", paths.EDGE_CERTIFICATE: "edge.pem",
                 paths.EDGE_KEY: "edge.key", paths.NGINX_PREFIX_KEY: "prefix_key.js",
                 paths.NGINX_FALLBACK_JS: "fallback.js", paths.FALLBACK_CA: "fallback-ca.pem", "/var/log/nginx/": ""}
        conf = nginx.render_conf(self.plan, "h1", self.data, down)
        for host_path, name in moved.items():
            conf = conf.replace(host_path, str(self.folder / name) + ("/" if not name else ""))
        (self.folder / "vllm-fleet.conf").write_text(conf)
        provider = self.plan.provider("h1")
        (self.folder / "secrets.conf").write_text(nginx.render_secrets(edge, self.data, provider))
        (self.folder / "edge.pem").write_text(chain)
        (self.folder / "edge.key").write_text(key)
        (self.folder / "prefix_key.js").write_text(paths.PREFIX_KEY_JS.read_text())
        (self.folder / "fallback.js").write_text(paths.FALLBACK_JS.read_text())
        if provider is not None and provider.ca is not None:
            (self.folder / "fallback-ca.pem").write_bytes(provider.ca.read_bytes())
        backends = "".join(f'    server {{ listen 127.0.0.1:{port}; location / {{ return 200 "{name}\\n"; }} }}\n'
                           for name, port in self.instances.items() if self.stand_ins)
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
        """The answer to a request through the edge: the name of the stand-in instance that took it."""
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{route}", data=data, method="POST", headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **(headers or {})})
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False  # the certificate is for the fleet's names; its CA is checked
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.read().decode().strip()
