"""Rolling updates across simulated hosts, in pyinfra's own fleet-wide operation order: one
instance at a time out of nginx, switched, proven and back; a canary that fails stops the
rollout; a new release's parser refusing the flags stops it before any instance is touched."""

import dataclasses

import pytest

from roles import site
from roles.errors import FleetConfigError
from roles.plan.fleet import check_run_limit, plan_fleet
from roles.rollout import Member, schedule, slot_count
from tests.deploy.fakehost import fleet_plan, run_fleet
from tests.deploy.simhost import SimulatedHost, debian

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

CONF = "/etc/nginx/conf.d/vllm-fleet.conf"


def members(*names):
    return [Member("h", n, 8000 + i, "10.0.0.1") for i, n in enumerate(names)]


def test_canary_goes_alone_then_batches():
    a, b, c, d, e = members("a", "b", "c", "d", "e")
    assert schedule([a, b, c, d, e], 2) == [[a], [b, c], [d, e]]
    assert schedule([a, b, c], 1) == [[a], [b], [c]]
    assert schedule([], 3) == []
    assert [slot_count(n, 2) for n in (0, 1, 2, 3, 4, 5)] == [0, 1, 2, 2, 3, 3]


def test_a_multi_host_instance_moves_as_one_slot():
    a, b = members("a", "b")
    leader, follower = Member("h1", "pp", 8003, "10.0.0.1", "pp", True), Member("h2", "pp", 8003, "10.0.0.2", "pp", False)
    assert schedule([a, leader, follower, b], 1) == [[a], [leader, follower], [b]]
    assert schedule([leader, follower, a, b], 2) == [[leader, follower], [a, b]]
    assert schedule([a, follower, b, leader], 2) == [[a], [follower, leader, b]]


class Fleet:
    """Two CPU hosts, h1 (instances a and b, and nginx) and h2 (instance a), on one release."""

    def __init__(self, host_data, **data):
        self.data = {"h1": host_data(**data),
                     "h2": host_data(ssh_hostname="10.9.0.12", vllm_instances=[{"name": "a", "port": 8001}], **data)}
        self.sims = {name: SimulatedHost(debian(12)) for name in self.data}
        self.lock_digest = None
        self.upgraded = {"h1", "h2"}  # hosts the new release is pinned on

    def plan(self):
        fleet = fleet_plan(list(self.data.items()), ["h1"])
        if self.lock_digest is None:
            return fleet
        # Another release is another lock digest, hence another venv on the hosts.
        hosts = tuple(dataclasses.replace(h, lock=dataclasses.replace(h.lock, digest=self.lock_digest))
                      if h.name in self.upgraded else h for h in fleet.hosts)
        return dataclasses.replace(fleet, hosts=hosts)

    def deploy(self):
        for sim in self.sims.values():
            sim.restarts.clear()
        return run_fleet(site.serve, self.plan(), hosts={n: (d, self.sims[n]) for n, d in self.data.items()})

    def venv(self, name="h1"):
        return self.plan().host(name).venv_dir

    def links(self):
        return {(h, inst): sim.links.get(f"/opt/vllm-fleet/instances/{inst}")
                for h, sim in self.sims.items() for inst in ("a", "b") if h == "h1" or inst == "a"}


def steps(timeline):
    """(host, short operation name) of the operations that ran commands, in order."""
    return [(name, op.name.split(" | ")[-1]) for name, op in timeline if op.commands]


def reports(timeline):
    """The commands of each host's fleet release report: a failure command where the rollout stopped."""
    return {name: op.commands for name, op in timeline if op.name.endswith("Fleet release report")}


def installed(sim):
    return {f.rsplit("/", 1)[0] for f in sim.files if f.endswith("/.lock-digest")}


def upstreams(sim):
    return [line.strip() for line in sim.files[CONF]["lines"] if line.strip().startswith("server ")]


