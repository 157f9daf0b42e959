"""Instances that span hosts, planned before any host is touched: a 2 × 8 × H100 fleet serving Llama
3.1 405B (bf16 and fp8) on faked facts, the proposal a single host's refusal makes, the refusals of
layouts that cannot work, and the flags and environment each host's stage runs with."""

import subprocess
import sys
from pathlib import Path

import pytest

from roles.errors import FleetConfigError
from roles.plan.engine import render_args, render_env
from roles.plan.fleet import plan_fleet

REPO = Path(__file__).resolve().parents[2]
REVISION = "0" * 40
GROUP = [{"name": "llama405", "hosts": ["gpu1", "gpu2"], "port": 8000}]


def gpu_host(address: str, **overrides) -> dict:
    """An 8 × H100 SXM host serving Llama 3.1 405B Instruct (its config.json is in
    inventories/model_configs/) at 32,768 tokens."""
    data = {
        "vllm_release": "nvidia-vllm-0.32.0", "vllm_accelerator": "nvidia", "vllm_gpu_type": "h100-sxm",
        "vllm_gpu_count": 8, "nvidia_repo_url": "https://cuda-mirror.example/repos",
        "vllm_model_id": "meta-llama/Llama-3.1-405B-Instruct", "vllm_model_revision": REVISION,
        "vllm_max_model_len": 32768, "ssh_hostname": address,
    }
    data.update(overrides)
    return data


def two_hosts(second: dict | None = None, **overrides):
    """The group's two hosts as (name, data), every override on both, ``second`` on gpu2 only."""
    common = {"vllm_instance_groups": GROUP, **overrides}
    return [("gpu1", gpu_host("10.0.0.1", **common)), ("gpu2", gpu_host("10.0.0.2", **{**common, **(second or {})}))]


def refusal(hosts) -> str:
    with pytest.raises(FleetConfigError) as err:
        plan_fleet(hosts, [hosts[0][0]])
    return str(err.value)


def stages(plan):
    return [(h, h.instances[0]) for h in plan.hosts]


def test_405b_bf16_on_one_8xh100_host_is_refused_with_the_two_host_proposal():
    message = refusal([("gpu1", gpu_host("10.0.0.1", vllm_instances=[{"name": "a", "port": 8000}]))])
    problem, fix = message.split(" Fix: ")
    assert "needs 811.7 GB of weights" in problem and "one h100-sxm holds" in problem
    proposal = fix.split("; or ")[0]
    assert proposal.startswith("span 2 hosts of 8 × h100-sxm with one instance (`vllm_instance_groups`: "
                               "tensor-parallel 8 in each host, pipeline-parallel 2 across them, 63 of 126 layers "
                               "per host): 51.3 GB of weights per GPU"), proposal
    # The proposal is what planning that group gives.
    leader = plan_fleet(two_hosts(), ["gpu1"]).hosts[0].instances[0].fit
    assert f"leaves 23.6 GB per GPU for KV cache = {leader.kv_tokens:,} tokens" in proposal
    assert "quantize the weights: fp8" in fix  # the other way out stays offered


def test_405b_fp8_fits_one_8xh200_host_without_spanning_hosts():
    plan = plan_fleet([("gpu1", gpu_host("10.0.0.1", vllm_gpu_type="h200", vllm_quantization="fp8",
                                         vllm_instances=[{"name": "a", "port": 8000}]))], ["gpu1"])
    inst = plan.hosts[0].instances[0]
    assert inst.node is None and inst.fit.quantization == "fp8"
    assert inst.fit.tensor_parallel == 4 and round(inst.fit.weight_bytes_per_gpu / 1e9, 1) == 102.5
    assert inst.fit.warnings == ()


