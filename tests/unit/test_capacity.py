"""Capacity planning: parameter counts, KV cache, the refusals, and the article's numbers checked."""

import json
from pathlib import Path

import pytest

from roles.errors import FleetConfigError
from roles.lab import tiny_model
from roles.plan.capacity import CPU_BLOCK_SIZE, GPU_BLOCK_SIZE, RESERVE_BYTES_PER_GPU, Deployment, plan_capacity
from roles.plan.cost import break_even, cost_per_million_tokens
from roles.plan.gpus import GIB, GPUS, MIB, gpu_spec
from roles.plan.model import (
    ModelArch,
    active_param_count,
    kv_bytes,
    kv_bytes_per_token,
    kv_dtype_bytes,
    param_count,
    resolve_weight_dtype,
    weight_bytes,
)

MODELS = Path(__file__).parents[1] / "fixtures" / "models"
# The configs the project keeps for hub models (what a host without network plans from).
CONFIGS = Path(__file__).resolve().parents[2] / "inventories" / "model_configs"
H100 = GPUS["h100-sxm"]
HUB_IDS = {
    "llama-3.3-70b-instruct": "meta-llama--Llama-3.3-70B-Instruct",
    "llama-3.1-8b-instruct": "meta-llama--Llama-3.1-8B-Instruct",
    "qwen2.5-72b-instruct": "Qwen--Qwen2.5-72B-Instruct",
    "mixtral-8x22b-instruct-v0.1": "mistralai--Mixtral-8x22B-Instruct-v0.1",
    "gemma-2-9b-it": "google--gemma-2-9b-it",
}


def arch(name: str) -> ModelArch:
    if name in HUB_IDS:
        return ModelArch.load(CONFIGS / HUB_IDS[name], name=name)
    return ModelArch.load(MODELS / name)


LLAMA70 = arch("llama-3.3-70b-instruct")
LLAMA8 = arch("llama-3.1-8b-instruct")
QWEN72 = arch("qwen2.5-72b-instruct")
MIXTRAL = arch("mixtral-8x22b-instruct-v0.1")
GEMMA = arch("gemma-2-9b-it")
TINY = arch("tiny-llama")

# The article's setup: Llama 3.3 70B, one H100 80GB, --gpu-memory-utilization 0.92, --max-model-len 8192.
ARTICLE = Deployment(gpu=H100, gpus_per_instance=1, gpu_memory_utilization=0.92, max_model_len=8192)


def refusal(arch_, dep, **kw) -> FleetConfigError:
    with pytest.raises(FleetConfigError) as info:
        plan_capacity(arch_, dep, **kw)
    return info.value


# --- the model ------------------------------------------------------------------------------------


def test_tiny_fixture_is_what_tiny_model_writes():
    assert json.loads((MODELS / "tiny-llama" / "config.json").read_text()) == tiny_model.CONFIG


def test_arch_fields_from_config():
    assert (LLAMA70.num_layers, LLAMA70.hidden_size, LLAMA70.num_heads, LLAMA70.num_kv_heads,
            LLAMA70.head_dim, LLAMA70.vocab_size, LLAMA70.intermediate_size) == (
        80, 8192, 64, 8, 128, 128256, 28672)
    assert LLAMA70.max_position_embeddings == 131072 and LLAMA70.torch_dtype == "bfloat16"
    assert not LLAMA70.tie_word_embeddings and LLAMA70.num_experts == 0 and LLAMA70.sliding_window is None
    assert LLAMA70.name == "llama-3.3-70b-instruct"
    assert LLAMA8.head_dim == 128  # no head_dim key: hidden / heads
    assert (MIXTRAL.num_experts, MIXTRAL.experts_per_token, MIXTRAL.moe_intermediate_size) == (8, 2, 16384)
    assert MIXTRAL.sliding_window is None and MIXTRAL.sliding_window_layers == ()
    # Qwen2 declares sliding_window 131072 but use_sliding_window false: no window.
    assert QWEN72.sliding_window is None and QWEN72.qkv_bias
    # Gemma 2: head_dim 256 (not 3584/16 = 224), tied embeddings (transformers' default), even layers local.
    assert GEMMA.head_dim == 256 and GEMMA.tie_word_embeddings
    assert GEMMA.sliding_window == 4096 and GEMMA.sliding_window_layers == tuple(range(0, 42, 2))
    assert GEMMA.full_attention_layers == 21


