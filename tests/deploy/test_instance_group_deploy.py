"""A multi-host instance (``vllm_instance_groups``) deployed on two simulated CPU hosts, in pyinfra's
own fleet-wide operation order: h1 leads the group and is the load balancer, h2 follows. The
rendezvous is checked before a stage starts, the follower starts before its leader, which waits
for it; the stages restart together in one slot of a rolling update, with the group's watchdog
stopped around each switch; a follower that cannot reach its leader, or a host with no interface
for the group's traffic, is stopped; the watchdog goes before the stages when the group goes."""

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.connectors.util import CommandOutput, OutputLine
from pyinfra.context import ctx_host, ctx_state

from roles import paths, site
from roles.files import group_watch
from tests.deploy.fakehost import fleet_plan, run_fleet
from tests.deploy.probe_args import probe_args
from tests.deploy.script_args import parsed_args
from tests.deploy.sim_group import CommandFailed
from tests.deploy.simhost import SimulatedHost, debian

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

CONF = "/etc/nginx/conf.d/vllm-fleet.conf"
ADDRESSES = {"h1": "10.9.0.11", "h2": "10.9.0.12"}
GROUP = {"name": "pp", "hosts": ["h1", "h2"], "port": 8003}
MASTER_PORT = 29500  # the group's default master_port
ENV = f"{paths.ENV_DIR}/pp.env"
WATCH = paths.GROUP_WATCH_UNIT
START = "systemctl enable --now vllm@pp"


class GroupHost(SimulatedHost):
    """A simulated host as pyinfra treats one whose command fails: the host stops there, its
    later operations do not run, the rest of the fleet goes on (``stopped``: what the failed
    command printed). A leader's /health answers only once its followers' stages run: they join it."""

    def __init__(self):
        super().__init__(debian(12))
        self.followers: dict[str, list[SimulatedHost]] = {}  # a stage this host leads (its unit) -> its followers
        self.stopped: str | None = None

    def apply_command(self, command) -> None:
        if self.stopped:
            return  # pyinfra runs nothing more on a failed host
        raw = command.get_raw_value() if isinstance(command, StringCommand) else ""
        if raw.startswith("echo ") and raw.endswith(" >&2; exit 1"):  # gates.failure: the host stops here
            self._stop(shlex.split(raw)[1])
            return
        try:
            super().apply_command(command)
        except CommandFailed as failed:
            self._stop(str(failed))

    def run(self, command: str):
        if self.stopped:
            return False, CommandOutput([])
        argv = shlex.split(command) if command.startswith("python3 ") else []
        if argv[:3] == ["python3", paths.FLEET_PROBE_PATH, "wait"]:
            unit = probe_args(argv).unit
            if absent := [f for f in self.followers.get(unit, ()) if f"{unit}.service" not in f.running]:
                self.waited.append(unit)
                # fleet_probe wait times out (vllm_start_timeout): the leader waits for every stage.
                self._stop(f"{unit} did not become healthy: {len(absent)} follower stage(s) never joined")
                return False, CommandOutput([OutputLine("stderr", self.stopped)])
        return super().run(command)

    def _stop(self, reason: str) -> None:
        """What pyinfra does with a host whose command failed: it fails the host (the rollout and
        the report see it) and runs none of its later operations."""
        self.stopped = reason
        run, me = ctx_state.get(), ctx_host.get()
        run.failed_hosts.add(me)
        run.active_hosts.discard(me)
        for op_hash, op_data in list(run.ops[me].items()):
            if not op_data.operation_meta.is_complete():
                del run.ops[me][op_hash]


