"""The edge deployed on a load balancer, with an instance host behind it, against simulated
hosts: the secrets (client keys, the instances' internal key, the edge's TLS key, the smoke
test's key) reach the hosts only in files created root-only before a byte is written, never
through ``files.put`` and never in a command; the firewall rules are checked by nft before they
replace the rules in place; a key added takes effect with a reload, no instance restarted; and
a second run changes nothing."""

import pytest
from pyinfra.api import StringCommand

from roles import paths, secrets, site
from roles.errors import FleetConfigError
from tests.deploy.fakehost import fleet_plan, run_fleet
from tests.deploy.simhost import SimulatedHost, debian, ubuntu

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

LB = {"ssh_hostname": "10.9.0.2"}
PRIVATE = {
    paths.NGINX_SECRETS_CONF: "Install the client keys, the instances' internal key and the provider's",
    paths.EDGE_KEY: "Install the edge's TLS key",
    paths.SMOKE_KEY: "Install the smoke test's client key",
}
STAGED_RULES = f"{paths.FIREWALL_RULES}.new"


class Edge:
    """h1 (two instances) behind lb1 (nginx only), one client in a secrets folder of its own."""

    def __init__(self, host_data, tmp_path, lb_data=None, lb_distro=None):
        self.secrets = tmp_path / "secrets"
        secrets.add_client_key(self.secrets, "alice")
        self.data = {"h1": host_data(), "lb1": {**LB, **(lb_data or {})}}
        self.sims = {name: SimulatedHost(debian(12)) for name in self.data}
        self.sims["lb1"] = SimulatedHost(lb_distro or debian(12))

    def deploy(self):
        fleet = fleet_plan([("h1", self.data["h1"])], [("lb1", self.data["lb1"])], secrets_dir=self.secrets)
        return run_fleet(site.serve, fleet, hosts={name: (data, self.sims[name]) for name, data in self.data.items()})

    def keys(self) -> dict[str, str]:
        """Every secret the deploy handles, by what it is (read once the deploy made them)."""
        found = {f"client key {i}": key.reveal()
                 for i, key in enumerate(secrets.load_clients(self.secrets)["alice"].keys)}
        found["internal key"] = secrets.fleet_key(self.secrets, "internal").reveal()
        found["smoke key"] = secrets.fleet_key(self.secrets, "smoke").reveal()
        tls_key = (self.secrets / secrets.TLS_DIR / "lb1.key").read_text()
        found["TLS key"] = "".join(tls_key.splitlines()[1:-1])  # its base64 body, whichever way it is split
        return found


def ops_of(timeline, host_name):
    return [op for name, op in timeline if name == host_name]


def commands_of(timeline, host_name):
    return [c for op in ops_of(timeline, host_name) for c in op.commands]


def short(op) -> str:
    return op.name.split(" | ")[-1]