@pytest.mark.parametrize("quantization, weights_per_gpu, kv_per_gpu", [(None, 51.3, 23.6), ("fp8", 26.2, 48.7)])
def test_405b_over_two_8xh100_hosts_plans_one_instance_led_by_the_first(quantization, weights_per_gpu, kv_per_gpu):
    plan = plan_fleet(two_hosts(vllm_quantization=quantization), ["gpu1"])
    (_, leader), (_, follower) = stages(plan)
    for inst in (leader, follower):
        assert inst.fit.tensor_parallel == 8 and inst.node.nnodes == 2
        assert round(inst.fit.weight_bytes_per_gpu / 1e9, 1) == weights_per_gpu
        assert round(inst.fit.budget_bytes_per_gpu / 1e9, 1) == kv_per_gpu
    assert (leader.node.rank, follower.node.rank) == (0, 1) and leader.serves and not follower.serves
    assert leader.node.master_address == "10.0.0.1" and follower.node.peers == ("10.0.0.1",)
    assert plan.upstreams == ["10.0.0.1:8000"]  # nginx sends to the leader only
    assert any("no RDMA adapters declared" in w for w in leader.fit.warnings)
    assert follower.fit.warnings == ()


def test_declared_rdma_adapters_silence_the_warning_and_reach_nccl():
    plan = plan_fleet(two_hosts(vllm_group_rdma_devices=["mlx5_0", "mlx5_1"], vllm_group_interface="ens1f0"),
                      ["gpu1"])
    (host, leader), _ = stages(plan)
    assert leader.fit.warnings == ()
    env = render_env(host, leader, "0,1,2,3,4,5,6,7", "internal-key")
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and env["VLLM_HOST_IP"] == "10.0.0.1"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ens1f0"


def test_leader_and_follower_get_vllms_multi_node_flags():
    plan = plan_fleet(two_hosts(), ["gpu1"])
    (leader_host, leader), (follower_host, follower) = stages(plan)
    common = ["--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp", "--nnodes", "2"]
    lead_args, follow_args = render_args(leader_host, leader), render_args(follower_host, follower)
    for args, rank in ((lead_args, "0"), (follow_args, "1")):
        start = args.index("--pipeline-parallel-size")
        assert args[start:start + 6] == common
        assert args[start + 6:start + 12] == ["--node-rank", rank, "--master-addr", "10.0.0.1",
                                              "--master-port", "29500"]
    assert "--headless" in follow_args and "--headless" not in lead_args
    assert "--tensor-parallel-size" in lead_args and lead_args[lead_args.index("--tensor-parallel-size") + 1] == "8"
    # The followers serve nothing: they get no API key.
    assert render_env(leader_host, leader, "0-7", "internal-key")["VLLM_API_KEY"] == "internal-key"
    assert "VLLM_API_KEY" not in render_env(follower_host, follower, "0-7", "internal-key")


def test_a_cpu_group_traces_once_instead_of_enforce_eager(host_data):
    group = [{"name": "tiny", "hosts": ["lab1", "lab2"], "port": 8001, "master_port": 29511}]
    hosts = [(name, host_data(vllm_instances=None, vllm_instance_groups=group, vllm_enforce_eager=True,
                              vllm_group_interface="eth0", ssh_hostname=address))
             for name, address in (("lab1", "10.9.0.11"), ("lab2", "10.9.0.12"))]
    plan = plan_fleet(hosts, ["lab1"])
    for host, inst in stages(plan):
        args = render_args(host, inst)
        assert "--enforce-eager" not in args
        assert args[args.index("-cc.mode=2"):][:2] == ["-cc.mode=2", "-cc.backend=eager"]
        assert "--master-port" in args and args[args.index("--master-port") + 1] == "29511"
        assert render_env(host, inst, "0", "k")["GLOO_SOCKET_IFNAME"] == "eth0"


def test_a_group_of_two_gpu_types_is_refused_as_such():
    message = refusal(two_hosts(second={"vllm_gpu_type": "a100-80gb"}))
    assert message.startswith("instance group llama405: `hosts`: GPU type differs: gpu1 has h100-sxm, gpu2 has "
                              "a100-80gb."), message


def test_more_pipeline_stages_than_layers_are_refused(host_data):
    group = [{"name": "tiny", "hosts": ["lab1", "lab2", "lab3"], "port": 8001}]
    hosts = [(f"lab{i}", host_data(vllm_instances=None, vllm_instance_groups=group, ssh_hostname=f"10.9.0.1{i}"))
             for i in (1, 2, 3)]
    message = refusal(hosts)
    assert "`pipeline_parallel_size`: 3 pipeline stages need at least one of" in message
    assert "2 layers each" in message and "span at most 2 hosts" in message


