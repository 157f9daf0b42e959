"""Every operator mistake of issue 10's classes 2-4 is refused by the plan, before any host is
touched: numbers out of range, hosts of any group, settings that contradict each other. Each
refusal names the host (and instance), the setting, the value and the fix; and any value of any
setting ends in a plan or a refusal, never in another exception."""

import pytest

from roles.errors import FleetConfigError
from roles.plan import consistency, engine, settings
from roles.plan.fleet import plan_fleet


def refusal(hosts, lb=("h1",)) -> FleetConfigError:
    with pytest.raises(FleetConfigError) as err:
        plan_fleet(hosts, list(lb))
    return err.value


def instances(**override):
    """The fixture's two instances, the first with ``override``."""
    return [{"name": "a", "port": 8001, **override}, {"name": "b", "port": 8002}]


# case: (data overrides, text of the field, text of the problem (the value), text of the fix)
RANGES = {
    "max_model_len 0": ({"vllm_max_model_len": 0}, "host h1: `vllm_max_model_len`", "0 is outside", "at least 1"),
    "tensor-parallel 0": ({"vllm_instances": instances(tensor_parallel_size=0)},
                          "host h1: instance a: vllm_instances[0]: `tensor_parallel_size`", "0 is outside",
                          "set `vllm_tensor_parallel_size` to a value at least 1"),
    "tensor-parallel negative": ({"vllm_tensor_parallel_size": -2}, "`vllm_tensor_parallel_size`", "-2", "at least 1"),
    "negative max_num_seqs": ({"vllm_max_num_seqs": -4}, "`vllm_max_num_seqs`", "-4 is outside", "at least 1"),
    "privileged instance port": ({"vllm_instances": instances(port=80)}, "instance a: vllm_instances[0]: `port`",
                                 "80 is outside the allowed range (from 1024 to 65535)", "runs unprivileged"),
    "instance port above 65535": ({"vllm_instances": instances(port=70000)}, "`port`", "70000", "from 1024 to 65535"),
    "instance port as text": ({"vllm_instances": instances(port="8001")}, "`port`", "got '8001'", "to a int"),
    "nginx port above 65535": ({"nginx_listen_port": 70000}, "host h1: `nginx_listen_port`", "70000",
                               "from 1 to 65535"),
    "nginx port 0": ({"nginx_listen_port": 0}, "`nginx_listen_port`", "0 is outside", "from 1 to 65535"),
    "negative GPU index": ({"vllm_instances": instances(gpus=[-1])}, "`gpus`[0]", "-1 is outside", "at least 0"),
    "GPU index as text": ({"vllm_gpus": ["0"]}, "`vllm_gpus`[0]", "expected a int, got '0'", "every element"),
    "GPU index as boolean": ({"vllm_gpus": [True]}, "`vllm_gpus`[0]", "got True", "every element"),
    "memory fraction 0": ({"vllm_gpu_memory_utilization": 0}, "`vllm_gpu_memory_utilization`", "0 is outside",
                          "above 0 and at most 1"),
    "memory fraction 1.5": ({"vllm_gpu_memory_utilization": 1.5}, "`vllm_gpu_memory_utilization`", "1.5",
                            "above 0 and at most 1"),
    "KV cache of 1000 bytes": ({"vllm_kv_cache_bytes": 1000}, "`vllm_kv_cache_bytes`", "1000", "at least 1048576"),
    "keep no release": ({"vllm_keep_releases": 0}, "`vllm_keep_releases`", "0 is outside", "at least 1"),
    "batch size 0": ({"vllm_rollout_batch_size": 0}, "`vllm_rollout_batch_size`", "0 is outside", "at least 1"),
    "start timeout 0": ({"vllm_start_timeout": 0}, "`vllm_start_timeout`", "0 is outside", "at least 1"),
    "connect timeout above nginx's limit": ({"nginx_connect_timeout": 120}, "`nginx_connect_timeout`", "120",
                                            "from 1 to 75"),
    "negative price": ({"vllm_gpu_hour_price": -2.5}, "`vllm_gpu_hour_price`", "-2.5", "at least 0"),
    "no throughput": ({"vllm_tokens_per_s": 0.0}, "`vllm_tokens_per_s`", "0.0 is outside", "above 0"),
    "no GPUs": ({"vllm_gpu_count": 0}, "`vllm_gpu_count`", "0 is outside", "from 1 to 16"),
    "nginx body size in words": ({"nginx_client_max_body_size": "64 MB"}, "`nginx_client_max_body_size`",
                                 "'64 MB' is not an nginx size", "e.g. '64m'"),
}