def test_arch_variants():
    base = dict(tiny_model.CONFIG)
    mistral = ModelArch.from_config({**base, "sliding_window": 4096})
    assert mistral.sliding_window_layers == (0, 1)  # Mistral style: every layer
    typed = ModelArch.from_config({**base, "sliding_window": 64,
                                   "layer_types": ["full_attention", "sliding_attention"]})
    assert typed.sliding_window_layers == (1,)
    nested = ModelArch.from_config({"architectures": ["X"], "text_config": base}, name="vl")
    assert nested.num_layers == 2 and nested.name == "vl"
    assert ModelArch.from_config({k: v for k, v in base.items() if k != "num_key_value_heads"}).num_kv_heads == 4
    with pytest.raises(FleetConfigError, match="lacks num_hidden_layers"):
        ModelArch.from_config({"architectures": ["X"], "hidden_size": 8})
    with pytest.raises(FleetConfigError, match="cannot be read"):
        ModelArch.load(MODELS / "no-such-model")


def test_load_accepts_config_file_or_directory():
    assert ModelArch.load(MODELS / "tiny-llama" / "config.json") == TINY


def test_param_counts_match_published_sizes():
    assert param_count(LLAMA70) == pytest.approx(70.55e9, rel=0.005)
    assert param_count(LLAMA8) == pytest.approx(8.03e9, rel=0.005)
    assert param_count(QWEN72) == pytest.approx(72.7e9, rel=0.005)
    assert param_count(GEMMA) == pytest.approx(9.24e9, rel=0.005)
    assert param_count(MIXTRAL) == pytest.approx(140.6e9, rel=0.02)
    # Dense: every weight is read per token.
    assert active_param_count(LLAMA70) == param_count(LLAMA70)


def test_moe_active_params_count_two_of_eight_experts():
    assert active_param_count(MIXTRAL) == pytest.approx(39e9, rel=0.02)
    # The difference is exactly 6 experts' MLPs in each of the 56 layers.
    assert param_count(MIXTRAL) - active_param_count(MIXTRAL) == 56 * 6 * 3 * 6144 * 16384


def test_tiny_param_count_equals_the_tensors_tiny_model_writes():
    elements = sum(t.size for t in tiny_model._weights().values())
    assert elements == 852_608
    assert param_count(TINY) == elements


def test_weight_bytes_and_quantization():
    assert weight_bytes(LLAMA70, "bfloat16") == 2 * param_count(LLAMA70)
    # fp8 shrinks the linear layers only; embeddings and lm_head (2.1e9 params) stay bfloat16.
    fp8 = weight_bytes(LLAMA70, "bfloat16", "fp8")
    assert fp8 == param_count(LLAMA70) + 2 * 128256 * 8192 + 80 * 2 * 8192 + 8192
    assert 72.6e9 < fp8 < 72.7e9
    # int4 with group scales: about 0.52 bytes per linear weight.
    assert 39.5e9 < weight_bytes(LLAMA70, "bfloat16", "awq") < 40.0e9


def test_dtype_resolution():
    assert resolve_weight_dtype(LLAMA70) == "bfloat16"
    assert resolve_weight_dtype(TINY) == "bfloat16"  # float32 checkpoints run in bfloat16
    assert resolve_weight_dtype(GEMMA) == "bfloat16"
    assert resolve_weight_dtype(LLAMA70, bf16=False) == "float16"
    assert resolve_weight_dtype(LLAMA70, "half") == "float16"
    assert kv_dtype_bytes("auto", "bfloat16") == 2
    assert kv_dtype_bytes("auto", "float32") == 4
    assert kv_dtype_bytes("fp8_e5m2", "bfloat16") == 1


