"""A decoder-only transformer as its ``config.json`` describes it: parameters, weight bytes and
KV-cache bytes per token, in the dtypes and quantizations vLLM runs (see ``roles.plan.capacity``
for what fits where). Multimodal configs are read through their ``text_config``, with the
library defaults the engine applies to what they leave out, and their vision tower counted.
Pure arithmetic: no pyinfra, no I/O except reading the config."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from roles.errors import FleetConfigError
from roles.plan.quantization import LINEAR_KINDS, QuantScheme, checkpoint_scheme, on_the_fly

WEIGHT_BYTES: dict[str, float] = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per weight of each unquantized dtype; quantized ones are ``roles.plan.quantization``'s."""

KV_CACHE_BYTES: dict[str, int] = {
    "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
}
"""Bytes per KV-cache element; ``auto`` (vLLM's default) means the weight dtype's, see ``kv_dtype_bytes``."""

QUANTIZATIONS = ("fp8", "awq", "gptq")
"""What ``vllm_quantization`` may ask for."""

DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}

_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")

CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    # transformers' Gemma3TextConfig: google/gemma-3-*-it leave the vocabulary, the context and the
    # local/global layer pattern to it.
    "gemma3_text": {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "max_position_embeddings": 131_072, "tie_word_embeddings": True, "sliding_window": 4096,
                    "sliding_window_pattern": 6},
    # transformers' SiglipVisionConfig (Gemma 3's vision tower).
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_channels": 3, "image_size": 224, "patch_size": 16},
}
"""What transformers (and so vLLM, which builds on its config classes) fills in, per ``model_type``,
for keys a config.json leaves out."""

_TEXT_MODEL_TYPES = {"gemma3": "gemma3_text"}
"""The text model of a multimodal model type, for a ``text_config`` that names none."""


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
    mlp_bias: bool
    """Biases on the MLP (and expert) projections: gpt-oss, or a config's ``mlp_bias``."""
    router_bias: bool
    attention_sinks: bool
    """One learned logit per attention head and layer (gpt-oss)."""
    qk_norm: bool
    """RMSNorm over each query and key head (Gemma 3, Qwen 3)."""
    norms_per_layer: int
    vision_params: int
    """Vision tower and projector of a multimodal model: held in memory, not read when decoding."""
    quantization: str | None
    """``quant_method`` of a pre-quantized checkpoint (its ``quantization_config``), else None."""
    checkpoint_quant: QuantScheme | None
    """How that checkpoint stores its weights; None when unquantized or a method the planner does not model."""
    config_notes: tuple[str, ...] = ()
    """What the plan should say about the config itself (a format or tower it does not model)."""

    @property
    def full_attention_layers(self) -> int:
        return self.num_layers - len(self.sliding_window_layers)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str | None = None) -> "ModelArch":
        """Read a Hugging Face config.json dict (multimodal ones through their ``text_config``)."""
        top = _text_config(cfg)
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
        vision_params, vision_notes = _vision_params(cfg, hidden)
        quant, scheme, quant_notes = _checkpoint_quantization(top, layers)
        gpt_oss = model_type == "gpt_oss"
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
            experts_per_token=int(top.get("num_experts_per_tok") or top.get("experts_per_token") or 0)
            if num_experts else 0,
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
            mlp_bias=bool(top.get("mlp_bias")) or gpt_oss,
            router_bias=gpt_oss,
            attention_sinks=gpt_oss,
            qk_norm=model_type.startswith(("gemma3", "qwen3")),
            # Gemma 2 and 3 norm before and after both attention and MLP.
            norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
            vision_params=vision_params,
            quantization=quant,
            checkpoint_quant=scheme,
            config_notes=vision_notes + quant_notes,
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


