"""The nginx role: one least-connections upstream of every instance in the fleet, streaming-safe.

The configuration is checked with ``nginx -t`` before any reload, so a bad render never
reaches the running load balancer.
"""

from __future__ import annotations

from io import StringIO

import jinja2
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from roles import paths
from roles.plan import settings
from roles.plan.fleet import FleetPlan
from roles.platform import install_packages

# Rendered on every host's prepare and twice per rolling-update slot: loaded once.
_TEMPLATE = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES), keep_trailing_newline=True, trim_blocks=True,
                               undefined=jinja2.StrictUndefined).get_template("nginx-vllm-fleet.conf.j2")


def render_conf(plan: FleetPlan, data, down: frozenset[str] | set[str] = frozenset()) -> str:
    """The load balancer's configuration: every instance of the fleet, those in ``down``
    (ADDRESS:PORT) marked down while they restart."""
    return _TEMPLATE.render(down=down, **template_vars(plan, data))


def template_vars(plan: FleetPlan, data) -> dict:
    """What the nginx template renders from: the fleet's upstreams and this host's nginx settings."""
    return {
        "upstreams": plan.upstreams,
        "listen_port": settings.value(data, "nginx_listen_port"),
        "read_timeout": settings.value(data, "nginx_read_timeout"),
        "max_fails": settings.value(data, "nginx_max_fails"),
        "fail_timeout": settings.value(data, "nginx_fail_timeout"),
        "keepalive": settings.value(data, "nginx_keepalive"),
        "client_max_body_size": settings.value(data, "nginx_client_max_body_size"),
        "connect_timeout": settings.value(data, "nginx_connect_timeout"),
        "routes": [*settings.EDGE_ROUTES, *settings.value(data, "nginx_task_routes")],
    }


@deploy("nginx load balancer")
def load_balancer(plan: FleetPlan, data):
    install_packages("Install nginx", ["nginx"])
    default_site = files.link(name="Remove the packaged default site", path=paths.NGINX_DEFAULT_SITE, present=False)
    conf = files.put(name="Render the fleet upstream", src=StringIO(render_conf(plan, data)), dest=paths.NGINX_CONF)
    changed = any_changed(conf, default_site)
    server.shell(name="Check the nginx configuration", commands=["nginx -t"], _if=changed)
    systemd.service(name="Run nginx", service="nginx", running=True, enabled=True)
    systemd.service(name="Reload nginx on its new configuration", service="nginx", reloaded=True, _if=changed)