@pytest.mark.parametrize("sudo", [False, True], ids=["root", "sudo"])
def test_secrets_reach_the_load_balancer_only_through_root_only_files(host_data, tmp_path, sudo):
    edge = Edge(host_data, tmp_path, {"ssh_user": "deploy", "_sudo": True} if sudo else None)
    timeline = edge.deploy()
    lb = edge.sims["lb1"]
    for path, name in PRIVATE.items():
        [op] = [op for op in ops_of(timeline, "lb1") if short(op) == name]
        upload = f"{path}.upload"
        if sudo:  # pyinfra's own temporary file (copied from with sudo) is created 0600 as well
            install_temp, put, move = op.commands[1], op.commands[2], op.commands[3]
            temp = install_temp.split()[-1]
            assert install_temp == f'install -m 600 -o "${{SUDO_USER:-root}}" /dev/null {temp}'
            assert move == f"mv -f {upload} {path} && rm -f {temp}" and temp.startswith("/tmp/pyinfra-")
            assert op.raw[2].remote_temp_filename == temp and temp not in lb.files
        else:
            put, move = op.commands[1], op.commands[2]
            assert move == f"mv -f {upload} {path}"
        # Created empty and root-only, then written, then renamed over the file in place.
        assert op.commands[0] == f"install -m 600 /dev/null {upload}"
        assert put == f"upload <generated> -> {upload}" and len(op.commands) == (4 if sudo else 3)
        assert lb.files[path]["mode"] == 600 and lb.files[path]["user"] == "root"
        assert upload not in lb.files
    # Never through files.put: nothing else uploads to them or changes their mode.
    run = commands_of(timeline, "lb1")
    assert not [c for c in run if c.split()[-1] in PRIVATE and not c.startswith("mv -f ")]

    keys = edge.keys()
    # Every upload holding a secret, on either host (the instances' environment holds the
    # internal key), landed in a file that was already root-only.
    for name, sim in edge.sims.items():
        holding = [(dest, mode) for dest, mode, text in sim.uploads if any(key in text.replace("\n", "")
                                                                           for key in keys.values())]
        assert holding and all(mode == 600 for _, mode in holding), (name, holding)
    assert {dest for dest, _, _ in lb.uploads if dest.endswith(".upload")} == {f"{p}.upload" for p in PRIVATE}
    conf = "\n".join(lb.files[paths.NGINX_SECRETS_CONF]["lines"])
    assert f'"Bearer {keys["client key 0"]}" alice;' in conf and f'"Bearer {keys["internal key"]}"' in conf
    assert lb.files[paths.SMOKE_KEY]["lines"] == [keys["smoke key"]]
    # The certificate is public: a plain file, the fleet CA's, for the name clients use.
    assert lb.files[paths.EDGE_CERTIFICATE]["mode"] == 644
    assert lb.files[paths.EDGE_CERTIFICATE]["lines"][0] == "-----BEGIN CERTIFICATE-----"

    # No secret in any command of the whole deploy, on any host.
    for name, op in timeline:
        strings = op.commands + [c.get_raw_value() for c in op.raw if isinstance(c, StringCommand)]
        for what, key in keys.items():
            assert not [c for c in strings if key in c], f"{what} in a command of {name}: {op.name}"
    # The smoke test reached the edge as a client: its key by file, the certificate nginx serves.
    [smoked] = lb.smoked
    assert (smoked.lb_port, smoked.lb_name, smoked.lb_ca, smoked.lb_key_file) == (
        443, "10.9.0.2", paths.EDGE_CERTIFICATE, paths.SMOKE_KEY)


def test_firewall_rules_are_checked_before_they_replace_the_rules_in_place(host_data, tmp_path):
    edge = Edge(host_data, tmp_path)
    timeline = edge.deploy()
    for name, sim in edge.sims.items():
        run = commands_of(timeline, name)
        check = run.index(f"/usr/sbin/nft -c -f {STAGED_RULES}")
        assert run.index(f"upload <generated> -> {STAGED_RULES}") < check
        assert check < run.index(f"mv -f {STAGED_RULES} {paths.FIREWALL_RULES}") \
            < run.index(f"systemctl reload-or-restart {paths.FIREWALL_UNIT}")
        assert sim.checked == [STAGED_RULES] and sim.table and STAGED_RULES not in sim.files
        # Before anything on the host listens: nginx, or the first instance.
        first_service = next(c for c in run if c.startswith(("systemctl enable --now vllm@", "systemctl reload nginx")))
        assert run.index(f"systemctl reload-or-restart {paths.FIREWALL_UNIT}") < run.index(first_service)
    rules = {name: [line.strip() for line in sim.files[paths.FIREWALL_RULES]["lines"]]
             for name, sim in edge.sims.items()}
    # The instances let in the load balancer only; the load balancer lets everyone reach the edge.
    assert 'ip saddr { 10.9.0.2 } tcp dport { 8001, 8002 } accept comment "instance ports: allowed sources only ' \
           '(IPv4)"' in rules["h1"]
    assert not [r for r in rules["h1"] if "open to everyone" in r]
    assert 'tcp dport { 443 } accept comment "open to everyone"' in rules["lb1"]
    assert not [r for r in rules["lb1"] if "8001" in r]


def test_a_second_run_changes_nothing_and_reuses_the_certificate(host_data, tmp_path):
    edge = Edge(host_data, tmp_path)
    edge.deploy()
    certificate = edge.sims["lb1"].files[paths.EDGE_CERTIFICATE]["sha256"]
    issued = (edge.secrets / secrets.TLS_DIR / "lb1.pem").read_bytes()
    timeline = edge.deploy()
    assert [(name, op.name, op.commands) for name, op in timeline if op.commands] == []
    assert edge.sims["lb1"].files[paths.EDGE_CERTIFICATE]["sha256"] == certificate
    assert (edge.secrets / secrets.TLS_DIR / "lb1.pem").read_bytes() == issued


