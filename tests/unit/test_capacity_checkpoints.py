"""Checkpoints as they are published: pre-quantized formats read from their own quantization_config
(gpt-oss-120b's MXFP4 among them), fp8 weight-only on Ampere, multimodal configs that leave fields
to the library (gemma-3-27b-it), tight fits warned about, and both decode ceilings.

The gpt-oss-120b and gemma-3-27b-it configs in inventories/model_configs/ are the models' own
config.json files (see the report of issue 10 for where they came from)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from roles.common import GIB
from roles.errors import FleetConfigError
from roles.plan.capacity import TIGHT_SEQUENCES, Deployment, plan_capacity
from roles.plan.fleet import plan_fleet
from roles.plan.gpus import GPUS, MIB, gpu_spec
from roles.plan.model import ModelArch, active_param_count, param_count, weight_bytes
from roles.plan.report import render
from tests.unit.test_plan import article_host

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "inventories" / "model_configs"
GPT_OSS = ModelArch.load(CONFIGS / "openai--gpt-oss-120b", name="gpt-oss-120b")
GEMMA3 = ModelArch.load(CONFIGS / "google--gemma-3-27b-it", name="gemma-3-27b-it")
LLAMA8 = ModelArch.load(CONFIGS / "meta-llama--Llama-3.1-8B-Instruct", name="llama-3.1-8b-instruct")
QWEN72 = ModelArch.load(CONFIGS / "Qwen--Qwen2.5-72B-Instruct", name="qwen2.5-72b-instruct")
H100, H200, A100, A100_40 = GPUS["h100-sxm"], GPUS["h200"], GPUS["a100-80gb"], GPUS["a100-40gb"]
V100 = gpu_spec("v100", {"v100": {"memory_gib": 32, "bandwidth_tb_s": 0.9, "bf16": False, "fp8": False}})

# Llama 3.1 8B's projection weights, from its config: 32 layers, hidden 4096, 32 query and 8 KV
# heads of 128, MLP 14336.
LLAMA8_ATTENTION = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
LLAMA8_MLP = 32 * 3 * 4096 * 14336


def refusal(arch, dep, **kw) -> FleetConfigError:
    with pytest.raises(FleetConfigError) as info:
        plan_capacity(arch, dep, **kw)
    return info.value


def quantized_llama8(quantization_config: dict) -> ModelArch:
    """Llama 3.1 8B's config as a checkpoint quantized with ``quantization_config`` would carry it."""
    config = json.loads((CONFIGS / "meta-llama--Llama-3.1-8B-Instruct" / "config.json").read_text())
    return ModelArch.from_config({**config, "quantization_config": quantization_config}, name="llama-3.1-8b-quantized")


# --- gpt-oss-120b: MXFP4 experts -------------------------------------------------------------------


def test_gpt_oss_config_is_read_as_moe_with_alternating_sliding_layers():
    assert (GPT_OSS.num_experts, GPT_OSS.experts_per_token, GPT_OSS.moe_intermediate_size) == (128, 4, 2880)
    assert GPT_OSS.sliding_window == 128 and GPT_OSS.sliding_window_layers == tuple(range(0, 36, 2))
    assert GPT_OSS.mlp_bias and GPT_OSS.router_bias and GPT_OSS.attention_sinks and GPT_OSS.qkv_bias
    assert GPT_OSS.quantization == "mxfp4" and GPT_OSS.checkpoint_quant.bits == 4 + 8 / 32


def test_gpt_oss_parameters_match_the_model_card():
    # OpenAI's gpt-oss model card (arXiv 2508.10925), table 1: 116.8B parameters, 5.1B active per
    # token. The card's active count leaves out the input embedding table, of which a token reads
    # one row; the planner's counts it (201,088 × 2,880), as it does for every model.
    assert param_count(GPT_OSS) == pytest.approx(116.8e9, rel=0.001)
    assert active_param_count(GPT_OSS) - 201_088 * 2_880 == pytest.approx(5.1e9, rel=0.01)


