"""The Grafana role, on the hosts of the ``grafana`` group (monitor hosts, planned in
``roles.plan.grafana``): Grafana's ``grafana`` package from the operator's mirror of Grafana's apt
repository (its key checked against the pinned fingerprint first), at the pinned version, held;
its settings (listening on loopback unless told otherwise, phoning nowhere), its administrator's
password and secret key as root-only files, the fleet's Prometheus and dashboard provisioned from
``dashboards/``, and the service sandboxed like the fleet's other packaged services.

Grafana is restarted only when what it reads at its start changed; the dashboard's JSON is not
among it: Grafana reads the provisioned folder again every minute (``updateIntervalSeconds``).
"""

from __future__ import annotations

from io import StringIO

from pyinfra.api import deploy
from pyinfra.operations import apt, files
from pyinfra.operations.util import any_changed

from roles import apt_repository, paths, secrets
from roles.plan import settings
from roles.plan.dashboard import DASHBOARD
from roles.plan.fleet import FleetPlan
from roles.plan.grafana import grafana_ini
from roles.platform import APT_INSTALL_ARGS
from roles.private_files import private_file
from roles.sandbox import sandboxed_service

PACKAGE = "grafana"
SERVICE = "grafana-server"
# The package's system user and group: it reads its configuration (root:grafana 0640, as the
# package's own scripts set every file of /etc/grafana on each upgrade: so no upgrade changes them).
SERVICE_GROUP = "grafana"


@deploy("Grafana")
def grafana_server(plan: FleetPlan, data):
    """Grafana on this grafana host (``data``: its settings), provisioned with the fleet's
    Prometheus and dashboard."""
    version = settings.value(data, "grafana_version")  # both required by the plan on grafana hosts
    repo_url = settings.value(data, "grafana_repo_url").rstrip("/")
    source = apt_repository.signed_source(
        "Grafana apt repository", key_url=f"{repo_url}/{settings.value(data, 'grafana_repo_key')}",
        fingerprint=settings.value(data, "grafana_repo_key_fingerprint"), keyring=paths.GRAFANA_KEYRING,
        sources=paths.GRAFANA_SOURCES,
        source_text=apt_repository.deb822_source(f"{repo_url}/", settings.value(data, "grafana_repo_suite"),
                                                 paths.GRAFANA_KEYRING, components=("main",)))
    pin = files.put(name=f"Pin Grafana to {version}", dest=paths.GRAFANA_PIN_FILE, src=StringIO(
        apt_repository.pin_file(PACKAGE, version, "the Grafana of the inventory, nothing newer or older.")))
    apt.update(name="Update package lists", _if=any_changed(source, pin))
    # The exact version: where the repository lacks it, apt stops rather than take another. A held
    # package moves only when asked for by name and version, as here, when grafana_version changes.
    apt.packages(name=f"Install Grafana {version}", packages=[f"{PACKAGE}={version}"], no_recommends=True,
                 extra_install_args=f"{APT_INSTALL_ARGS} --allow-change-held-packages")
    apt_repository.hold("Hold Grafana (no unattended upgrade may move it)", [PACKAGE])
    configuration = _configuration(plan, data)
    files.put(name="The fleet's dashboard", src=str(DASHBOARD), dest=f"{paths.GRAFANA_DASHBOARDS_DIR}/{DASHBOARD.name}",
              mode="644", create_remote_dir=True)
    # The drop-in's MemoryDenyWriteExecute= holds for Grafana and its Go plugins; the image
    # renderer plugin (a Chromium), which this role does not install, would need it off.
    sandboxed_service(SERVICE, *configuration, writable=(paths.GRAFANA_DATA, paths.GRAFANA_LOGS))


def _configuration(plan: FleetPlan, data) -> tuple:
    """What Grafana reads at its start, each an operation: its settings, its secrets (through
    private files alone: never files.put, a command line or pyinfra's output) and the provisioning
    of the fleet's Prometheus and dashboard folder."""
    ini = files.put(name="Grafana's settings", src=StringIO(grafana_ini(data)), dest=paths.GRAFANA_INI,
                    user="root", group=SERVICE_GROUP, mode="640")
    password = private_file(name="Grafana's administrator password", path=paths.GRAFANA_ADMIN_PASSWORD,
                            content=secrets.grafana_admin_password(plan.secrets_dir).reveal() + "\n",
                            group=SERVICE_GROUP)
    secret_key = private_file(name="Grafana's secret key", path=paths.GRAFANA_SECRET_KEY,
                              content=secrets.fleet_key(plan.secrets_dir, "grafana-secret").reveal() + "\n",
                              group=SERVICE_GROUP)
    provisioned = [files.put(name=f"Provision {what}", src=str(paths.GRAFANA_PROVISIONING / source), dest=dest,
                             user="root", group=SERVICE_GROUP, mode="640", create_remote_dir=True)
                   for what, source, dest in (("the fleet's Prometheus", "datasource.yml", paths.GRAFANA_DATASOURCES),
                                              ("the fleet's dashboards", "dashboards.yml",
                                               paths.GRAFANA_DASHBOARD_PROVIDERS))]
    return (ini, password, secret_key, *provisioned)