# --- KV cache -------------------------------------------------------------------------------------


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(LLAMA70, 2) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(TINY, 2) == 2 * 2 * 4 * 32 * 2 == 1_024
    assert kv_bytes_per_token(LLAMA70, 1) == 163_840


def test_tiny_on_cpu_matches_what_vllm_logs():
    # vLLM CPU with --kv-cache-memory-bytes 268435456 logs "CPU KV cache size: 262,144 tokens".
    fit = plan_capacity(TINY, Deployment(gpu=None, cpu_kv_cache_bytes=256 * MIB))
    assert fit.weight_dtype == "bfloat16" and fit.kv_bytes_per_token == 1_024
    assert fit.block_size == CPU_BLOCK_SIZE
    assert fit.budget_bytes_per_gpu == 256 * MIB
    assert fit.kv_tokens == 262_144
    assert fit.max_model_len == 2048  # the model's own limit
    assert fit.max_concurrent_seqs == 128 and fit.max_num_seqs == 128
    assert fit.decode_ceiling_tokens_per_s is None and fit.smallest_tp is None


def test_cpu_kv_tokens_round_down_to_128_token_blocks():
    fit = plan_capacity(TINY, Deployment(cpu_kv_cache_bytes=1_024 * 200 + 5))  # 200 tokens' worth
    assert fit.kv_tokens == 128


def test_sliding_window_layers_hold_at_most_the_window():
    per_layer_token = 2 * 8 * 256 * 2  # Gemma 2 9B, 16-bit
    assert kv_bytes_per_token(GEMMA, 2) == 21 * per_layer_token  # only the full-attention layers grow
    # Up to the window every layer holds every token.
    assert kv_bytes(GEMMA, 1000, 2) == 42 * 1000 * per_layer_token
    # At 8192 tokens the 21 local layers stop at 4096: 3/4 of the naive figure.
    assert kv_bytes(GEMMA, 8192, 2) == (21 * 8192 + 21 * 4096) * per_layer_token
    assert kv_bytes(GEMMA, 8192, 2) == 0.75 * 42 * 8192 * per_layer_token
    # A dense model: linear in tokens.
    assert kv_bytes(LLAMA70, 8192, 2) == 8192 * 327_680


def test_sliding_window_lets_more_sequences_fit():
    fit = plan_capacity(GEMMA, Deployment(gpu=GPUS["l40s"], max_model_len=8192))
    assert fit.kv_bytes_per_token == 42 * 2 * 8 * 256 * 2  # every layer, per cached token
    # 46068 MiB × 0.90 = 43.5 GB − 18.5 GB weights (bf16) − 2.1 GB = 22.8 GB → 66,384 tokens.
    assert fit.kv_tokens == 66_384
    # Naively 66,384 // 8192 = 8 sequences; with the local layers capped at 4096, 10 fit.
    assert fit.kv_tokens // 8192 == 8
    assert fit.max_concurrent_seqs == 10
    assert any("sliding window" in n for n in fit.notes)


def test_kv_heads_split_across_tensor_parallel_or_replicated():
    two = plan_capacity(LLAMA70, Deployment(gpu=H100, gpus_per_instance=2, max_model_len=8192))
    assert two.kv_bytes_per_token == 327_680 // 2  # 4 of 8 KV heads per GPU
    # Fewer KV heads than GPUs: 2 KV heads over 4 GPUs, each GPU keeps one (replicated) head.
    wide = ModelArch.from_config({**tiny_model.CONFIG, "num_attention_heads": 16, "num_key_value_heads": 2,
                                  "head_dim": 8})
    fit = plan_capacity(wide, Deployment(gpu=H100, gpus_per_instance=4, max_model_len=1024))
    assert fit.kv_bytes_per_token == 2 * 2 * 1 * 8 * 2  # one head per GPU, not 2/4
    assert any("replica" in n for n in fit.notes)