def test_gpt_oss_weights_are_the_checkpoint_size():
    mxfp4 = weight_bytes(GPT_OSS, "bfloat16", "mxfp4")
    # The experts (36 layers × 128 × gate, up and down of 2880 × 2880) at 4 bits plus an 8-bit scale
    # per 32; everything else in bfloat16.
    experts = 36 * 128 * 3 * 2880 * 2880
    assert mxfp4 == pytest.approx(experts * 4.25 / 8 + (param_count(GPT_OSS) - experts) * 2, abs=1)
    # The model card gives the checkpoint as 60.8 GiB.
    assert mxfp4 / GIB == pytest.approx(60.8, rel=0.01)


def test_gpt_oss_fits_one_h200_and_one_80gb_gpu():
    fit = plan_capacity(GPT_OSS, Deployment(gpu=H200))
    assert fit.quantization == "mxfp4" and fit.weight_bytes_total == weight_bytes(GPT_OSS, "bfloat16", "mxfp4")
    assert fit.max_model_len == 131_072 and fit.max_concurrent_seqs >= TIGHT_SEQUENCES and not fit.warnings
    assert any("experts in mxfp4 at 4.25 bits" in n for n in fit.notes)
    # The model card: "gpt-oss-120b ... runs on a single 80 GB GPU".
    assert plan_capacity(GPT_OSS, Deployment(gpu=H100)).tensor_parallel == 1
    # MXFP4 runs on Ampere through Marlin, not below it.
    assert plan_capacity(GPT_OSS, Deployment(gpu=A100)).quantization == "mxfp4"
    err = refusal(GPT_OSS, Deployment(gpu=V100, gpus_per_instance=4))
    assert err.field == "`vllm_model_id`" and "compute capability 8.0 or later" in err.problem


def test_gpt_oss_through_the_fleet_plan():
    host = article_host(vllm_model_id="openai/gpt-oss-120b", vllm_gpu_type="h200", vllm_dtype="auto",
                        vllm_max_model_len=None, vllm_gpu_memory_utilization=0.9)
    row = render(plan_fleet([("gpu-01", host)], ["gpu-01"])).splitlines()[2]
    assert "1x h200   mxfp4    65.2 GB" in row


def test_a_second_quantization_for_a_quantized_checkpoint_is_refused():
    err = refusal(GPT_OSS, Deployment(gpu=H200, quantization="fp8"))
    assert err.field == "`vllm_quantization`" and "quantized with mxfp4 already" in err.problem
    assert err.fix.startswith("leave it unset")


# --- other pre-quantized formats -------------------------------------------------------------------


