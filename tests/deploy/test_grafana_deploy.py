"""The Grafana role on simulated fresh Debian 12 and Ubuntu 22.04 monitor hosts, run with the whole
fleet deploy in pyinfra's fleet-wide order: Grafana from the operator's mirror (the key checked
against its pinned fingerprint first) at the pinned version, held; its settings on loopback,
phoning nowhere; its secrets as private files that no command, operation name or log line holds;
the repository's own provisioning files and dashboard; the service sandboxed, started once and
restarted only when what it reads at its start changed; and a second run changes nothing.

No real Grafana is installed: this machine cannot reach Grafana's repository, and the lab has none."""

import configparser
import hashlib
import logging

import pytest
import yaml
from pyinfra.api import StringCommand

from roles import paths, secrets, site
from roles.paths import REPO_ROOT
from roles.plan.dashboard import DASHBOARD
from roles.plan.monitoring import PROMETHEUS_ADDRESS
from tests.deploy.fakehost import fleet_plan, run_fleet
from tests.deploy.simhost import SimulatedHost, debian, ubuntu

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

MIRROR = "https://mirror.example.internal/grafana"
FINGERPRINT = "B53AE77BADB630A683046005963FA27710458545"
GRAFANA = {"grafana_repo_url": MIRROR, "grafana_version": "12.1.1"}
UNIT = "grafana-server.service"
DISTROS = pytest.mark.parametrize("distro", [debian(12), ubuntu(22, 4)], ids=["debian12", "ubuntu2204"])


class Fleet:
    """h1 (load balancer, instances a and b) and h2 (instances a and b; the monitor and grafana groups)."""

    def __init__(self, host_data, tmp_path, distro=None, grafana_hosts=("h2",), **h2_data):
        self.secrets = tmp_path / "secrets"
        secrets.add_client_key(self.secrets, "alice")
        self.data = {"h1": host_data(), "h2": host_data(ssh_hostname="10.9.0.12", **{**GRAFANA, **h2_data})}
        self.sims = {name: SimulatedHost(distro or debian(12)) for name in self.data}
        self.grafana_hosts = grafana_hosts

    def deploy(self):
        fleet = fleet_plan(list(self.data.items()), ["h1"], secrets_dir=self.secrets, monitor_hosts=("h2",),
                           grafana_hosts=self.grafana_hosts)
        return run_fleet(site.serve, fleet, hosts={name: (data, self.sims[name]) for name, data in self.data.items()})

    def text(self, path: str, host: str = "h2") -> str:
        return "\n".join(self.sims[host].files[path]["lines"])

    def password(self) -> str:
        return secrets.grafana_admin_password(self.secrets).reveal()


def commands_of(timeline, host_name="h2") -> list[str]:
    return [c for name, op in timeline if name == host_name for c in op.commands]


def changed_ops(timeline, host_name="h2") -> list[str]:
    return [op.name.split(" | ")[-1] for name, op in timeline if name == host_name and op.commands]


def grafana_commands(timeline) -> list[str]:
    """The commands of the Grafana role's operations on h2."""
    return [c for name, op in timeline if name == "h2" and " | Grafana | " in op.name for c in op.commands]


def names_grafana(command: str, tmp_path) -> bool:
    """Whether ``command`` touches anything of Grafana (the repository's and the test's own folders,
    whose paths may hold the word, left aside)."""
    return "grafana" in command.replace(str(REPO_ROOT), "").replace(str(tmp_path), "").lower()


def index(run: list[str], text: str) -> int:
    return next(i for i, c in enumerate(run) if text in c)


def grafana_ini(fleet: Fleet) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(fleet.text(paths.GRAFANA_INI))
    return ini


@DISTROS
def test_grafana_comes_from_the_mirror_at_the_pinned_version_and_is_held(host_data, tmp_path, distro):
    fleet = Fleet(host_data, tmp_path, distro)
    timeline = fleet.deploy()
    run, h2 = grafana_commands(timeline), fleet.sims["h2"]
    assert h2.files[paths.GRAFANA_SOURCES]["lines"] == [
        "Types: deb", f"URIs: {MIRROR}/", "Suites: stable", "Components: main", f"Signed-By: {paths.GRAFANA_KEYRING}"]
    assert h2.files[paths.GRAFANA_PIN_FILE]["lines"][1:] == ["Package: grafana", "Pin: version 12.1.1",
                                                             "Pin-Priority: 1001"]
    # The key from the mirror, its fingerprint checked before it becomes the keyring, then the
    # source, the lists, and the exact version (apt stops where the mirror lacks it).
    download = index(run, f"{MIRROR}/gpg-full.key")
    check = index(run, f"grep -q '^fpr:*{FINGERPRINT}:'")
    keyring = index(run, f"gpg --dearmor --yes -o {paths.GRAFANA_KEYRING} {paths.GRAFANA_KEYRING}.asc")
    [install] = [c for c in run if "apt-get" in c and " install " in c and "grafana=12.1.1" in c.split()]
    assert index(run, " install ") < download < check < keyring < \
        run.index(f"upload <generated> -> {paths.GRAFANA_SOURCES}") < index(run, "apt-get update") < run.index(install)
    assert {"--no-install-recommends", "--allow-change-held-packages"} <= set(install.split())
    assert h2.packages["grafana"] == ["12.1.1"] and "grafana" in h2.gpu.holds and "apt-mark hold grafana" in run
    # The load balancer is no grafana host: nothing of Grafana there.
    assert not [c for c in commands_of(timeline, "h1") if names_grafana(c, tmp_path)]
    assert "grafana" not in fleet.sims["h1"].packages