# --- the article's setup --------------------------------------------------------------------------


def test_article_70b_bf16_on_one_h100_is_refused_with_the_arithmetic():
    err = refusal(LLAMA70, ARTICLE)
    msg = str(err)
    assert err.field == "`vllm_tensor_parallel_size`"
    assert ("llama-3.3-70b-instruct in bfloat16 needs 141.1 GB of weights, 141.1 GB per GPU at "
            "tensor-parallel 1; one h100-sxm holds 85.5 GB × 0.92 = 78.7 GB") in msg
    assert "2.1 GB is kept for activations and CUDA graphs" in msg
    # The ways out: two GPUs, or fp8 on this GPU (which has fp8).
    assert "set `vllm_tensor_parallel_size` to 2 (70.6 GB of weights per GPU, leaves 6.0 GB per GPU" in err.fix
    assert "36,480 tokens" in err.fix
    assert "fp8 (72.7 GB at tensor-parallel 1, leaves 3.9 GB per GPU for KV cache = 11,824 tokens" in err.fix
    assert "awq" not in err.fix


def test_article_70b_fp8_on_one_h100_fits():
    fit = plan_capacity(LLAMA70, Deployment(gpu=H100, gpu_memory_utilization=0.92, max_model_len=8192,
                                            quantization="fp8"))
    # By hand: 81559 MiB = 85.52 GB × 0.92 = 78.68 GB usable; weights 68.45e9 linear × 1 B
    # + 2.10e9 embeddings/lm_head × 2 B = 72.66 GB; reserve 2 GiB = 2.15 GB; budget 3.88 GB;
    # / 327,680 B per token = 11,826 → 11,824 tokens (16-token blocks). One 8k sequence at a time.
    assert fit.weight_bytes_total == fit.weight_bytes_per_gpu == 72_656_371_712
    assert fit.usable_bytes_per_gpu == int(81559 * MIB * 0.92)
    assert fit.reserve_bytes_per_gpu == RESERVE_BYTES_PER_GPU == 2 * GIB
    assert 3.8e9 < fit.budget_bytes_per_gpu < 3.9e9
    assert 11_000 < fit.kv_tokens < 12_000 and fit.kv_tokens % GPU_BLOCK_SIZE == 0
    assert fit.kv_tokens == 11_824
    assert fit.max_model_len == 8192
    assert fit.max_concurrent_seqs == 1
    assert fit.max_num_seqs == 1  # derived: min(256, max(1, max_concurrent_seqs))
    assert fit.smallest_tp == 1
    # 3.35 TB/s over 72.66 GB of weights + 2.68 GB of KV cache: about 44 tokens/s at best.
    assert 40 < fit.decode_ceiling_tokens_per_s < 47


def test_article_85_tokens_per_second_is_above_the_bandwidth_ceiling():
    # bf16 on two H100s: 2 × 3.35e12 / (141.1e9 + 2 × 1.34e9) ≈ 46.6 tokens/s, far from 85.
    fit = plan_capacity(LLAMA70, Deployment(gpu=H100, gpus_per_instance=2, gpu_memory_utilization=0.92,
                                            max_model_len=8192))
    assert fit.decode_ceiling_tokens_per_s == pytest.approx(2 * 3.35e12 / (141.1e9 + 8192 * 327_680), rel=0.01)
    assert fit.decode_ceiling_tokens_per_s < 85
    assert fit.smallest_tp == 2 and fit.kv_tokens == 36_480 and fit.max_concurrent_seqs == 4