def test_a_new_client_key_is_a_reload_of_nginx_and_no_restart(host_data, tmp_path):
    edge = Edge(host_data, tmp_path)
    edge.deploy()
    new_key, _ = secrets.add_client_key(edge.secrets, "alice")  # step 1 of a rotation: a second key
    timeline = edge.deploy()
    assert [(name, short(op)) for name, op in timeline if op.commands] == [
        ("lb1", "Install the client keys, the instances' internal key and the provider's"),
        ("lb1", "Check the nginx configuration"),
        ("lb1", "Reload nginx on its new configuration")]
    assert edge.sims["h1"].restarts == [] and edge.sims["lb1"].drained == []
    conf = [line.strip() for line in edge.sims["lb1"].files[paths.NGINX_SECRETS_CONF]["lines"]]
    assert [line for line in conf if line.endswith(" alice;")] == [
        f'"Bearer {key.reveal()}" alice;' for key in secrets.load_clients(edge.secrets)["alice"].keys]
    assert f'"Bearer {new_key.reveal()}" alice;' in conf


NJS_PACKAGE = "libnginx-mod-http-js"


def test_prefix_routing_installs_njs_and_its_key_function_once(host_data, tmp_path):
    edge = Edge(host_data, tmp_path, {"nginx_routing": "prefix"})
    timeline = edge.deploy()
    lb = edge.sims["lb1"]
    assert NJS_PACKAGE in lb.packages and "/etc/nginx/modules-enabled/50-mod-http-js.conf" in lb.links
    assert "\n".join(lb.files[paths.NGINX_PREFIX_KEY]["lines"]) + "\n" == paths.PREFIX_KEY_JS.read_text()
    run = commands_of(timeline, "lb1")
    # The module and the key function are in place before the configuration importing them is checked
    # (the edge's check: the last; the artifact cache's nginx server, on the same host, is checked earlier).
    edge_check = len(run) - 1 - run[::-1].index("nginx -t -q")
    assert run.index(f"upload {paths.PREFIX_KEY_JS} -> {paths.NGINX_PREFIX_KEY}") < edge_check
    assert [c for c in run if NJS_PACKAGE in c] and run.index(next(c for c in run if NJS_PACKAGE in c)) < edge_check
    assert "js_import vllm_fleet from /etc/nginx/vllm-fleet/prefix_key.js;" in lb.files[paths.NGINX_CONF]["lines"]
    assert NJS_PACKAGE not in edge.sims["h1"].packages
    assert [(name, op.name, op.commands) for name, op in edge.deploy() if op.commands] == []


def test_least_conn_installs_no_njs_and_no_key_function(host_data, tmp_path):
    edge = Edge(host_data, tmp_path)
    timeline = edge.deploy()
    lb = edge.sims["lb1"]
    assert "nginx" in lb.packages and NJS_PACKAGE not in lb.packages and paths.NGINX_PREFIX_KEY not in lb.files
    assert not [c for c in commands_of(timeline, "lb1") if NJS_PACKAGE in c or "prefix_key" in c]


def test_leaving_prefix_routing_removes_the_key_function(host_data, tmp_path):
    edge = Edge(host_data, tmp_path, {"nginx_routing": "prefix"})
    edge.deploy()
    edge.data["lb1"] = {**LB, "nginx_routing": "session"}
    edge.deploy()
    lb = edge.sims["lb1"]
    assert paths.NGINX_PREFIX_KEY not in lb.files and not [l for l in lb.files[paths.NGINX_CONF]["lines"] if "js_" in l]


def test_prefix_routing_on_ubuntu_22_04_is_refused_before_any_change(host_data, tmp_path):
    edge = Edge(host_data, tmp_path, {"nginx_routing": "prefix"}, lb_distro=ubuntu(22, 4))
    with pytest.raises(FleetConfigError) as refused:
        edge.deploy()
    assert refused.value.field == "host lb1: `nginx_routing`"
    assert "Ubuntu 22.04's archive has no package of it" in refused.value.problem
    assert refused.value.fix == ("set nginx_routing to least_conn or session on this load balancer, or run it on "
                                 "Debian 12 or Ubuntu 24.04.")
    for sim in edge.sims.values():
        assert sim.files == {} and sim.packages == {} and sim.uploads == []


def test_the_deploy_plan_refuses_an_unknown_instance_down(host_data, tmp_path):
    edge = Edge(host_data, tmp_path, {"nginx_instances_down": ["h1:z"]})
    with pytest.raises(FleetConfigError, match=r"'h1:z' is not an instance of the fleet"):
        edge.deploy()