def test_awq_gptq_and_compressed_tensors_checkpoints_plan_their_own_bits():
    other = param_count(LLAMA8) - LLAMA8_ATTENTION - LLAMA8_MLP  # embeddings, lm_head, norms: 16-bit
    linear = LLAMA8_ATTENTION + LLAMA8_MLP
    awq = quantized_llama8({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True})
    # 4 bits, plus an fp16 scale and a 4-bit zero point per 128 weights.
    assert weight_bytes(awq, "bfloat16", "awq") == pytest.approx(linear * (4 + 20 / 128) / 8 + other * 2, abs=1)
    gptq8 = quantized_llama8({"quant_method": "gptq", "bits": 8, "group_size": 32, "sym": True})
    assert weight_bytes(gptq8, "bfloat16", "gptq") == pytest.approx(linear * (8 + 24 / 32) / 8 + other * 2, abs=1)
    w4a16 = quantized_llama8({"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*self_attn.*"],
                              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                  "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                                  "symmetric": True}}}})
    # Attention left in 16 bits by the ignore list; the MLP at 4 bits and an fp16 scale per 128.
    assert weight_bytes(w4a16, "bfloat16", "compressed-tensors") == pytest.approx(
        LLAMA8_MLP * (4 + 16 / 128) / 8 + (LLAMA8_ATTENTION + other) * 2, abs=1)
    fit = plan_capacity(w4a16, Deployment(gpu=H100, max_model_len=8192))
    assert fit.quantization == "compressed-tensors" and any("mlp in int4 (group 128)" in n for n in fit.notes)


def test_fp8_checkpoints_block_scales_and_an_unknown_format():
    block = quantized_llama8({"quant_method": "fp8", "weight_block_size": [128, 128]})
    linear = LLAMA8_ATTENTION + LLAMA8_MLP
    # One fp32 scale per 128 × 128 block.
    assert weight_bytes(block, "bfloat16", "fp8") == pytest.approx(
        linear * (8 + 32 / 128**2) / 8 + (param_count(LLAMA8) - linear) * 2, abs=1)
    unknown = quantized_llama8({"quant_method": "bitsandbytes", "load_in_4bit": True})
    fit = plan_capacity(unknown, Deployment(gpu=H100, max_model_len=8192))
    assert fit.weight_bytes_total == 2 * param_count(LLAMA8) and fit.quantization is None
    assert any("bitsandbytes" in n and "upper bound" in n for n in fit.notes)


# --- fp8 without fp8 tensor cores ------------------------------------------------------------------


def test_fp8_llama_8b_fits_an_a100_weight_only():
    fit = plan_capacity(LLAMA8, Deployment(gpu=A100, quantization="fp8", max_model_len=8192))
    # Linear layers in one byte, the rest in two: 9.1 GB against 16.1 GB in bfloat16.
    linear = LLAMA8_ATTENTION + LLAMA8_MLP
    assert fit.weight_bytes_total == linear + 2 * (param_count(LLAMA8) - linear)
    assert any("weight-only through vLLM's Marlin kernel" in n for n in fit.notes)
    assert not any("Marlin" in n for n in plan_capacity(LLAMA8, Deployment(gpu=H100, quantization="fp8",
                                                                            max_model_len=8192)).notes)


def test_fp8_kv_cache_without_fp8_tensor_cores():
    # e4m3 stops vLLM's Triton attention on Ampere; e5m2 is widened to 16 bits in the kernel.
    err = refusal(LLAMA8, Deployment(gpu=A100, kv_cache_dtype="fp8"))
    assert err.field == "`vllm_kv_cache_dtype`" and "fp8e4nv" in err.problem and "fp8_e5m2" in err.fix
    fit = plan_capacity(LLAMA8, Deployment(gpu=A100, kv_cache_dtype="fp8_e5m2", max_model_len=8192))
    assert fit.kv_cache_dtype_bytes == 1 and any("halves KV memory" in n for n in fit.notes)
    err = refusal(LLAMA8, Deployment(gpu=V100, kv_cache_dtype="fp8_e5m2", max_model_len=8192))
    assert "compute capability 8.0 (Ampere)" in err.problem and "fp8_e5m2" not in err.fix


def test_fp8_weights_are_refused_before_turing():
    err = refusal(LLAMA8, Deployment(gpu=V100, quantization="fp8", max_model_len=8192))
    assert err.field == "`vllm_quantization`"
    assert "compute capability 7.5 or later" in err.problem and "v100 is 7.0" in err.problem
    # GPTQ runs from compute capability 6.0; any of the table's GPUs runs fp8.
    assert "GPTQ (int4) checkpoint" in err.fix and "a100-80gb" in err.fix
    turing = gpu_spec("t4", {"t4": {"memory_gib": 15, "bandwidth_tb_s": 0.32, "bf16": False, "fp8": False,
                                     "compute_capability": 7.5}})
    assert plan_capacity(LLAMA8, Deployment(gpu=turing, quantization="fp8", max_model_len=4096)).quantization == "fp8"


# --- multimodal: gemma-3-27b-it --------------------------------------------------------------------


def test_gemma3_text_config_takes_the_library_defaults():
    # Its text_config names neither vocabulary nor context: transformers' Gemma3TextConfig defaults.
    assert (GEMMA3.vocab_size, GEMMA3.max_position_embeddings, GEMMA3.tie_word_embeddings) == (262_208, 131_072, True)
    # Every 6th layer global (sliding_window_pattern 6): 10 of 62, the other 52 local with 1,024 tokens.
    assert GEMMA3.full_attention_layers == 10 and GEMMA3.sliding_window == 1024
    assert (GEMMA3.num_layers, GEMMA3.hidden_size, GEMMA3.head_dim, GEMMA3.num_kv_heads) == (62, 5376, 128, 16)


def test_gemma3_parameters_include_the_vision_tower():
    # Gemma 3 technical report (arXiv 2503.19786), table 1, 27B: 417M vision encoder, 27.4B in all.
    projector = 1152 * 5376 + 1152  # vision width to text width, and the soft-embedding RMSNorm
    assert GEMMA3.vision_params - projector == pytest.approx(417e6, rel=0.01)
    assert param_count(GEMMA3) == pytest.approx(27.4e9, rel=0.02)
    # The vision tower is held, not read when decoding.
    assert param_count(GEMMA3) - active_param_count(GEMMA3) == GEMMA3.vision_params


def test_gemma3_plans():
    fit = plan_capacity(GEMMA3, Deployment(gpu=H100, max_model_len=8192))
    assert fit.weight_bytes_total == 2 * param_count(GEMMA3) and fit.max_concurrent_seqs >= TIGHT_SEQUENCES
    assert any("vision tower" in n for n in fit.notes)


# --- tight fits ------------------------------------------------------------------------------------


def test_qwen_72b_on_four_a100_40gb_warns():
    fit = plan_capacity(QWEN72, Deployment(gpu=A100_40, gpus_per_instance=4), host_gpus=4)
    # 40,960 MiB × 0.90 − a quarter of 145.4 GB of weights − 2 GiB: 0.15 GB of KV cache per GPU, at
    # 2 (K, V) × 80 layers × 2 KV heads × 128 × 2 bytes per token.
    budget = int(40960 * MIB * 0.9) - -(-weight_bytes(QWEN72, "bfloat16") // 4) - 2 * GIB
    assert fit.budget_bytes_per_gpu == budget and 0.14 * GIB < budget < 0.15 * GIB
    assert fit.kv_tokens == budget // (2 * 80 * 2 * 128 * 2) // 16 * 16 == fit.max_model_len
    (warning,) = fit.warnings
    assert warning.startswith("tight fit: 0.2 GB of KV cache per GPU is under 1.1 GB (1 GiB)")
    assert f"1 sequence of {fit.kv_tokens:,} tokens fits at once (under 4)" in warning
    assert "set `vllm_tensor_parallel_size` to 8" in warning and "quantize the weights: fp8" in warning


def test_a_comfortable_fit_does_not_warn():
    fit = plan_capacity(LLAMA8, Deployment(gpu=H100, max_model_len=8192))
    assert fit.max_concurrent_seqs >= TIGHT_SEQUENCES and fit.budget_bytes_per_gpu > GIB and not fit.warnings


def test_plan_output_shows_warnings_and_the_reserve():
    result = subprocess.run([sys.executable, "-m", "roles.cli", "plan", "inventories/prod.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # gpu-01 runs 70B fp8 on one 80 GB GPU: one 8k sequence at a time.
    assert "3.9 GB!" in lines[2] and lines[5].startswith("WARNING gpu-01.internal/a: tight fit: 1 sequence")
    assert any(line.startswith("KV budget/GPU: memory × utilization − weights − reserve; the reserve: 2 GiB per GPU")
               for line in lines)


# --- decode ceilings -------------------------------------------------------------------------------


def test_decode_ceilings_weights_only_and_at_max_model_len():
    fit = plan_capacity(LLAMA8, Deployment(gpu=H100))
    # Unset max_model_len: the model's 131,072, which the KV cache holds. 3.35 TB/s over 16.1 GB of
    # weights; and over those plus 131,072 tokens × 2 × 32 layers × 8 KV heads × 128 × 2 bytes.
    weights = 2 * param_count(LLAMA8)
    assert fit.max_model_len == 131_072
    assert fit.decode_ceiling_weights_only_tokens_per_s == pytest.approx(3.35e12 / weights)
    assert fit.decode_ceiling_tokens_per_s == pytest.approx(3.35e12 / (weights + 131_072 * 2 * 32 * 8 * 128 * 2))
    assert round(fit.decode_ceiling_weights_only_tokens_per_s, 1) == 208.6
    assert round(fit.decode_ceiling_tokens_per_s) == 101
    host = article_host(vllm_model_id="meta-llama/Llama-3.1-8B-Instruct", vllm_dtype="auto",
                        vllm_max_model_len=None, vllm_gpu_memory_utilization=0.9)
    output = render(plan_fleet([("gpu-01", host)], ["gpu-01"])).splitlines()
    assert output[0].endswith("decode: weights  decode: max len")
    assert output[2].endswith("209 tok/s        101 tok/s")