def test_derived_max_model_len_and_max_num_seqs():
    fit = plan_capacity(LLAMA70, Deployment(gpu=H100, gpus_per_instance=2, gpu_memory_utilization=0.92))
    assert fit.max_model_len == fit.kv_tokens == 36_480  # less than the model's 131,072
    assert any("--max-model-len" in n for n in fit.notes)
    # 8B on an H200: 117 GB of KV cache / 131,072 B per token = 896k tokens = 437 sequences of 2,048.
    small = plan_capacity(LLAMA8, Deployment(gpu=GPUS["h200"], max_model_len=2048))
    assert small.max_concurrent_seqs == 437 and small.max_num_seqs == 256
    given = plan_capacity(LLAMA8, Deployment(gpu=GPUS["h200"], max_model_len=2048, max_num_seqs=32))
    assert given.max_num_seqs == 32
    over = plan_capacity(LLAMA70, Deployment(gpu=H100, gpus_per_instance=2, max_model_len=8192, max_num_seqs=64))
    assert over.max_num_seqs == 64 and any("preempted" in n for n in over.notes)


def test_moe_decode_reads_only_active_experts():
    fit = plan_capacity(MIXTRAL, Deployment(gpu=GPUS["h200"], gpus_per_instance=4, max_model_len=8192))
    assert fit.weight_bytes_total == 2 * param_count(MIXTRAL)
    assert fit.active_weight_bytes == 2 * active_param_count(MIXTRAL)
    # 4.8 TB/s per GPU over (78.3 GB / 4 + KV) per GPU: about 240 tokens/s, 3.6× a dense 141B model.
    assert 200 < fit.decode_ceiling_tokens_per_s < 260


# --- refusals --------------------------------------------------------------------------------------


def test_refuses_max_model_len_above_the_model_limit():
    err = refusal(LLAMA8, Deployment(gpu=H100, max_model_len=200_000))
    assert err.field == "`vllm_max_model_len`"
    assert "200,000 tokens is above llama-3.1-8b-instruct's max_position_embeddings of 131,072" in err.problem
    assert "set it to 131,072 or less" in err.fix
    err = refusal(TINY, Deployment(max_model_len=4096))  # CPU too
    assert "max_position_embeddings of 2,048" in err.problem


def test_refuses_kv_cache_smaller_than_one_sequence_on_gpu():
    err = refusal(LLAMA70, Deployment(gpu=H100, gpu_memory_utilization=0.92, quantization="fp8",
                                      max_model_len=16384))
    assert err.field == "`vllm_max_model_len`"
    assert "a 16,384-token sequence of llama-3.3-70b-instruct needs 5.4 GB of KV cache per GPU" in err.problem
    assert ("only 3.9 GB is left: 78.7 GB usable − 72.7 GB of weights − 2.1 GB reserve, 11,824 tokens"
            in err.problem)
    assert err.fix.startswith("set `vllm_max_model_len` to 11,824 or less")
    assert "set `vllm_tensor_parallel_size` to 2" in err.fix
    assert "raise `vllm_gpu_memory_utilization` to 0.95" in err.fix
    assert "set `vllm_kv_cache_dtype` to fp8" in err.fix


def test_refuses_kv_cache_smaller_than_one_sequence_on_cpu():
    err = refusal(TINY, Deployment(cpu_kv_cache_bytes=1 * MIB, max_model_len=2048))
    assert "a 2,048-token sequence of tiny-llama needs 0.0 GB" in err.problem
    assert "(1,048,576 bytes): 1,024 tokens" in err.problem
    assert "set `vllm_max_model_len` to 1,024 or less" in err.fix
    assert "raise `vllm_kv_cache_bytes` to at least 2,097,152" in err.fix


