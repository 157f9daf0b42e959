"""Flags, environment and placement rendered from inventory settings (pure functions)."""

import shlex
from types import SimpleNamespace

import pytest

from roles.errors import FleetConfigError
from roles.plan import engine
from roles.plan.fleet import Instance, auto_gpus, plan_fleet, split_cores
from roles.plan.setting_checks import describe


def host_plan(host_data, **overrides):
    return plan_fleet([("h1", host_data(**overrides))], ["h1"]).hosts[0]


def test_cpu_flags_carry_every_setting(host_data):
    hp = host_plan(host_data, vllm_max_model_len=2048, vllm_max_num_seqs=8, vllm_enforce_eager=True,
                   vllm_kv_cache_bytes=1 << 28, vllm_extra_args=["--seed", "7"])
    args = engine.render_args(hp, hp.instances[1])
    flags = dict(zip(args[::2], args[1::2]))  # pairs up to the first boolean flag
    assert args[:2] == ["--model", hp.model_dir]
    assert hp.model_dir.startswith("/var/lib/vllm-fleet/models/tiny-")
    assert flags["--served-model-name"] == "tiny" and flags["--port"] == "8002"
    assert "--max-model-len 2048" in " ".join(args) and "--max-num-seqs 8" in " ".join(args)
    assert "--kv-cache-memory-bytes 268435456" in " ".join(args)
    assert "--gpu-memory-utilization" not in args
    assert {"--enable-prefix-caching", "--enable-chunked-prefill", "--enforce-eager"} <= set(args)
    assert args[-2:] == ["--seed", "7"]


def test_instances_listen_where_the_load_balancer_reaches_them_unless_set(host_data):
    def listen(**overrides):
        hp = host_plan(host_data, **overrides)
        args = engine.render_args(hp, hp.instances[0])
        return hp.listen_address, args[args.index("--host") + 1]

    # Unset: the advertised address (ssh_hostname here), never every interface.
    assert listen() == ("10.9.0.11", "10.9.0.11")
    assert listen(vllm_advertise_address="10.9.1.11") == ("10.9.1.11", "10.9.1.11")
    assert listen(vllm_listen_address="0.0.0.0") == ("0.0.0.0", "0.0.0.0")


def test_unset_lengths_are_derived_from_the_capacity_plan_and_rendered(host_data):
    # The tiny Llama allows 2,048 positions; a 256 MiB CPU cache at 1 KiB a token holds 262,144.
    hp = host_plan(host_data, vllm_kv_cache_bytes=256 << 20)
    args = " ".join(engine.render_args(hp, hp.instances[0]))
    assert "--max-model-len 2048" in args and "--max-num-seqs 128" in args
    assert "--tensor-parallel-size 1" in args and "--enforce-eager" not in args


def test_instance_override_beats_host_value(host_data):
    hp = host_plan(host_data, vllm_max_num_seqs=32,
                   vllm_instances=[{"name": "a", "port": 8001, "max_num_seqs": 4}, {"name": "b", "port": 8002}])
    assert "--max-num-seqs 4" in " ".join(engine.render_args(hp, hp.instances[0]))
    assert "--max-num-seqs 32" in " ".join(engine.render_args(hp, hp.instances[1]))


def test_prefix_caching_can_be_turned_off(host_data):
    hp = host_plan(host_data, vllm_enable_prefix_caching=False)
    assert "--no-enable-prefix-caching" in engine.render_args(hp, hp.instances[0])


def test_env_binds_cores_and_keeps_api_key_off_the_command_line(host_data):
    hp = host_plan(host_data)
    env = engine.render_env(hp, hp.instances[0], "0-3", "vf-internal-key")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3" and env["VLLM_API_KEY"] == "vf-internal-key"
    assert "vf-internal-key" not in env["ENGINE_ARGS"]
    text = engine.env_file(env)
    # EnvironmentFile= unquotes like a shell; ExecStart's unbraced $ENGINE_ARGS then splits at whitespace.
    parsed = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    [value] = shlex.split(parsed["ENGINE_ARGS"])
    assert value.split() == engine.render_args(hp, hp.instances[0])


def test_whitespace_in_a_flag_is_refused(host_data):
    # By the plan, before any flag is rendered: systemd would split it in two.
    with pytest.raises(FleetConfigError, match="whitespace"):
        host_plan(host_data, vllm_served_model_name="my model")


@pytest.mark.parametrize("cpus, n, expected", [
    (2, 2, ["0", "1"]), (2, 1, ["0-1"]), (8, 3, ["0-1", "2-3", "4-7"]), (1, 2, ["0", "0"]), (2, 3, ["0-1"] * 3),
])
def test_split_cores(cpus, n, expected):
    assert split_cores(cpus, n) == expected


def test_nvidia_instances_get_their_own_gpus():
    insts = [Instance("a", 1, {"vllm_gpus": None}, fit=SimpleNamespace(tensor_parallel=2)),
             Instance("b", 2, {"vllm_gpus": [0]}, fit=SimpleNamespace(tensor_parallel=1)),
             Instance("c", 3, {"vllm_gpus": None}, fit=SimpleNamespace(tensor_parallel=1))]
    assert auto_gpus(insts) == {"a": [1, 2], "b": [0], "c": [3]}


def test_settings_table_documents_every_setting():
    text = describe()
    assert "vllm_kv_cache_bytes (int, default 1073741824) [per instance]" in text
    assert "nginx_read_timeout" in text


def test_nvidia_instances_get_gpus_and_memory_fraction(host_data, nvidia_releases):
    hp = host_plan(host_data, vllm_releases_dir=str(nvidia_releases), vllm_release="nvidia-vllm-0.32.0",
                   vllm_accelerator="nvidia", vllm_gpu_type="h100-sxm", nvidia_repo_url="https://m.example/r", vllm_gpu_memory_utilization=0.92,
                   vllm_instances=[{"name": "a", "port": 8001, "tensor_parallel_size": 2},
                                   {"name": "b", "port": 8002}])
    gpus = auto_gpus(hp.instances)
    env = engine.render_env(hp, hp.instances[0], ",".join(map(str, gpus["a"])), "vf-internal-key")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and gpus["b"] == [2]
    args = engine.render_args(hp, hp.instances[0])
    assert "--gpu-memory-utilization 0.92" in " ".join(args) and "--tensor-parallel-size 2" in " ".join(args)
    assert "--kv-cache-memory-bytes" not in args


def test_two_instances_claiming_one_gpu_are_refused(host_data, nvidia_releases):
    with pytest.raises(FleetConfigError, match="GPU 0 is already given to instance a"):
        host_plan(host_data, vllm_releases_dir=str(nvidia_releases), vllm_release="nvidia-vllm-0.32.0",
                  vllm_accelerator="nvidia", vllm_gpu_type="h100-sxm", nvidia_repo_url="https://m.example/r",
                  vllm_instances=[{"name": "a", "port": 8001, "gpus": [0]},
                                                             {"name": "b", "port": 8002, "gpus": [0]}])


