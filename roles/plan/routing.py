"""How the edge chooses an instance (``nginx_routing``), and the instances every load balancer
keeps out of its upstreams (``nginx_instances_down``), checked before any host is touched.

``nginx_instances_down`` names instances as HOST:INSTANCE, the way the rollout report does; nginx
marks them ``down`` on top of those a rolling update takes out, so a maintenance or a benchmark of
one instance alone behind the edge survives every deploy until the setting changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from roles.errors import FleetConfigError
from roles.plan import settings

if TYPE_CHECKING:
    from roles.plan.fleet import FleetPlan

# The policies that hash a key; least_conn hashes nothing. Where a request has no key it goes to
# the least_conn upstream (the nginx template's map).
HASH_KEYS = {"session": "$http_x_session_id", "prefix": "$vllm_fleet_prefix_key"}


def held_down(plan: FleetPlan, data: Mapping[str, Any]) -> frozenset[str]:
    """The upstreams (ADDRESS:PORT) load balancer ``data``'s nginx_instances_down keeps out."""
    endpoints = plan.instance_endpoints
    return frozenset(endpoints[entry] for entry in settings.value(data, "nginx_instances_down"))


def check_instances_down(plan: FleetPlan, lb_hosts: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """Every load balancer's nginx_instances_down names instances of the fleet and leaves one in:
    with all of them down the edge would answer 503 to every request."""
    endpoints = plan.instance_endpoints
    for lb_name, data in lb_hosts:
        entries = settings.value(data, "nginx_instances_down")
        field = f"host {lb_name}: `nginx_instances_down`"
        for index, entry in enumerate(entries):
            if entry not in endpoints:
                raise FleetConfigError(f"{field}[{index}]", f"{entry!r} is not an instance of the fleet.",
                                       f"name instances as HOST:INSTANCE, one of {', '.join(endpoints)}.")
        if set(endpoints) <= set(entries):
            raise FleetConfigError(field, "marks every instance of the fleet down: the edge would answer 503 "
                                   "to every request.", "leave at least one instance out of the list.")