def test_fp8_kv_cache_doubles_tokens():
    auto = plan_capacity(LLAMA70, Deployment(gpu=H100, gpus_per_instance=2, max_model_len=8192))
    fp8 = plan_capacity(LLAMA70, Deployment(gpu=H100, gpus_per_instance=2, max_model_len=8192,
                                            kv_cache_dtype="fp8"))
    assert fp8.kv_bytes_per_token * 2 == auto.kv_bytes_per_token
    assert fp8.kv_tokens == pytest.approx(2 * auto.kv_tokens, abs=GPU_BLOCK_SIZE)


def test_refuses_tp_that_does_not_divide_the_heads():
    err = refusal(LLAMA70, Deployment(gpu=H100, gpus_per_instance=3))
    assert err.field == "`vllm_tensor_parallel_size`"
    assert "tensor-parallel 3 does not divide llama-3.3-70b-instruct's 64 attention heads" in err.problem
    assert "use a size that does: 1, 2, 4, 8" in err.fix
    # Mixtral: 48 query heads split 6 ways, but its 8 KV heads do not.
    err = refusal(MIXTRAL, Deployment(gpu=H100, gpus_per_instance=6), host_gpus=8)
    assert "(8 KV heads)" in err.problem and "1, 2, 4, 8 (at most this host's 8 GPUs)" in err.fix


def test_refuses_tp_above_the_host_gpu_count():
    err = refusal(LLAMA70, Deployment(gpu=H100, gpus_per_instance=4), host_gpus=2)
    assert "tensor-parallel 4 needs 4 GPUs in one host; this host has 2" in err.problem
    assert "lower it to one of 1, 2" in err.fix
    assert plan_capacity(LLAMA70, Deployment(gpu=H100, gpus_per_instance=4), host_gpus=4).tensor_parallel == 4


def test_weight_refusal_names_hosts_that_are_too_small():
    err = refusal(LLAMA70, ARTICLE, host_gpus=1)
    assert "to 2 (70.6 GB of weights per GPU" in err.fix and "needs a host with 2 GPUs, this one has 1" in err.fix


def test_fp8_weights_on_a100_run_weight_only_and_its_e4m3_kv_cache_is_refused():
    a100 = GPUS["a100-80gb"]
    # vLLM runs fp8 weights on Ampere weight-only, through its Marlin kernel.
    fit = plan_capacity(LLAMA70, Deployment(gpu=a100, quantization="fp8"))
    assert fit.quantization == "fp8" and any("weight-only" in n and "not compute" in n for n in fit.notes)
    err = refusal(LLAMA8, Deployment(gpu=a100, kv_cache_dtype="fp8_e4m3"))
    assert err.field == "`vllm_kv_cache_dtype`" and "set it to auto" in err.fix
    # Without fp8 tensor cores, the weight refusal offers fp8 as weight-only.
    err = refusal(LLAMA70, Deployment(gpu=a100, max_model_len=8192))
    assert "fp8 (" in err.fix and "weight-only on a100-80gb" in err.fix


def test_refuses_bfloat16_on_a_gpu_without_it():
    v100 = gpu_spec("v100", {"v100": {"memory_gib": 32, "bandwidth_tb_s": 0.9, "bf16": False, "fp8": False}})
    err = refusal(LLAMA8, Deployment(gpu=v100, weight_dtype="bfloat16"))
    assert err.field == "`vllm_dtype`" and "float16" in err.fix
    assert plan_capacity(LLAMA8, Deployment(gpu=v100, max_model_len=4096)).weight_dtype == "float16"


def test_refuses_invalid_inputs():
    assert "at most 1" in refusal(LLAMA8, Deployment(gpu=H100, gpu_memory_utilization=1.5)).problem
    assert "positive integer" in refusal(LLAMA8, Deployment(gpu=H100, gpus_per_instance=0)).problem
    assert "int8" in refusal(LLAMA8, Deployment(gpu=H100, quantization="int8")).problem
    assert "fp4" in refusal(LLAMA8, Deployment(gpu=H100, kv_cache_dtype="fp4")).problem