class GroupFleet:
    """h1 (the group's leader, and nginx) and h2 (its follower), on one release, serving one
    instance of the tiny model over both: ``pp``, pipeline-parallel 2."""

    def __init__(self, host_data, group: dict = GROUP, **data):
        self.host_data, self.extra = host_data, data
        self.group: dict | None = group
        self.instances: list[dict] | None = None  # plain instances, once the group is gone
        self.sims = {name: GroupHost() for name in ADDRESSES}
        self.sims["h1"].followers = {"vllm@pp": [self.sims["h2"]]}
        self.lock_digest = None

    @property
    def data(self) -> dict[str, dict]:
        return {name: self.host_data(vllm_instances=self.instances, ssh_hostname=address, vllm_cpu_cores="0-3",
                                     **({"vllm_instance_groups": [self.group]} if self.group else {}), **self.extra)
                for name, address in ADDRESSES.items()}

    def plan(self):
        fleet = fleet_plan(list(self.data.items()), ["h1"])
        if self.lock_digest is None:
            return fleet
        # Another release is another lock digest, hence another venv on the hosts.
        return dataclasses.replace(fleet, hosts=tuple(
            dataclasses.replace(h, lock=dataclasses.replace(h.lock, digest=self.lock_digest)) for h in fleet.hosts))

    def deploy(self):
        for sim in self.sims.values():
            sim.restarts.clear()
            sim.stopped = None  # a new run: every host goes again
        return run_fleet(site.serve, self.plan(), hosts={n: (d, self.sims[n]) for n, d in self.data.items()})


def steps(timeline):
    """(host, short operation name) of the operations that ran commands, in order."""
    return [(name, op.name.split(" | ")[-1]) for name, op in timeline if op.commands]


def first(timeline, host: str, text: str) -> int | None:
    """The place in the run of the first operation on ``host`` with a command holding ``text``."""
    return next((i for i, (name, op) in enumerate(timeline) if name == host and any(text in c for c in op.commands)),
                None)


def op_named(timeline, host: str, text: str):
    return next(op for name, op in timeline if name == host and text in op.name)


def env_of(sim) -> dict[str, str]:
    return {key: value.strip('"') for key, _, value in (line.partition("=") for line in sim.files[ENV]["lines"]
                                                        if not line.startswith("#"))}


