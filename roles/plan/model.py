"""A decoder-only transformer as its ``config.json`` describes it: parameters, weight bytes and
KV-cache bytes per token, in the dtypes and quantizations vLLM runs (see ``roles.plan.capacity``
for what fits where). Pure arithmetic: no pyinfra, no I/O except reading the config."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from roles.errors import FleetConfigError

WEIGHT_BYTES: dict[str, float] = {
    "bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "awq": 0.5, "gptq": 0.5,
}
"""Bytes per weight of each dtype (``bfloat16``…) and quantization (``fp8``, ``awq``, ``gptq``)."""

INT4_GROUP_OVERHEAD = (16 + 4) / 128 / 8
"""Extra bytes per int4 weight (awq, gptq): an fp16 scale and a 4-bit zero point per group of 128."""

KV_CACHE_BYTES: dict[str, int] = {
    "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
}
"""Bytes per KV-cache element; ``auto`` (vLLM's default) means the weight dtype's, see ``kv_dtype_bytes``."""

QUANTIZATIONS = ("fp8", "awq", "gptq")

DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}

_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")



# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArch:
    """The numbers of a decoder-only transformer that decide its memory, from its config.json."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    num_experts: int
    """Routed experts per MoE layer; 0 for a dense model."""
    experts_per_token: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    """MLP width of the always-active shared expert(s) of MoE models that have them; else 0."""
    sliding_window: int | None
    sliding_window_layers: tuple[int, ...]
    """Indices of the layers that attend only to the last ``sliding_window`` tokens."""
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str
    qkv_bias: bool
    o_bias: bool
    norms_per_layer: int
    quantization: str | None
    """``quant_method`` of a pre-quantized checkpoint (its ``quantization_config``), else None."""

    @property
    def full_attention_layers(self) -> int:
        return self.num_layers - len(self.sliding_window_layers)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str | None = None) -> "ModelArch":
        """Read a Hugging Face config.json dict (multimodal ones through their ``text_config``)."""
        top = dict(cfg)
        if "num_hidden_layers" not in top and isinstance(top.get("text_config"), Mapping):
            top = {**top, **top["text_config"]}
        if name is None:
            name = (str(top.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
                    or (top.get("architectures") or [None])[0] or top.get("model_type") or "model")
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                               "intermediate_size") if not top.get(k)]
        if missing:
            raise FleetConfigError(
                f"config.json of {name}", f"lacks {', '.join(missing)}, so its size cannot be computed.",
                "point the fleet at the model's own Hugging Face config.json (decoder-only models only).")
        model_type = str(top.get("model_type") or "")
        layers, hidden = int(top["num_hidden_layers"]), int(top["hidden_size"])
        heads = int(top["num_attention_heads"])
        num_experts = next((int(top[k]) for k in _EXPERT_KEYS if top.get(k)), 0)
        intermediate = int(top["intermediate_size"])
        shared = int(top.get("shared_expert_intermediate_size") or 0)
        if not shared and top.get("n_shared_experts") and num_experts:
            shared = int(top["n_shared_experts"]) * int(top.get("moe_intermediate_size") or intermediate)
        window = top.get("sliding_window")
        if top.get("use_sliding_window") is False:  # Qwen2 declares a window it does not use
            window = None
        window = int(window) if window else None
        quant = top.get("quantization_config")
        quant = quant.get("quant_method") if isinstance(quant, Mapping) else None
        quant = str(quant) if quant else None
        return cls(
            name=str(name),
            model_type=model_type,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(top.get("num_key_value_heads") or heads),
            head_dim=int(top.get("head_dim") or hidden // heads),
            vocab_size=int(top["vocab_size"]),
            intermediate_size=intermediate,
            num_experts=num_experts,
            experts_per_token=int(top.get("num_experts_per_tok") or 0) if num_experts else 0,
            moe_intermediate_size=int(top.get("moe_intermediate_size") or intermediate),
            shared_expert_intermediate_size=shared,
            sliding_window=window,
            sliding_window_layers=_sliding_layers(top, model_type, layers, window),
            # transformers' default is True; Llama, Qwen and Mixtral configs say false explicitly.
            tie_word_embeddings=bool(top.get("tie_word_embeddings", True)),
            max_position_embeddings=int(top.get("max_position_embeddings") or 0),
            torch_dtype=str(top.get("torch_dtype") or top.get("dtype") or "bfloat16"),
            qkv_bias=bool(top.get("attention_bias")) or model_type in ("qwen2", "qwen2_moe"),
            o_bias=bool(top.get("attention_bias")),
            # Gemma 2 and 3 norm before and after both attention and MLP.
            norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
            quantization=quant,
        )

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> "ModelArch":
        """Read ``config.json`` from a model directory, or the given config file; named ``name``,
        else after the directory."""
        path = Path(path)
        config = path / "config.json" if path.is_dir() else path
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise FleetConfigError(f"model config {config}", f"cannot be read: {exc}.",
                                   "point it at a model directory holding its Hugging Face config.json.") from exc
        return cls.from_config(cfg, name=name or config.parent.name or None)


def _sliding_layers(cfg: Mapping[str, Any], model_type: str, layers: int,
                    window: int | None) -> tuple[int, ...]:
    if window is None:
        return ()
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if model_type == "gemma2":  # even layers local, odd layers global
        return tuple(range(0, layers, 2))
    if model_type.startswith("gemma3"):  # every `sliding_window_pattern`-th layer global
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return tuple(i for i in range(layers) if (i + 1) % pattern)
    if model_type.startswith("qwen") and cfg.get("max_window_layers") is not None:
        return tuple(range(int(cfg["max_window_layers"]), layers))
    return tuple(range(layers))  # Mistral style: one window for every layer


# --- parameters and bytes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    linear: int
    """Attention and MLP projection weights: what quantization shrinks."""
    linear_active: int
    """The same, counting only the experts one token is routed through."""
    other: int
    """Embeddings, lm_head, norms, biases, routers: kept in the model dtype."""


def _params(arch: ModelArch) -> _Params:
    h, layers = arch.hidden_size, arch.num_layers
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attention = h * q + 2 * h * kv + q * h
    biases = (q + 2 * kv if arch.qkv_bias else 0) + (h if arch.o_bias else 0)
    if arch.num_experts:
        expert = 3 * h * arch.moe_intermediate_size
        shared = 3 * h * arch.shared_expert_intermediate_size
        mlp, mlp_active = arch.num_experts * expert + shared, arch.experts_per_token * expert + shared
        router = h * arch.num_experts
    else:
        mlp = mlp_active = 3 * h * arch.intermediate_size
        router = 0
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    norms = layers * arch.norms_per_layer * h + h
    return _Params(linear=layers * (attention + mlp), linear_active=layers * (attention + mlp_active),
                   other=embeddings + norms + layers * (biases + router))


def param_count(arch: ModelArch) -> int:
    """Every parameter: embeddings, lm_head unless tied, attention, MLP (all experts), routers, norms."""
    p = _params(arch)
    return p.linear + p.other


def active_param_count(arch: ModelArch) -> int:
    """Parameters one decoded token reads: an MoE layer's MLP counts only ``experts_per_token`` experts."""
    p = _params(arch)
    return p.linear_active + p.other


def resolve_weight_dtype(arch: ModelArch, weight_dtype: str = "auto", *, bf16: bool = True) -> str:
    """vLLM's ``--dtype``: ``auto`` takes the config's dtype, except that float32 checkpoints run in
    bfloat16 (float16 on GPUs without bf16), and bfloat16 ones in float16 on GPUs without bf16."""
    dtype = DTYPE_ALIASES.get(weight_dtype, weight_dtype)
    if dtype != "auto":
        return dtype
    dtype = DTYPE_ALIASES.get(arch.torch_dtype, arch.torch_dtype)
    if dtype not in ("bfloat16", "float16"):
        dtype = "bfloat16"
    return "float16" if dtype == "bfloat16" and not bf16 else dtype


def weight_bytes(arch: ModelArch, weight_dtype: str, quantization: str | None = None, *,
                 active: bool = False) -> int:
    """Bytes of the weights (``active``: of those one token reads) in ``weight_dtype`` (resolved,
    not ``auto``), with the linear layers in ``quantization`` if given."""
    p = _params(arch)
    base = WEIGHT_BYTES[DTYPE_ALIASES.get(weight_dtype, weight_dtype)]
    linear = p.linear_active if active else p.linear
    if quantization is None:
        per_linear = base
    else:
        per_linear = WEIGHT_BYTES[quantization]
        if quantization in ("awq", "gptq"):
            per_linear += INT4_GROUP_OVERHEAD
    return math.ceil(linear * per_linear + p.other * base)


def kv_dtype_bytes(kv_cache_dtype: str, weight_dtype: str) -> int:
    """Bytes per KV element; ``auto`` is the (resolved) weight dtype's, 2 when that is not a float type."""
    if kv_cache_dtype == "auto":
        return int(WEIGHT_BYTES[weight_dtype]) if weight_dtype in ("bfloat16", "float16", "float32") else 2
    return KV_CACHE_BYTES[kv_cache_dtype]


def kv_heads_per_gpu(arch: ModelArch, tp: int = 1) -> int:
    """KV heads each GPU stores: split across the GPUs, or one replicated head when tp > KV heads."""
    return max(1, arch.num_kv_heads // tp)


def kv_bytes_per_token(arch: ModelArch, kv_dtype_bytes: int) -> int:
    """Bytes each further token adds to a sequence's KV cache, whole model, no tensor parallelism:
    ``2 × full-attention layers × KV heads × head_dim × bytes``. Sliding-window layers add nothing
    once the window is full; ``kv_bytes`` counts them."""
    return 2 * arch.full_attention_layers * arch.num_kv_heads * arch.head_dim * kv_dtype_bytes


def kv_bytes(arch: ModelArch, tokens: int, kv_dtype_bytes: int, tp: int = 1) -> int:
    """KV-cache bytes of one sequence of ``tokens`` tokens, on each GPU at tensor-parallel ``tp``
    (whole model at tp 1): full-attention layers hold every token, sliding-window layers at most
    ``sliding_window``."""
    layer_token = 2 * kv_heads_per_gpu(arch, tp) * arch.head_dim * kv_dtype_bytes
    sliding = len(arch.sliding_window_layers)
    held = arch.full_attention_layers * tokens
    if sliding:
        held += sliding * min(tokens, arch.sliding_window or tokens)
    return layer_token * held