@pytest.mark.parametrize("case", RANGES)
def test_numbers_out_of_range_are_refused(host_data, case):
    overrides, field, problem, fix = RANGES[case]
    error = refusal([("h1", host_data(**overrides))])
    assert field in error.field and problem in error.problem and fix in error.fix, error


def test_the_edges_of_each_range_are_accepted(host_data):
    fleet = plan_fleet([("h1", host_data(
        vllm_instances=[{"name": "a", "port": 1024}, {"name": "b", "port": 65535}], nginx_listen_port=1,
        vllm_kv_cache_bytes=256 << 20, vllm_keep_releases=1, vllm_max_num_seqs=1, nginx_connect_timeout=75,
        vllm_gpu_hour_price=0.0, nginx_drain_timeout=0))], ["h1"])
    assert [i.port for i in fleet.hosts[0].instances] == [1024, 65535]


@pytest.fixture
def gpu_host(host_data, nvidia_releases):
    def make(**overrides):
        return host_data(**{"vllm_releases_dir": str(nvidia_releases), "vllm_release": "nvidia-vllm-0.32.0",
                            "vllm_accelerator": "nvidia", "vllm_gpu_type": "h200", "vllm_gpu_count": 2,
                            "nvidia_repo_url": "https://cuda-mirror.example/repos", **overrides})
    return make


def test_gpu_index_beyond_the_host_is_refused(gpu_host):
    error = refusal([("h1", gpu_host(vllm_instances=[{"name": "a", "port": 8001, "gpus": [2]}]))])
    assert error.field == "host h1: instance a: `vllm_gpus`"
    assert "GPU index 2 is not on this host: vllm_gpu_count is 2, so its GPUs are 0 to 1." == error.problem
    assert "below vllm_gpu_count" in error.fix


def test_unknown_gpu_type_names_the_host_and_the_setting(gpu_host):
    error = refusal([("h1", gpu_host(vllm_gpu_type="h100"))])
    assert error.field == "host h1: `vllm_gpu_type`" and "'h100' is not a known GPU type" in error.problem
    assert "vllm_gpu_types" in error.fix


def test_gpu_types_of_the_inventory_name_the_host(gpu_host):
    error = refusal([("h1", gpu_host(vllm_gpu_types={"h200": {"memory_gb": 141}}))])
    assert error.field == "host h1: vllm_gpu_types: `h200`" and "unknown key" in error.problem


# ---- class 4: settings that contradict each other ----------------------------------------------------

OWNED = {
    # extra args: (setting named in the message)
    ("--max-model-len", "4096"): "`vllm_max_model_len`",
    ("--max_num_seqs=8",): "`vllm_max_num_seqs`",
    ("--no-enable-prefix-caching",): "`vllm_enable_prefix_caching`",
    ("-tp", "2"): "`vllm_tensor_parallel_size`",
    ("-qfp8",): "`vllm_quantization`",
    ("--port=9000",): "the instance's `port`",
    ("--served-model-name", "other"): "`vllm_served_model_name`",
    ("--max-model", "4096"): "`vllm_max_model_len`",  # argparse would take the abbreviation
    ("--kv-cache-memory-bytes", "1"): "`vllm_kv_cache_bytes`",
}


