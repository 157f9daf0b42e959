"""Packaged services in a sandbox: the unit a package ships (the distribution's Prometheus and its
exporters, Grafana's own), hardened by a drop-in (``templates/hardening.conf.j2``), running and
enabled, and restarted when its sandbox or its configuration changed."""

from __future__ import annotations

from io import StringIO

import jinja2
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from roles import paths

_HARDENING = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES), trim_blocks=True,
                                keep_trailing_newline=True,
                                undefined=jinja2.StrictUndefined).get_template("hardening.conf.j2")


def drop_in_path(unit: str) -> str:
    return f"/etc/systemd/system/{unit}.d/vllm-fleet-hardening.conf"


def sandboxed_service(service: str, *configuration, writable: tuple[str, ...] = (), hide_processes: bool = True,
                      reads_clock: bool = False, reloadable: tuple = ()) -> None:
    """The packaged ``service`` (its unit's name, without .service) sandboxed (``writable``: the
    folders it writes), running and enabled, restarted when its sandbox, arguments or
    configuration (the operations ``configuration``) changed, reloaded when only files it reads
    again on a reload (the operations ``reloadable``) did. Whether they did is known only once
    they ran: an ``_if=`` callable, never ``did_change()`` while the deploy is being prepared."""
    unit = f"{service}.service"
    sandbox = files.put(name=f"Sandbox {unit}", dest=drop_in_path(unit),
                        src=StringIO(_HARDENING.render(unit=unit, writable=writable, hide_processes=hide_processes,
                                                       reads_clock=reads_clock)),
                        create_remote_dir=True)
    systemd.daemon_reload(name="Reload systemd units", _if=sandbox.did_change)
    # The restart first: systemd.service restarts only a running service, so one that its package
    # leaves stopped (Grafana's) starts once, on its new configuration, rather than starting on it
    # and restarting at once; one its package started (Prometheus's) restarts, then is running.
    restart = any_changed(sandbox, *configuration)
    systemd.service(name=f"Restart {service} on its new configuration", service=service, running=None,
                    restarted=True, _if=restart)
    if reloadable:
        reload = any_changed(*reloadable)
        systemd.service(name=f"Reload {service} on its new configuration", service=service, running=None,
                        reloaded=True, _if=lambda: reload() and not restart())
    systemd.service(name=f"Run {service}", service=service, running=True, enabled=True)