def test_upgrade_restarts_one_instance_at_a_time_across_hosts_out_of_nginx(host_data):
    fleet = Fleet(host_data)
    fleet.deploy()
    old = fleet.venv()
    fleet.lock_digest = "b" * 64
    timeline = fleet.deploy()
    new = fleet.venv()

    rolling = [s for s in steps(timeline) if "Rolling update" in s[1]]
    assert rolling == [
        ("h1", "Rolling update slot 1/3: out of nginx, drained"),
        ("h1", "Rolling update slot 1/3: switch, restart, prove (or put back)"),
        ("h1", "Rolling update slot 1/3: back into nginx"),
        ("h1", "Rolling update slot 2/3: out of nginx, drained"),
        ("h1", "Rolling update slot 2/3: switch, restart, prove (or put back)"),
        ("h1", "Rolling update slot 2/3: back into nginx"),
        ("h1", "Rolling update slot 3/3: out of nginx, drained"),
        ("h2", "Rolling update slot 3/3: switch, restart, prove (or put back)"),
        ("h1", "Rolling update slot 3/3: back into nginx"),
    ]
    assert fleet.sims["h1"].drained == [["10.9.0.11:8001"], ["10.9.0.11:8002"], ["10.9.0.12:8001"]]
    assert fleet.sims["h2"].drained == []
    assert fleet.sims["h1"].restarts == ["a", "b"] and fleet.sims["h2"].restarts == ["a"]
    assert set(fleet.links().values()) == {new} and old != new
    for sim in fleet.sims.values():
        assert sim.links["/opt/vllm-fleet/current"] == new
    assert not any(" down;" in line for line in upstreams(fleet.sims["h1"]))
    # The new release's parser saw every restarted instance's flags before the first take-out.
    names = [op.name for _, op in timeline]
    assert names.index("vLLM fleet | vLLM host | Decide which instances restart (flags checked by the new release)") \
        < names.index("vLLM fleet | Rolling update | Rolling update slot 1/3: out of nginx, drained")
    assert steps(fleet.deploy()) == []


def test_failing_canary_stops_the_rollout_and_the_fleet_stays_on_its_release(host_data):
    fleet = Fleet(host_data)
    fleet.deploy()
    old = fleet.venv()
    fleet.lock_digest = "c" * 64
    for sim in fleet.sims.values():
        sim.failing_releases.add(fleet.venv())
    timeline = fleet.deploy()

    # Only the canary was touched: restarted on the new release, then on the old one again.
    assert fleet.sims["h1"].restarts == ["a", "a"] and fleet.sims["h2"].restarts == []
    assert set(fleet.links().values()) == {old}
    for sim in fleet.sims.values():
        assert sim.links["/opt/vllm-fleet/current"] == old
    assert not any("slot 2/3" in name or "slot 3/3" in name for _, name in steps(timeline))
    assert not any(" down;" in line for line in upstreams(fleet.sims["h1"]))  # the canary is back in
    report = reports(timeline)
    assert "rollout stopped: vllm@a reverted: vllm@a did not become healthy" in report["h1"][0]
    assert report["h2"] == []


def test_flags_the_new_release_refuses_stop_everything_before_a_restart(host_data):
    fleet = Fleet(host_data)
    fleet.deploy()
    old = fleet.venv()
    fleet.lock_digest = "d" * 64
    fleet.sims["h2"].refused_flags["a"] = "vllm serve: error: unrecognized arguments: --enable-chunked-prefill"
    timeline = fleet.deploy()

    assert fleet.sims["h1"].restarts == [] and fleet.sims["h2"].restarts == []
    assert set(fleet.links().values()) == {old}
    assert not any("Rolling update" in name for _, name in steps(timeline))
    report = reports(timeline)
    assert "flags refused: vllm@a: vllm serve: error: unrecognized arguments" in report["h2"][0]
    assert report["h1"] == []