def test_grafana_listens_on_loopback_and_phones_nowhere(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    ini = grafana_ini(fleet)
    assert (ini["server"]["http_addr"], ini["server"]["http_port"]) == ("127.0.0.1", "3000")
    assert "root_url" not in ini["server"]
    assert dict(ini["analytics"]) == {"reporting_enabled": "false", "check_for_updates": "false",
                                      "check_for_plugin_updates": "false", "feedback_links_enabled": "false"}
    assert ini["news"]["news_feed_enabled"] == "false" and ini["snapshots"]["external_enabled"] == "false"
    assert dict(ini["plugins"]) == {"preinstall_disabled": "true", "public_key_retrieval_disabled": "true",
                                    "plugin_admin_enabled": "false"}
    assert ini["security"]["disable_gravatar"] == "true" and ini["users"]["allow_sign_up"] == "false"
    assert ini["auth.anonymous"]["enabled"] == "false"
    # Nothing opens for it: no rule of the host firewall names its port.
    assert not [r for r in fleet.sims["h2"].files[paths.FIREWALL_RULES]["lines"] if "3000" in r or "Grafana" in r]


def test_off_loopback_grafana_is_open_to_the_allowed_sources_only(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, grafana_listen_address="10.9.0.12", grafana_port=3001,
                  grafana_allow_from=["10.20.0.0/24"], grafana_root_url="https://grafana.example.internal/")
    fleet.deploy()
    ini = grafana_ini(fleet)
    assert (ini["server"]["http_addr"], ini["server"]["http_port"]) == ("10.9.0.12", "3001")
    assert ini["server"]["root_url"] == "https://grafana.example.internal/"
    rules = [line.strip() for line in fleet.sims["h2"].files[paths.FIREWALL_RULES]["lines"] if "3001" in line]
    assert rules == ['ip saddr { 10.20.0.0/24 } tcp dport 3001 accept comment "Grafana: grafana_allow_from only '
                     '(IPv4)"']


def test_the_admin_password_reaches_grafana_through_a_private_file_alone(host_data, tmp_path, caplog, capsys):
    fleet = Fleet(host_data, tmp_path, grafana_admin_user="fleet-admin")
    with caplog.at_level(logging.DEBUG):
        timeline = fleet.deploy()
    password, key = fleet.password(), secrets.fleet_key(fleet.secrets, "grafana-secret").reveal()
    h2 = fleet.sims["h2"]
    for path, value in ((paths.GRAFANA_ADMIN_PASSWORD, password), (paths.GRAFANA_SECRET_KEY, key)):
        info = h2.files[path]
        assert (info["mode"], info["user"], info["group"], info["lines"]) == (640, "root", "grafana", [value])
        # Every upload of it landed in a file that was private already.
        assert [(dest, mode) for dest, mode, text in h2.uploads if value in text] == [(f"{path}.upload", 640)]
    # Never in a command, an operation's name or pyinfra's output.
    for name, op in timeline:
        strings = [op.name, *op.commands, *(c.get_raw_value() for c in op.raw if isinstance(c, StringCommand))]
        assert not [s for s in strings if password in s or key in s], f"a Grafana secret in {name}: {op.name}"
    output = caplog.text + "".join(capsys.readouterr())
    assert password not in output and key not in output
    # grafana.ini names the files, and holds neither secret.
    ini = grafana_ini(fleet)
    assert ini["security"]["admin_user"] == "fleet-admin"
    assert ini["security"]["admin_password"] == f"$__file{{{paths.GRAFANA_ADMIN_PASSWORD}}}"
    assert ini["security"]["secret_key"] == f"$__file{{{paths.GRAFANA_SECRET_KEY}}}"
    assert (h2.files[paths.GRAFANA_INI]["mode"], h2.files[paths.GRAFANA_INI]["group"]) == (640, "grafana")


def test_the_provisioned_files_are_the_repositorys_own(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    h2 = fleet.sims["h2"]
    providers = yaml.safe_load((paths.GRAFANA_PROVISIONING / "dashboards.yml").read_text())["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    installed = {paths.GRAFANA_PROVISIONING / "datasource.yml": paths.GRAFANA_DATASOURCES,
                 paths.GRAFANA_PROVISIONING / "dashboards.yml": paths.GRAFANA_DASHBOARD_PROVIDERS,
                 DASHBOARD: f"{dashboards_dir}/vllm-fleet.json"}
    for local, remote in installed.items():
        assert h2.files[remote]["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest(), remote
    assert {remote: (h2.files[remote]["user"], h2.files[remote]["group"], h2.files[remote]["mode"])
            for remote in installed.values()} == {paths.GRAFANA_DATASOURCES: ("root", "grafana", 640),
                                                  paths.GRAFANA_DASHBOARD_PROVIDERS: ("root", "grafana", 640),
                                                  f"{dashboards_dir}/vllm-fleet.json": ("root", "root", 644)}
    # The datasource is the Prometheus of this very host, where it listens.
    [datasource] = yaml.safe_load(fleet.text(paths.GRAFANA_DATASOURCES))["datasources"]
    assert datasource["url"] == f"http://{PROMETHEUS_ADDRESS}"


@DISTROS
def test_grafana_runs_sandboxed_and_starts_once_on_its_configuration(host_data, tmp_path, distro):
    fleet = Fleet(host_data, tmp_path, distro)
    run, h2 = grafana_commands(fleet.deploy()), fleet.sims["h2"]
    drop_in = fleet.text(f"/etc/systemd/system/{UNIT}.d/vllm-fleet-hardening.conf")
    assert "ProtectSystem=strict" in drop_in and "CapabilityBoundingSet=" in drop_in
    assert [line for line in drop_in.splitlines() if line.startswith("ReadWritePaths=")] == [
        "ReadWritePaths=/var/lib/grafana", "ReadWritePaths=/var/log/grafana"]
    assert UNIT in h2.running & h2.enabled
    # Its package leaves it stopped: it starts once, after everything it reads is in place, and
    # is not restarted at once.
    start = run.index(f"systemctl start {UNIT}")
    assert [c for c in run if UNIT in c and c.startswith("systemctl ") and "enable" not in c] == [
        f"systemctl start {UNIT}"]
    for path in (paths.GRAFANA_INI, f"{paths.GRAFANA_ADMIN_PASSWORD}.upload", paths.GRAFANA_DATASOURCES,
                 paths.GRAFANA_DASHBOARD_PROVIDERS):
        assert index(run, f"-> {path}") < start, path
    assert run.index("systemctl daemon-reload") < start


@DISTROS
def test_a_second_run_changes_nothing(host_data, tmp_path, distro):
    fleet = Fleet(host_data, tmp_path, distro)
    fleet.deploy()
    assert [(name, op.name, op.commands) for name, op in fleet.deploy() if op.commands] == []


def test_a_new_port_rewrites_the_settings_and_restarts_grafana_alone(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    fleet.data["h2"]["grafana_port"] = 3001
    timeline = fleet.deploy()
    assert changed_ops(timeline, "h1") == []
    assert changed_ops(timeline) == ["Grafana's settings", "Restart grafana-server on its new configuration"]
    assert grafana_ini(fleet)["server"]["http_port"] == "3001"


def test_a_new_dashboard_is_read_again_without_a_restart(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    dashboard = f"{paths.GRAFANA_DASHBOARDS_DIR}/vllm-fleet.json"
    fleet.sims["h2"].files[dashboard]["sha1"] = "0" * 40  # an older dashboard
    assert changed_ops(fleet.deploy()) == ["The fleet's dashboard"]


def test_a_new_version_is_installed_past_the_hold(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    fleet.data["h2"]["grafana_version"] = "12.2.0"
    timeline = fleet.deploy()
    assert changed_ops(timeline) == ["Pin Grafana to 12.2.0", "Update package lists", "Install Grafana 12.2.0"]
    assert fleet.sims["h2"].packages["grafana"] == ["12.2.0"] and "grafana" in fleet.sims["h2"].gpu.holds


def test_without_a_grafana_group_no_grafana_is_deployed(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, grafana_hosts=())
    timeline = fleet.deploy()
    for name, sim in fleet.sims.items():
        assert "grafana" not in sim.packages, name
        assert not [f for f in sim.files if "grafana" in f], name
        assert not [c for c in commands_of(timeline, name) if names_grafana(c, tmp_path)], name
    # Prometheus is still there: only Grafana is left out.
    assert "prometheus" in fleet.sims["h2"].packages