def _with_defaults(cfg: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
    return {**CONFIG_DEFAULTS.get(str(model_type), {}), **cfg}


def _text_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's keys: the config itself, or a multimodal config's ``text_config`` over
    its top level; library defaults under both."""
    text = cfg.get("text_config")
    if "num_hidden_layers" in cfg or not isinstance(text, Mapping):
        return _with_defaults(cfg, cfg.get("model_type"))
    text_type = text.get("model_type") or _TEXT_MODEL_TYPES.get(str(cfg.get("model_type")), cfg.get("model_type"))
    top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    return _with_defaults({**top, **text, "model_type": text_type}, text_type)


def _vision_params(cfg: Mapping[str, Any], text_hidden: int) -> tuple[int, tuple[str, ...]]:
    """Parameters of a SigLIP/CLIP-style vision tower (patch and position embeddings, pre-norm
    encoder layers with biased attention and MLP, a final norm; no pooling head, which
    vision-language models switch off) and the linear projector to the text width (Gemma 3's,
    with its RMSNorm)."""
    if not isinstance(vision := cfg.get("vision_config"), Mapping):
        return 0, ()
    vc = _with_defaults(vision, vision.get("model_type"))
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size")
    if not all(vc.get(k) for k in keys):
        return 0, (f"the vision tower (vision_config model_type {vision.get('model_type')!r}) is not counted: "
                   "the planner knows SigLIP/CLIP-style towers only; leave headroom for it.",)
    h, i, n = int(vc["hidden_size"]), int(vc["intermediate_size"]), int(vc["num_hidden_layers"])
    patch = int(vc["patch_size"])
    patches = (int(vc["image_size"]) // patch) ** 2
    embeddings = int(vc.get("num_channels") or 3) * patch * patch * h + h + patches * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # attention, MLP, two LayerNorms
    projector = h * text_hidden + (h if cfg.get("model_type") == "gemma3" else 0)
    return embeddings + n * layer + 2 * h + projector, ()


def _checkpoint_quantization(cfg: Mapping[str, Any],
                             layers: int) -> tuple[str | None, QuantScheme | None, tuple[str, ...]]:
    """The checkpoint's ``quant_method``, its scheme when the planner models it, and a note when not."""
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, Mapping) or not qcfg.get("quant_method"):
        return None, None, ()
    method = str(qcfg["quant_method"])
    scheme = checkpoint_scheme(qcfg, layers)
    if scheme is None:
        return method, None, (f"the checkpoint's quantization_config ({method}) is not one the planner models: "
                              "its weights are planned in 16 bits, an upper bound.",)
    return method, scheme, ()


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
    linear: dict[str, int]
    """Projection weights of each of ``LINEAR_KINDS``, all layers: what quantization shrinks."""
    linear_active: dict[str, int]
    """The same, counting only the experts one token is routed through."""
    other: int
    """Embeddings, lm_head, norms, biases, routers, sinks: kept in the model dtype."""
    other_active: int
    """The same without the biases of the experts a token is not routed through."""
    vision: int


def _params(arch: ModelArch) -> _Params:
    h, layers = arch.hidden_size, arch.num_layers
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attention = h * q + 2 * h * kv + q * h
    biases = (q + 2 * kv if arch.qkv_bias else 0) + (h if arch.o_bias else 0)
    biases += arch.num_heads if arch.attention_sinks else 0
    if arch.num_experts:
        width = arch.moe_intermediate_size
        mlp, experts, active = 3 * h * arch.shared_expert_intermediate_size, arch.num_experts, arch.experts_per_token
        router = h * arch.num_experts + (arch.num_experts if arch.router_bias else 0)
    else:
        width, mlp, experts, active, router = arch.intermediate_size, 3 * h * arch.intermediate_size, 0, 0, 0
    mlp_biases = 2 * width + h if arch.mlp_bias else 0  # gate and up, then down
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    norms = layers * (arch.norms_per_layer * h + (2 * arch.head_dim if arch.qk_norm else 0)) + h
    other = embeddings + norms + layers * (biases + router + (experts or 1) * mlp_biases)
    return _Params(
        linear={"attention": layers * attention, "mlp": layers * mlp, "experts": layers * experts * 3 * h * width},
        linear_active={"attention": layers * attention, "mlp": layers * mlp,
                       "experts": layers * active * 3 * h * width},
        other=other, other_active=other - layers * (experts - active) * mlp_biases, vision=arch.vision_params)


def param_count(arch: ModelArch) -> int:
    """Every parameter: embeddings, lm_head unless tied, attention, MLP (all experts), routers, norms,
    the vision tower."""
    p = _params(arch)
    return sum(p.linear.values()) + p.other + p.vision


def active_param_count(arch: ModelArch) -> int:
    """Parameters one decoded token reads: an MoE layer's MLP counts only ``experts_per_token``
    experts; a vision tower none."""
    p = _params(arch)
    return sum(p.linear_active.values()) + p.other_active


def quant_scheme(arch: ModelArch, quantization: str | None) -> QuantScheme | None:
    """The scheme ``quantization`` means for this model: the checkpoint's own when it names the
    checkpoint's method, else that method applied on the fly (fp8) or at its default layout."""
    if quantization is None:
        return None
    if quantization == arch.quantization and arch.checkpoint_quant is not None:
        return arch.checkpoint_quant
    return on_the_fly(quantization)


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
    not ``auto``), with the linear layers in ``quantization`` if given (see ``quant_scheme``)."""
    p = _params(arch)
    base = WEIGHT_BYTES[DTYPE_ALIASES.get(weight_dtype, weight_dtype)]
    scheme = quant_scheme(arch, quantization)
    linear = p.linear_active if active else p.linear
    total = (p.other_active if active else p.other + p.vision) * base
    for kind in LINEAR_KINDS:
        kept = 1.0 if scheme is None else scheme.kept_fraction(kind)
        total += linear[kind] * (kept * base + (1 - kept) * (scheme.bits / 8 if scheme else 0))
    return math.ceil(total)


def kv_dtype_bytes(kv_cache_dtype: str, weight_dtype: str) -> int:
    """Bytes per KV element; ``auto`` is the (resolved) weight dtype's, 2 when that is not a float type."""
    if kv_cache_dtype == "auto":
        return int(WEIGHT_BYTES[weight_dtype]) if weight_dtype in WEIGHT_BYTES else 2
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