@pytest.mark.parametrize("args", OWNED, ids=" ".join)
def test_extra_args_may_not_set_what_a_setting_owns(host_data, args):
    error = refusal([("h1", host_data(vllm_instances=instances(extra_args=list(args))))])
    owner = OWNED[args]
    assert error.field == "host h1: instance a: `vllm_extra_args`"
    assert repr(args[0]) in error.problem and f"which {owner} owns" in error.problem
    assert f"set {owner} instead" in error.fix


@pytest.mark.parametrize("args", [["--api-key", "s3cret"], ["--api_key=s3cret"], ["--hf-token", "hf_x"],
                                  ["--db-password=x"]])
def test_extra_args_may_not_carry_secrets(host_data, args):
    error = refusal([("h1", host_data(vllm_extra_args=args))])
    assert error.field == "host h1: instance a: `vllm_extra_args`" and repr(args[0]) in error.problem
    assert "secret on the command line" in error.problem
    # There is no API key setting: every instance gets the fleet's internal key, off the command line.
    assert "every instance already requires the fleet's internal key" in error.fix
    assert "root-only environment file" in error.fix and "vllm_api_key" not in error.fix


def test_extra_args_that_no_setting_owns_pass(host_data):
    args = ["--seed", "7", "--tokenizer", "/srv/tok", "--max-num-batched-tokens", "4096", "--no-such-flag",
            "--ssl-keyfile", "/etc/tls/key.pem", "--model-impl", "transformers", "-O3", 7]
    plan = plan_fleet([("h1", host_data(vllm_extra_args=args))], ["h1"]).hosts[0]
    assert engine.render_args(plan, plan.instances[0])[-len(args):] == [str(a) for a in args]


def test_every_rendered_flag_has_an_owner(host_data, gpu_host):
    """A flag the plan renders that no setting owns could be given twice through vllm_extra_args."""
    cpu = plan_fleet([("h1", host_data(vllm_enforce_eager=True, vllm_kv_cache_dtype="bfloat16"))], ["h1"]).hosts[0]
    gpu = plan_fleet([("h1", gpu_host(vllm_quantization="fp8", vllm_enable_prefix_caching=False))], ["h1"]).hosts[0]
    rendered = {arg for plan in (cpu, gpu) for arg in engine.render_args(plan, plan.instances[0])
                if arg.startswith("--")}
    assert "--no-enable-prefix-caching" in rendered and "--quantization" in rendered
    assert {flag.replace("--no-", "--") for flag in rendered} <= set(consistency.OWNED_FLAGS)


def test_two_hosts_advertising_one_address_are_refused(host_data):
    error = refusal([("h1", host_data()), ("h2", host_data(vllm_instances=[{"name": "a", "port": 8001}]))])
    assert error.field == "host h2: `vllm_advertise_address`"
    assert "'10.9.0.11' (from ssh_hostname) is also host h1's address" in error.problem
    assert "give every host its own address" in error.fix


def test_one_address_written_two_ways_is_one_address(host_data):
    error = refusal([("h1", host_data(ssh_hostname="fd00::11")),
                     ("h2", host_data(ssh_hostname="10.9.0.12", vllm_advertise_address="FD00:0:0::11"))])
    assert error.field == "host h2: `vllm_advertise_address`" and "(from vllm_advertise_address)" in error.problem


def test_an_address_the_load_balancer_cannot_use_is_refused(host_data):
    error = refusal([("h1", host_data(ssh_hostname="gpu 01"))])
    assert error.field == "host h1: `vllm_advertise_address`" and "'gpu 01' (ssh_hostname)" in error.problem
    error = refusal([("@local", host_data(ssh_hostname=None))], lb=["@local"])
    assert error.field == "host @local: `vllm_advertise_address`" and "'@local' (the host name)" in error.problem
    assert plan_fleet([("gpu_01", host_data(ssh_hostname=None))], ["gpu_01"]).hosts[0].address == "gpu_01"


