"""``fits``: plan_capacity's question without the exception, and the tensor-parallel probe built on it."""

import itertools
from collections import Counter
from pathlib import Path

import pytest

from roles.errors import FleetConfigError
from roles.plan.capacity import Deployment, Fit, fits, plan_capacity
from roles.plan.fleet import Instance, instance_fit
from roles.plan.gpus import GPUS, gpu_spec
from roles.plan.model import ModelArch

CONFIGS = Path(__file__).resolve().parents[2] / "inventories" / "model_configs"
MODELS = Path(__file__).parents[1] / "fixtures" / "models"
LLAMA70 = ModelArch.load(CONFIGS / "meta-llama--Llama-3.3-70B-Instruct", name="llama-3.3-70b-instruct")
LLAMA8 = ModelArch.load(CONFIGS / "meta-llama--Llama-3.1-8B-Instruct", name="llama-3.1-8b-instruct")
GEMMA = ModelArch.load(CONFIGS / "google--gemma-2-9b-it", name="gemma-2-9b-it")
TINY = ModelArch.load(MODELS / "tiny-llama")
H100 = GPUS["h100-sxm"]
# Pre-Ampere (compute capability 7.0): the GPUs where vLLM runs no fp8 weights, so the grid below
# still reaches a `vllm_quantization` refusal now that fp8 on A100 is accepted.
V100 = gpu_spec("v100", {"v100": {"memory_gib": 32, "bandwidth_tb_s": 0.9, "bf16": False, "fp8": False}})


def outcome(arch, dep, host_gpus=None) -> Fit | str:
    """plan_capacity's answer: its Fit, or the field it refuses."""
    try:
        return plan_capacity(arch, dep, host_gpus)
    except FleetConfigError as err:
        return err.field


def test_fits_returns_plan_capacitys_fit():
    dep = Deployment(gpu=H100, gpu_memory_utilization=0.92, max_model_len=8192, quantization="fp8")
    fit = fits(LLAMA70, dep)
    assert fit == plan_capacity(LLAMA70, dep)
    assert fit.kv_tokens == 11_824 and fit.max_concurrent_seqs == 1


def test_fits_is_none_where_the_weights_alone_do_not_fit():
    dep = Deployment(gpu=H100, gpu_memory_utilization=0.92, max_model_len=8192)  # 141 GB of bf16 weights
    assert fits(LLAMA70, dep) is None
    with pytest.raises(FleetConfigError, match="needs 141.1 GB of weights") as info:
        plan_capacity(LLAMA70, dep)
    assert info.value.field == "`vllm_tensor_parallel_size`"


def test_fits_is_none_where_the_kv_cache_holds_not_one_sequence():
    gpu = Deployment(gpu=H100, gpu_memory_utilization=0.92, quantization="fp8", max_model_len=16384)
    cpu = Deployment(max_model_len=2048, cpu_kv_cache_bytes=1 << 20)
    for arch, dep in ((LLAMA70, gpu), (TINY, cpu)):
        assert fits(arch, dep) is None
        with pytest.raises(FleetConfigError, match="of KV cache") as info:
            plan_capacity(arch, dep)
        assert info.value.field == "`vllm_max_model_len`"
    # The same deployments with a length that fits are accepted.
    assert fits(LLAMA70, Deployment(gpu=H100, gpu_memory_utilization=0.92, quantization="fp8", max_model_len=8192))
    assert fits(TINY, Deployment(max_model_len=2048))


def test_fits_agrees_with_plan_capacity_on_a_grid():
    seen: Counter[str] = Counter()
    grid = itertools.product(
        (LLAMA70, LLAMA8, GEMMA, TINY), (None, H100, GPUS["a100-80gb"], GPUS["l4"], V100), (0, 1, 2, 3, 4, 8),
        ("auto", "float16", "bogus"), (None, "fp8", "awq"), ("auto", "fp8"), (0.5, 0.9, 1.2),
        (None, 8192, 10**6), (None, 2, 8))
    for arch, gpu, tp, dtype, quant, kv, util, max_len, host_gpus in grid:
        dep = Deployment(gpu=gpu, gpus_per_instance=tp, weight_dtype=dtype, quantization=quant, kv_cache_dtype=kv,
                         gpu_memory_utilization=util, max_model_len=max_len)
        expected = outcome(arch, dep, host_gpus)
        answer = fits(arch, dep, host_gpus)
        if isinstance(expected, Fit):
            assert answer == expected, (arch.name, dep, host_gpus)
            seen["fit"] += 1
        else:
            assert answer is None, (arch.name, dep, host_gpus, expected)
            seen[expected] += 1
    # The grid reaches every kind of answer, so the agreement above is not vacuous.
    assert seen["fit"] > 100
    assert set(seen) == {"fit", "`vllm_tensor_parallel_size`", "`vllm_gpu_memory_utilization`",
                         "`vllm_quantization`", "`vllm_kv_cache_dtype`", "`vllm_dtype`", "`vllm_max_model_len`"}


def instance(**overrides) -> Instance:
    settings = {"vllm_tensor_parallel_size": None, "vllm_dtype": "auto", "vllm_quantization": None,
                "vllm_kv_cache_dtype": "auto", "vllm_gpu_memory_utilization": 0.92, "vllm_max_model_len": 8192,
                "vllm_max_num_seqs": None, "vllm_kv_cache_bytes": 1 << 30}
    return Instance(name="a", port=8000, settings={**settings, **overrides})


def test_unset_tensor_parallel_is_the_smallest_size_that_fits():
    fit = instance_fit("h", LLAMA70, H100, instance(), host_gpus=8)
    assert fit.tensor_parallel == 2 and fit == plan_capacity(LLAMA70, Deployment(
        gpu=H100, gpus_per_instance=2, gpu_memory_utilization=0.92, max_model_len=8192), 8)
    assert instance_fit("h", LLAMA8, H100, instance(), host_gpus=8).tensor_parallel == 1


def test_unset_tensor_parallel_that_fits_nowhere_on_the_host_is_tensor_parallel_1s_refusal():
    with pytest.raises(FleetConfigError) as info:
        instance_fit("h", LLAMA70, H100, instance(), host_gpus=1)
    assert str(info.value).startswith("host h: instance a: `vllm_tensor_parallel_size`: llama-3.3-70b-instruct in "
                                      "bfloat16 needs 141.1 GB of weights, 141.1 GB per GPU at tensor-parallel 1;")
    assert "needs a host with 2 GPUs, this one has 1" in info.value.fix