def test_a_tensor_parallel_size_that_splits_heads_unevenly_is_refused_in_the_group():
    message = refusal(two_hosts(vllm_tensor_parallel_size=3))
    assert message.startswith("instance group llama405: host gpu1: `vllm_tensor_parallel_size`: tensor-parallel 3 "
                              "does not divide"), message


@pytest.mark.parametrize("change, expected", [
    ({"vllm_instance_groups": [{"name": "big", "hosts": ["gpu1", "gpu9"], "port": 8000}]},
     "instance group big: `hosts`: 'gpu9' is not a host of the vllm group."),
    ({"vllm_instance_groups": [{"name": "big", "hosts": ["gpu1", "gpu1"], "port": 8000}]},
     "instance group big: `hosts`: names a host twice"),
    ({"vllm_instance_groups": [{"name": "big", "hosts": ["gpu1"], "port": 8000}]},
     "instance group big: `hosts`: expected a list of two or more host names"),
    ({"vllm_instance_groups": [{"name": "big", "hosts": ["gpu1", "gpu2"], "port": 8000},
                               {"name": "other", "hosts": ["gpu2", "gpu1"], "port": 8001}]},
     "instance group other: `hosts`: host gpu2 is in instance group big already."),
    ({"vllm_instance_groups": [{"name": "big", "hosts": ["gpu1", "gpu2"], "port": 8000, "master_port": 8000}]},
     "instance group big: `master_port`: is the group's API port 8000 too."),
    ({"vllm_instance_groups": [{"name": "big", "hosts": ["gpu1", "gpu2"], "port": 8000, "stages": 2}]},
     "instance group big: `stages`: is not a key of an instance group."),
    ({"vllm_instance_groups": [{"name": "big", "hosts": ["gpu1", "gpu2"], "port": 8000, "max_model_len": -1}]},
     "instance group big: `max_model_len`: "),
    ({"vllm_instance_groups": [{"name": "Big!", "hosts": ["gpu1", "gpu2"], "port": 8000}]},
     "`vllm_instance_groups`[0].name: 'Big!' is not"),
])
def test_malformed_groups_are_refused_naming_the_group_and_key(change, expected):
    assert refusal(two_hosts(**change)).startswith(expected)


def test_every_host_holds_the_same_list_and_a_grouped_host_no_instances_of_its_own():
    other = [{"name": "llama405", "hosts": ["gpu2", "gpu1"], "port": 8000}]
    assert refusal(two_hosts(second={"vllm_instance_groups": other})).startswith(
        "host gpu2: `vllm_instance_groups`: differs from host gpu1's")
    assert refusal(two_hosts(second={"vllm_instances": [{"name": "a", "port": 8001}]})).startswith(
        "host gpu2: `vllm_instances`: is set, but the host runs a stage of instance group llama405")


def test_the_plan_table_shows_each_hosts_stage(tmp_path):
    inventory = tmp_path / "fleet.py"
    inventory.write_text(f"vllm = {two_hosts()!r}\nlb = ['gpu1']\n")
    result = subprocess.run([sys.executable, "-m", "roles.cli", "plan", str(inventory)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:4]]
    assert [r[:5] for r in rows] == [["gpu1", "llama405", "1/2", "8x", "h100-sxm"],
                                     ["gpu2", "llama405", "2/2", "8x", "h100-sxm"]]
    assert "WARNING gpu1/llama405: instance group llama405: no RDMA adapters declared" in result.stdout


def test_a_group_whose_hosts_pin_different_releases_is_refused(host_data):
    group = [{"name": "tiny", "hosts": ["lab1", "lab2"], "port": 8001}]
    hosts = [("lab1", host_data(vllm_instances=None, vllm_instance_groups=group, ssh_hostname="10.9.0.11")),
             ("lab2", host_data(vllm_instances=None, vllm_instance_groups=group, ssh_hostname="10.9.0.12",
                                vllm_release="cpu-vllm-0.32.0-tf5.18"))]
    assert refusal(hosts) == ("instance group tiny: `hosts`: release differs: lab1 has cpu-vllm-0.32.0, lab2 has "
                              "cpu-vllm-0.32.0-tf5.18. Fix: pin one release for every host of the group (group data).")