def test_where_prefixes_fields():
    err = refusal(LLAMA70, ARTICLE, where="host gpu1: instance a: ")
    assert str(err).startswith("host gpu1: instance a: `vllm_tensor_parallel_size`: llama-3.3-70b-instruct")


# --- GPUs ------------------------------------------------------------------------------------------


def test_gpu_table():
    assert set(GPUS) == {"h100-sxm", "h100-pcie", "h200", "a100-80gb", "a100-40gb", "l40s", "l4", "a10g",
                         "rtx-4090"}
    assert GPUS["h100-sxm"].memory_bytes == 81559 * MIB and GPUS["h200"].memory_bytes == 143771 * MIB
    assert GPUS["h100-sxm"].bandwidth_bytes_per_s == 3.35e12
    assert {k for k, g in GPUS.items() if not g.fp8} == {"a100-80gb", "a100-40gb", "a10g"}
    assert all(g.bf16 for g in GPUS.values())


def test_gpu_spec_extra_adds_and_overrides():
    assert gpu_spec("h200") is GPUS["h200"]
    mine = gpu_spec("b200", {"b200": {"memory_gib": 179, "bandwidth_tb_s": 8, "bf16": True, "fp8": True}})
    assert mine.memory_bytes == 179 * GIB and mine.bandwidth_bytes_per_s == 8e12 and mine.name == "b200"
    slower = gpu_spec("h100-pcie", {"h100-pcie": {"bandwidth_tb_s": 1.9}})
    assert slower.bandwidth_bytes_per_s == 1.9e12 and slower.memory_bytes == GPUS["h100-pcie"].memory_bytes


def test_gpu_spec_refusals():
    with pytest.raises(FleetConfigError) as info:
        gpu_spec("h800")
    assert "known: a100-40gb, a100-80gb, a10g, h100-pcie, h100-sxm, h200, l4, l40s, rtx-4090" in str(info.value)
    assert "vllm_gpu_types" in info.value.fix and "nvidia-smi" in info.value.fix
    with pytest.raises(FleetConfigError, match="fp8 missing"):
        gpu_spec("x", {"x": {"memory_gib": 16, "bandwidth_tb_s": 0.3, "bf16": True}})
    with pytest.raises(FleetConfigError, match="unknown key"):
        gpu_spec("x", {"x": {"memory_gb": 16}})
    with pytest.raises(FleetConfigError, match="positive number"):
        gpu_spec("h200", {"h200": {"memory_gib": "lots"}})


# --- money -----------------------------------------------------------------------------------------


def test_cost_per_million_tokens_matches_the_article():
    # $2.50/h at 6,400 tokens/s: 23.04 M tokens an hour → $0.1085 per million ("$0.11/M").
    assert cost_per_million_tokens(2.50, 6400) == pytest.approx(0.1085, abs=1e-3)


def test_break_even_against_an_api():
    # Against $0.40 per million: break-even at 0.1085 / 0.40 = 27% utilization (the article says
    # "30% ... roughly break-even"), i.e. 150 M tokens a day on one $60/day GPU.
    busy = break_even(2.50, 6400, 0.40, 300e6)
    assert busy.break_even_utilization == pytest.approx(0.2713, abs=1e-3)
    assert busy.self_host_cost_per_day == pytest.approx(60.0)
    assert busy.api_cost_per_day == pytest.approx(120.0)
    assert busy.utilization == pytest.approx(300e6 / (6400 * 86400))
    assert busy.cheaper == "self-host" and busy.instances_needed == 1
    quiet = break_even(2.50, 6400, 0.40, 100e6)
    assert quiet.utilization < quiet.break_even_utilization and quiet.cheaper == "api"
    assert quiet.api_cost_per_day == pytest.approx(40.0)
    # More tokens than one GPU makes in a day: two GPUs rented.
    assert break_even(2.50, 6400, 0.40, 1e9).instances_needed == 2
    with pytest.raises(FleetConfigError):
        cost_per_million_tokens(2.5, 0)
