"""The nginx role: the fleet's edge. TLS, client keys, per-client limits and a route allowlist in
front of every instance, streaming-safe; the routing policy (``nginx_routing``) picks the instance:
the fewest requests in flight, or one session or one prompt prefix to one instance.

The configuration is checked with ``nginx -t`` before any reload, so a bad render never
reaches the running load balancer. A reload is graceful: a key added or removed takes effect
without restarting an instance or dropping a request in flight.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from io import StringIO

import jinja2
from pyinfra import host, state
from pyinfra.api import StringCommand, deploy, operation
from pyinfra.facts.server import Command, LinuxDistribution
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from roles import paths, platform, secrets
from roles.common import endpoint
from roles.plan import edge, fallback, forms, routing, settings
from roles.plan.edge import Client, EdgePlan
from roles.plan.fallback import FALLBACK_ROUTES, Provider
from roles.plan.fleet import FleetPlan
from roles.plan.monitoring import STUB_STATUS_PORT
from roles.private_files import private_file

# Rendered on every host's prepare and twice per rolling-update slot: loaded once.
_TEMPLATE = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES), keep_trailing_newline=True, trim_blocks=True,
                               undefined=jinja2.StrictUndefined).get_template("nginx-vllm-fleet.conf.j2")
# The client name the deploy's own smoke test is logged as.
SMOKE_CLIENT = "vllm-fleet-smoke"


@dataclass(frozen=True)
class LimitClass:
    """Clients that share one limit, so share one nginx zone (each counted under its own name)."""

    clients: tuple[str, ...]
    rate: int = 0
    burst: int = 0
    concurrency: int = 0


def edge_clients(plan: EdgePlan, data) -> list[Client]:
    """The operator's clients, and the smoke test's (with the default limits)."""
    smoke = Client(SMOKE_CLIENT, (secrets.fleet_key(plan.secrets_dir, "smoke"),),
                   rate=settings.value(data, "nginx_client_rate"), burst=settings.value(data, "nginx_client_burst"),
                   concurrency=settings.value(data, "nginx_client_concurrency"))
    return [*plan.clients, smoke]


def limit_classes(clients: list[Client]) -> tuple[list[LimitClass], list[LimitClass]]:
    """Rate classes (rate, burst) and concurrency classes, in a stable order."""
    rates: dict[tuple[int, int], list[str]] = {}
    conns: dict[int, list[str]] = {}
    for client in clients:
        rates.setdefault((client.rate, client.burst), []).append(client.name)
        conns.setdefault(client.concurrency, []).append(client.name)
    return ([LimitClass(tuple(names), rate=rate, burst=burst) for (rate, burst), names in sorted(rates.items())],
            [LimitClass(tuple(names), concurrency=n) for n, names in sorted(conns.items())])


def render_secrets(plan: EdgePlan, data, provider: Provider | None = None) -> str:
    """The root-only part of the configuration: each key to its client's name, the key nginx
    sends to the instances, and the fallback provider's. Keys passed the plan's form (letters,
    digits and ._~+/=-): no quoting is needed, and none could end the string."""
    lines = ["# Managed by vllm-fleet. Client keys and the instances' internal key: root-only.",
             "map $http_authorization $vllm_fleet_client {", '    default "";']
    lines += [f'    "Bearer {key.reveal()}" {client.name};' for client in edge_clients(plan, data) for key in client.keys]
    internal = secrets.fleet_key(plan.secrets_dir, "internal").reveal()
    lines += ["}", "map $http_authorization $vllm_fleet_upstream_authorization {",
              f'    default "Bearer {internal}";', "}"]
    if provider is not None:
        lines += ["map $http_authorization $vllm_fleet_fallback_authorization {",
                  f'    default "Bearer {provider.key.reveal()}";', "}"]
    return "\n".join(lines) + "\n"


def render_conf(plan: FleetPlan, lb_name: str, data, down: frozenset[str] | set[str] = frozenset()) -> str:
    """Load balancer ``lb_name``'s configuration: every instance of the fleet, those in ``down``
    (ADDRESS:PORT) marked down while they restart, and those of nginx_instances_down always (so
    that a rolling update's put-back leaves them out)."""
    held = routing.held_down(plan, data)
    return _TEMPLATE.render(down=held | set(down), held=held, **template_vars(plan, lb_name, data))


def template_vars(plan: FleetPlan, lb_name: str, data) -> dict:
    """What the nginx template renders from: the fleet's upstreams and clients, and this host's nginx settings."""
    rate_classes, concurrency_classes = limit_classes(edge_clients(plan.edge(lb_name), data))
    provider = plan.provider(lb_name)
    return {
        "upstreams": plan.upstreams,
        "secrets_conf": paths.NGINX_SECRETS_CONF,
        "certificate": paths.EDGE_CERTIFICATE,
        "certificate_key": paths.EDGE_KEY,
        "rate_classes": rate_classes,
        "concurrency_classes": concurrency_classes,
        "server_name": edge.server_name(lb_name, data),
        "listen_port": settings.value(data, "nginx_listen_port"),
        "http_redirect_port": settings.value(data, "nginx_http_redirect_port"),
        "stub_status_port": STUB_STATUS_PORT if plan.monitoring else None,
        "read_timeout": settings.value(data, "nginx_read_timeout"),
        "max_fails": settings.value(data, "nginx_max_fails"),
        "fail_timeout": settings.value(data, "nginx_fail_timeout"),
        "keepalive": settings.value(data, "nginx_keepalive"),
        "client_max_body_size": settings.value(data, "nginx_client_max_body_size"),
        "connect_timeout": settings.value(data, "nginx_connect_timeout"),
        "routes": [*forms.EDGE_ROUTES, *settings.value(data, "nginx_task_routes")],
        "routing": settings.value(data, "nginx_routing"),
        "hash_key": routing.HASH_KEYS.get(settings.value(data, "nginx_routing")),
        "prefix_chars": settings.value(data, "nginx_prefix_chars"),
        "prefix_key_js": paths.NGINX_PREFIX_KEY,
        "served_model_name": plan.served_model_name,
        "body_in_memory": provider is not None or settings.value(data, "nginx_routing") == "prefix",
        "provider": provider,
        "caps": instance_caps(plan, data) if provider is not None and provider.mode == "overflow" else {},
        "fallback_routes": FALLBACK_ROUTES,
        "fallback_js": paths.NGINX_FALLBACK_JS,
        "fallback_ca": fallback_ca_path(provider) if provider is not None else None,
    }


def instance_caps(plan: FleetPlan, data) -> dict[str, int]:
    """Each instance's cap in overflow mode, by the address nginx reaches it at."""
    return {endpoint(h.address, i.port): fallback.instance_cap(data, i.fit.max_num_seqs)
            for h in plan.hosts for i in h.serving}


def edge_packages(data, provider: Provider | None) -> list[str]:
    """What this load balancer installs: nginx; the njs module only where the prefix policy or the
    fallback needs it (nothing else runs in nginx otherwise); the system's CAs where the fallback
    provider's certificate is checked against them. Refuses a distribution without the module."""
    packages = ["nginx"]
    routing = settings.value(data, "nginx_routing")
    if routing == "prefix" or provider is not None:
        setting, value = ("nginx_routing", routing) if routing == "prefix" else ("nginx_fallback", provider.mode)
        packages.append(platform.njs_package(host.name, host.get_fact(LinuxDistribution), setting, value))
    if provider is not None and provider.ca is None:
        packages.append("ca-certificates")
    return packages


def tls_material(plan: EdgePlan, lb_name: str, data) -> tuple[str, str]:
    """This load balancer's certificate chain and key (PEM): the operator's, or one the fleet's
    own CA issues for the names clients reach it at."""
    if plan.certificate is not None:
        return plan.certificate.read_text(), secrets.read_secret_file(plan.key).reveal()
    names = list(dict.fromkeys([edge.server_name(lb_name, data), data.get("ssh_hostname") or lb_name, lb_name]))
    chain, key = secrets.edge_certificate(plan.secrets_dir, lb_name, names)
    return chain.decode(), key.reveal()


@deploy("nginx load balancer")
def load_balancer(plan: FleetPlan, data):
    provider = plan.provider(host.name)
    packages = edge_packages(data, provider)
    platform.install_packages(f"Install {' and '.join(packages)}", packages)
    keepalive_sysctls(data)
    default_site = files.link(name="Remove the packaged default site", path=paths.NGINX_DEFAULT_SITE, present=False)
    private_dir = files.directory(name=f"Directory {paths.NGINX_PRIVATE_DIR} (root-only)",
                                  path=paths.NGINX_PRIVATE_DIR, user="root", group="root", mode="700")
    edge_plan = plan.edge(host.name)
    chain, key = tls_material(edge_plan, host.name, data)
    certificate = files.put(name="Install the edge's certificate", src=StringIO(chain), dest=paths.EDGE_CERTIFICATE,
                            mode="644")
    tls_key = private_file(name="Install the edge's TLS key", path=paths.EDGE_KEY, content=key)
    fallback_changed = fallback_files(provider)
    keys = private_file(name="Install the client keys, the instances' internal key and the provider's",
                        path=paths.NGINX_SECRETS_CONF, content=render_secrets(edge_plan, data, provider))
    private_file(name="Install the smoke test's client key", path=paths.SMOKE_KEY,
                 content=secrets.fleet_key(edge_plan.secrets_dir, "smoke").reveal() + "\n")
    # In place before the configuration that imports it is checked; gone with the prefix policy.
    if settings.value(data, "nginx_routing") == "prefix":
        prefix_key = files.put(name="Install the prefix policy's key function", src=str(paths.PREFIX_KEY_JS),
                               dest=paths.NGINX_PREFIX_KEY, mode="644")
    else:
        prefix_key = files.file(name="Remove the prefix policy's key function", path=paths.NGINX_PREFIX_KEY,
                                present=False)
    conf = files.put(name="Render the fleet's edge", src=StringIO(render_conf(plan, host.name, data)),
                     dest=paths.NGINX_CONF)
    changed = any_changed(conf, default_site, private_dir, certificate, tls_key, keys, prefix_key, *fallback_changed)
    server.shell(name="Check the nginx configuration", commands=["nginx -t -q"], _if=changed)
    systemd.service(name="Run nginx", service="nginx", running=True, enabled=True)
    systemd.service(name="Reload nginx on its new configuration", service="nginx", reloaded=True, _if=changed)


def keepalive_sysctls(data) -> None:
    """TCP keepalive timing (nginx_dead_peer_timeout) for nginx's sockets to the instances, in
    force now and at boot; the kernel reads it whenever a timer is set, so open connections follow
    without a reload. Global to the host's network namespace: any other socket that asks for
    keepalive gets it too."""
    probes = fallback.keepalive_probes(settings.value(data, "nginx_dead_peer_timeout"))
    text = "# Managed by vllm-fleet: nginx_dead_peer_timeout (roles/plan/fallback.py).\n" + "".join(
        f"{name} = {value}\n" for name, value in probes.items())
    sysctl_file = files.put(name="TCP keepalive timing for connections to the instances", src=StringIO(text),
                            dest=paths.KEEPALIVE_SYSCTL, mode="644")
    server.shell(name="Apply the TCP keepalive timing", commands=[f"sysctl -q -p {paths.KEEPALIVE_SYSCTL}"],
                 _if=sysctl_file.did_change)


def fallback_files(provider: Provider | None) -> list:
    """The fallback's body function, the CAs its provider's certificate must chain to (the
    operator's; else the system's, nothing to install) and the provider's key for the probe; each
    removed when there is no provider. The provider must accept the key before nginx is given it."""
    if provider is None:
        return [files.file(name=f"Remove {path} (no fallback provider)", path=path, present=False)
                for path in (paths.NGINX_FALLBACK_JS, paths.FALLBACK_CA, paths.FALLBACK_KEY, paths.PROVIDER_PROBE_PATH)]
    ops = [files.put(name="Install the fallback's body function", src=str(paths.FALLBACK_JS),
                     dest=paths.NGINX_FALLBACK_JS, mode="644"),
           files.put(name="Install the fallback provider's probe", src=str(paths.PROVIDER_PROBE),
                     dest=paths.PROVIDER_PROBE_PATH, mode="755"),
           private_file(name="Install the fallback provider's key", path=paths.FALLBACK_KEY,
                        content=provider.key.reveal() + "\n")]
    if provider.ca is not None:
        ops.append(files.put(name="Install the CAs of the fallback provider", src=str(provider.ca),
                             dest=paths.FALLBACK_CA, mode="644"))
    else:
        ops.append(files.file(name=f"Remove {paths.FALLBACK_CA} (the system's CAs check the provider)",
                              path=paths.FALLBACK_CA, present=False))
    check_provider(name="Check the fallback provider from this load balancer", provider=provider)
    return ops


def fallback_ca_path(provider: Provider) -> str:
    """Where, on the load balancer, the CAs are that the provider's certificate must chain to:
    the operator's (installed by ``fallback_files``), else the system's."""
    return paths.FALLBACK_CA if provider.ca is not None else paths.SYSTEM_CA_BUNDLE


def provider_probe_command(provider: Provider) -> str:
    """The provider probe on this load balancer, with the CAs nginx checks the provider against."""
    return shlex.join(["python3", paths.PROVIDER_PROBE_PATH, "--models-url", provider.models_url, "--ca",
                       fallback_ca_path(provider), "--key-file", paths.FALLBACK_KEY, "--model", provider.model])


@operation()
def check_provider(provider: Provider):
    """Refuse a provider that refuses the key, lists no such model or whose certificate does not
    chain to the CAs, before nginx is given the key; a provider that cannot be reached now is
    said loudly and the deploy goes on (the smoke test says it again)."""
    if not state.is_executing:
        return
    result = json.loads(host.get_fact(Command, command=provider_probe_command(provider)))
    if result["ok"]:
        host.log_styled(f"fallback provider {provider.authority} accepts the key and serves {provider.model}",
                        fg="green")
    elif not result["reachable"]:
        host.log_styled(f"WARNING fallback provider not checked: {result['problem']}; requests that fall back "
                        "will fail until it answers", fg="yellow", bold=True)
    else:
        problem = f"host {host.name}: `nginx_fallback_url`: {result['problem']}. Fix the key (vllm-fleet keys " \
                  "fallback), nginx_fallback_model or nginx_fallback_ca; nginx was not given the key."
        yield StringCommand(f"echo {shlex.quote(problem)} >&2; exit 1")