def exec_start(sim, unit_file: str) -> list[str]:
    line = next(line for line in sim.files[unit_file]["lines"] if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def upstreams(sim):
    """The upstream servers of nginx's configuration (not its server blocks)."""
    return [line.strip() for line in sim.files[CONF]["lines"] if line.strip().startswith("server ")
            and "max_fails=" in line]


def test_first_deploy_checks_the_rendezvous_then_starts_the_follower_before_its_leader(host_data):
    fleet = GroupFleet(host_data)
    h1, h2 = fleet.sims["h1"], fleet.sims["h2"]
    h2.interface = "ens5"  # each host's own, as `ip` names it there
    timeline = fleet.deploy()
    assert h1.stopped is None and h2.stopped is None

    # The preflight on both hosts before either stage starts; the follower first, then its leader.
    listen, reach = first(timeline, "h1", "fleet_probe.py listen"), first(timeline, "h2", "fleet_probe.py reach")
    start1, start2 = first(timeline, "h1", START), first(timeline, "h2", START)
    assert None not in (listen, reach, start1, start2)
    assert listen < reach < start2 < start1
    assert [(a.command, a.address, a.port, a.peers) for a in h1.rendezvous] == [("listen", "10.9.0.11", MASTER_PORT, 1)]
    assert [(a.command, a.address, a.port) for a in h2.rendezvous] == [("reach", "10.9.0.11", MASTER_PORT)]

    # The leader's start waits for its /health (which answers once h2 joined); the follower's does not.
    assert h1.waited == ["vllm@pp"] and h2.waited == []
    assert any(c == "function run_logged" for c in timeline[start1][1].commands)
    assert not any("wait" in c or c.startswith("function") for c in timeline[start2][1].commands)

    env1, env2 = env_of(h1), env_of(h2)
    assert "VLLM_API_KEY" in env1 and "VLLM_API_KEY" not in env2
    assert "--headless" in env2["ENGINE_ARGS"].split() and "--headless" not in env1["ENGINE_ARGS"].split()
    assert (env1["GLOO_SOCKET_IFNAME"], env2["GLOO_SOCKET_IFNAME"]) == ("eth0", "ens5")
    assert (env1["VLLM_HOST_IP"], env2["VLLM_HOST_IP"]) == ("10.9.0.11", "10.9.0.12")
    for env in (env1, env2):
        args = env["ENGINE_ARGS"].split()
        assert args[args.index("--master-addr") + 1] == "10.9.0.11"
        assert args[args.index("--master-port") + 1] == str(MASTER_PORT)

    watch_args = {}
    for name, sim in fleet.sims.items():
        assert exec_start(sim, paths.UNIT_FILE)[1] == paths.VLLM_SERVE_PATH and paths.VLLM_SERVE_PATH in sim.files
        assert "vllm@pp.service" in sim.running and "vllm@pp.service" in sim.enabled
        assert WATCH in sim.running and WATCH in sim.enabled and paths.GROUP_WATCH_PATH in sim.files
        command = exec_start(sim, paths.GROUP_WATCH_UNIT_FILE)
        assert command[:2] == ["/usr/bin/python3", paths.GROUP_WATCH_PATH]
        watch_args[name] = parsed_args(group_watch.main, command[2:])
    leader, follower = watch_args["h1"], watch_args["h2"]
    assert (leader.role, leader.name, leader.address, leader.port) == ("leader", "pp", "10.9.0.11", 8003)
    assert leader.hang_timeout == 60 and "--hang-timeout" in exec_start(h1, paths.GROUP_WATCH_UNIT_FILE)
    assert (follower.role, follower.name, follower.leader_address, follower.leader_port) == \
        ("follower", "pp", "10.9.0.11", 8003)

    # nginx sends the group's traffic to its leader only: a follower serves no API.
    assert [line.split()[1] for line in upstreams(h1)] == ["10.9.0.11:8003"]

    assert steps(fleet.deploy()) == []
    assert h1.rendezvous[1:] == [] and h2.rendezvous[1:] == []


@pytest.mark.parametrize("change", ["upgrade", "setting"])
def test_the_stages_restart_together_in_one_slot_with_the_watchdog_stopped_around_them(host_data, change):
    fleet = GroupFleet(host_data)
    h1, h2 = fleet.sims["h1"], fleet.sims["h2"]
    fleet.deploy()
    if change == "upgrade":
        fleet.lock_digest = "b" * 64
    else:
        fleet.group = {**GROUP, "max_num_seqs": 4}  # a per-instance setting of the group's instance
    timeline = fleet.deploy()
    assert h1.stopped is None and h2.stopped is None

    assert [s for s in steps(timeline) if "Rolling update" in s[1]] == [
        ("h1", "Rolling update slot 1/1: out of nginx, drained"),
        ("h1", "Rolling update slot 1/1: switch, restart, prove (or put back)"),
        ("h2", "Rolling update slot 1/1: switch, restart, prove (or put back)"),
        ("h1", "Rolling update slot 1/1: back into nginx"),
    ]
    assert h1.drained == [["10.9.0.11:8003"]] and h2.drained == []
    assert h1.restarts == ["pp"] and h2.restarts == ["pp"]
    # The follower is proved through its leader; neither stage's watchdog runs while they switch.
    [(switch1, watched1)], [(switch2, watched2)] = h1.switches, h2.switches
    assert switch1.leader is None and switch2.leader == "10.9.0.11:8003"
    assert not watched1 and not watched2
    for name, sim in fleet.sims.items():
        [command] = [c for c in op_named(timeline, name, "switch, restart").raw if isinstance(c, FunctionCommand)]
        wrapped = command.args[2]
        assert wrapped.startswith(f"systemctl stop {WATCH}; python3 {paths.FLEET_PROBE_PATH} switch --name pp ")
        assert wrapped.endswith(f"; switched=$?; systemctl start {WATCH}; exit $switched")
        assert WATCH in sim.running
        if change == "setting":
            assert "--max-num-seqs 4" in env_of(sim)["ENGINE_ARGS"]

    report = json.loads(Path(".cache/rollout-report.json").read_text())
    assert report["halted"] is None
    assert {i["instance"]: i.get("outcome") for i in report["instances"]} == {"h1:pp": "switched", "h2:pp": "switched"}
    assert not any(" down;" in line for line in upstreams(h1))
    assert steps(fleet.deploy()) == []


def test_a_follower_that_cannot_reach_the_master_port_stops_and_no_stage_starts(host_data):
    fleet = GroupFleet(host_data)
    h1, h2 = fleet.sims["h1"], fleet.sims["h2"]
    h2.reach_ok = False
    timeline = fleet.deploy()

    # The follower is stopped at its preflight, naming the leader's address and master port.
    assert h2.stopped is not None
    assert f"10.9.0.11:{MASTER_PORT} (master_port)" in h2.stopped and "its leader h1" in h2.stopped
    assert [name for name, op in timeline if "followers reach the leader's master port" in op.name
            and op.commands] == ["h2"]
    assert first(timeline, "h2", START) is None and ENV not in h2.files and "vllm@pp.service" not in h2.running
    # Its message says "nothing of the group was started": nor should its leader be, which would wait
    # for a follower that never comes.
    assert first(timeline, "h1", START) is None, \
        f"h1 started its stage after h2's preflight failed, and {'stopped: ' + h1.stopped if h1.stopped else 'ran on'}"
    assert "vllm@pp.service" not in h1.running and ENV not in h1.files
    assert "its instance group pp lost h2 in this run" in h1.stopped


def test_a_stage_without_an_interface_for_the_group_is_stopped(host_data):
    fleet = GroupFleet(host_data)
    h2 = fleet.sims["h2"]
    h2.interface = ""  # no interface holds h2's address
    timeline = fleet.deploy()

    assert h2.stopped is not None and "vllm_group_interface is unset" in h2.stopped
    assert "10.9.0.12" in h2.stopped and "instance group pp" in h2.stopped
    assert first(timeline, "h2", START) is None and ENV not in h2.files


def test_a_set_group_interface_is_used_without_asking_the_host(host_data):
    fleet = GroupFleet(host_data, vllm_group_interface="ens7")
    for sim in fleet.sims.values():
        sim.interface = ""  # not asked: an `ip` fact here would stop the host
    fleet.deploy()
    for sim in fleet.sims.values():
        assert sim.stopped is None and env_of(sim)["GLOO_SOCKET_IFNAME"] == "ens7"


def test_the_watchdog_goes_before_the_stages_when_the_group_does(host_data):
    fleet = GroupFleet(host_data)
    fleet.deploy()
    fleet.group, fleet.instances = None, [{"name": "a", "port": 8001}]
    timeline = fleet.deploy()

    names = [(name, op.name.split(" | ")[-1]) for name, op in timeline if op.commands]
    stop_watch = [names.index((h, "Stop the instance group's watchdog (no group on this host any more)"))
                  for h in ADDRESSES]
    stop_stage = [names.index((h, "Stop vllm@pp (no longer in the inventory)")) for h in ADDRESSES]
    # Every host's watchdog first: a follower's would start its stage again when its leader stops.
    assert max(stop_watch) < min(stop_stage)
    for sim in fleet.sims.values():
        assert sim.stopped is None
        assert WATCH not in sim.running and WATCH not in sim.enabled
        assert paths.GROUP_WATCH_UNIT_FILE not in sim.files and paths.GROUP_WATCH_UNIT_FILE not in sim.loaded_units
        assert "vllm@pp.service" not in sim.running and "vllm@a.service" in sim.running
    assert steps(fleet.deploy()) == []