def test_loopback_instances_behind_another_load_balancer_are_refused(host_data):
    error = refusal([("h1", host_data(vllm_listen_address="127.0.0.1"))], lb=["lb1"])
    assert error.field == "host h1: `vllm_listen_address`"
    assert "'127.0.0.1' is a loopback address, but the load balancer lb1 is another host" in error.problem
    # Instances no longer listen on every interface: the fix is an address the load balancer reaches.
    assert "set vllm_advertise_address to an address of this host the load balancer reaches" in error.fix
    assert "leave vllm_listen_address unset (it follows vllm_advertise_address)" in error.fix
    assert "0.0.0.0" not in error.fix
    error = refusal([("h1", host_data(ssh_hostname="localhost"))], lb=["lb1"])
    assert error.field == "host h1: `vllm_advertise_address`" and "'localhost' is a loopback" in error.problem


def test_loopback_instances_need_a_loopback_upstream_on_their_own_host(host_data):
    error = refusal([("h1", host_data(vllm_listen_address="::1"))])
    assert error.field == "host h1: `vllm_listen_address`"
    assert "nginx reaches the instances at '10.9.0.11' (from ssh_hostname), where they do not listen" in error.problem
    assert "set vllm_advertise_address to ::1 as well, or leave vllm_listen_address unset" in error.fix
    fleet = plan_fleet([("h1", host_data(vllm_listen_address="::1", vllm_advertise_address="::1"))], ["h1"])
    assert fleet.upstreams == ["[::1]:8001", "[::1]:8002"]


@pytest.mark.parametrize("name", ["my model", "-x", "", "a" * 129, "tiny\n"])
def test_served_model_names_the_engine_would_refuse_are_refused(host_data, name):
    error = refusal([("h1", host_data(vllm_served_model_name=name))])
    assert error.field == "host h1: `vllm_served_model_name`" and repr(name) in error.problem


@pytest.mark.parametrize("model_id", ["chat-7b", "acme/../etc", "acme/chat 7b", "acme/-chat", "acme/chat--7b",
                                      "acme/chat/7b", "acme/$(id)"])
def test_malformed_model_id_is_blamed_on_the_model_id(host_data, model_id):
    error = refusal([("h1", host_data(vllm_model_path=None, vllm_model_id=model_id, vllm_model_revision="0" * 40))])
    assert error.field == "host h1: `vllm_model_id`" and repr(model_id) in error.problem
    assert "e.g. 'meta-llama/Llama-3.3-70B-Instruct'" in error.fix


def test_model_directory_name_reaches_hosts_only_when_plain(host_data, tmp_path, model_dir):
    plain = tmp_path / "odd name"
    model_dir.rename(plain)
    error = refusal([("h1", host_data(vllm_model_path=str(plain)))])
    assert error.field == "host h1: vllm_model_path" and "'odd name'" in error.problem


def test_a_missing_releases_folder_names_the_setting(host_data):
    error = refusal([("h1", host_data(vllm_releases_dir="no/such/folder"))])
    assert error.field == "host h1: `vllm_releases_dir`" and "'no/such/folder' is not a folder" in error.problem


def test_an_unknown_release_names_the_host(host_data):
    error = refusal([("h1", host_data(vllm_release="cpu-vllm-9.9.9"))])
    assert error.field.startswith("host h1: vllm_release cpu-vllm-9.9.9") and "cpu-vllm-0.32.0" in error.fix


# ---- no input ends in a traceback --------------------------------------------------------------------

ODD_VALUES = [None, 0, -1, 1.5, float("nan"), 10 ** 12, True, "", "x", "0", [], [0], ["--x"], {}, {"a": 1}]


@pytest.mark.parametrize("setting", settings.SETTINGS, ids=lambda s: s.name)
def test_any_value_of_any_setting_plans_or_is_refused(host_data, setting):
    for value in ODD_VALUES:
        for data in (host_data(**{setting.name: value}),
                     host_data(vllm_instances=instances(**{setting.short_name: value})) if setting.per_instance
                     else None):
            if data is None:
                continue
            try:
                plan_fleet([("h1", data)], ["h1"])
            except FleetConfigError as error:
                assert error.field and error.problem and error.fix, (setting.name, value)