def test_partial_upgrade_moves_only_the_hosts_pinned_to_the_new_release(host_data):
    fleet = Fleet(host_data)
    fleet.deploy()
    old = fleet.venv("h1")
    fleet.lock_digest, fleet.upgraded = "9" * 64, {"h2"}
    timeline = fleet.deploy()
    assert fleet.sims["h1"].restarts == [] and fleet.sims["h2"].restarts == ["a"]
    assert fleet.links() == {("h1", "a"): old, ("h1", "b"): old, ("h2", "a"): fleet.venv("h2")}
    assert fleet.sims["h1"].links["/opt/vllm-fleet/current"] == old
    assert fleet.sims["h2"].links["/opt/vllm-fleet/current"] == fleet.venv("h2") != old
    # Drained through the load balancer although its own instances stay as they are.
    assert fleet.sims["h1"].drained == [["10.9.0.12:8001"]]
    assert [s for s in steps(timeline) if "Rolling update" in s[1]] == [
        ("h1", "Rolling update slot 1/3: out of nginx, drained"),
        ("h2", "Rolling update slot 1/3: switch, restart, prove (or put back)"),
        ("h1", "Rolling update slot 1/3: back into nginx")]


def test_batches_after_the_canary(host_data):
    fleet = Fleet(host_data, vllm_rollout_batch_size=2)
    fleet.deploy()
    fleet.lock_digest = "e" * 64
    timeline = fleet.deploy()
    switches = [(name, op.name.split(": ")[0].split(" | ")[-1]) for name, op in timeline
                if "switch, restart" in op.name and op.commands]
    assert switches == [("h1", "Rolling update slot 1/2"), ("h1", "Rolling update slot 2/2"),
                        ("h2", "Rolling update slot 2/2")]
    assert fleet.sims["h1"].drained == [["10.9.0.11:8001"], ["10.9.0.11:8002", "10.9.0.12:8001"]]


def test_garbage_collection_keeps_the_release_an_instance_still_runs(host_data):
    """keep 1: after a canary failed on release B, the instances still run A, which must stay."""
    fleet = Fleet(host_data, vllm_keep_releases=1)
    fleet.deploy()
    old = fleet.venv()
    fleet.lock_digest = "f" * 64
    for sim in fleet.sims.values():
        sim.failing_releases.add(fleet.venv())
    fleet.deploy()
    for sim in fleet.sims.values():
        assert installed(sim) == {old, fleet.venv()}
    # Rolled to G with B still failing: B goes (nothing runs it), A stays until nothing runs it.
    fleet.lock_digest = "1" * 64
    fleet.deploy()
    for sim in fleet.sims.values():
        assert installed(sim) == {old, fleet.venv()}
    fleet.deploy()
    for sim in fleet.sims.values():
        assert installed(sim) == {fleet.venv()}


def test_limited_run_must_include_a_load_balancer(host_data):
    fleet = plan_fleet([("h1", host_data()), ("h2", host_data(ssh_hostname="10.9.0.12"))], ["lb1"])
    check_run_limit(fleet, None)
    check_run_limit(fleet, ["h2", "lb1"])
    check_run_limit(fleet, ["lb1"])
    with pytest.raises(FleetConfigError, match=r"--limit.*includes vLLM hosts \(h2\) but no load balancer \(lb1\)"
                                               r".*`--limit h2 --limit lb`"):
        check_run_limit(fleet, ["h2"])


def test_an_instance_held_down_stays_down_through_every_take_out_and_put_back(host_data):
    fleet = Fleet(host_data, nginx_instances_down=["h2:a"], nginx_routing="session")
    fleet.deploy()
    fleet.lock_digest = "d" * 64
    fleet.deploy()
    held = "server 10.9.0.12:8001 max_fails=1 fail_timeout=10s down;  # nginx_instances_down"
    # The first deploy's, then each slot's take-out and put-back (staged, then renamed into place).
    confs = [text for dest, _, text in fleet.sims["h1"].uploads if dest in (CONF, f"{CONF}.next")]
    assert len(confs) == 1 + 2 * 3
    for text in confs:  # in both upstream blocks of the session policy, every time
        assert text.count(held) == 2, text
    # Restarted like the others (it is only out of nginx), and left out after the rollout.
    assert fleet.sims["h2"].restarts == ["a"]
    assert [line for line in upstreams(fleet.sims["h1"]) if " down;" in line] == [held, held]
