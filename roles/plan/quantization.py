"""What a quantized checkpoint's weights cost, from its ``quantization_config`` (or from
``--quantization`` applied on the fly): bits per quantized weight with the scales and zero points,
which linear layers are quantized, and the GPUs vLLM runs the format on. Embeddings, ``lm_head``,
norms and routers stay in the model dtype in every format vLLM loads. Pure arithmetic: no pyinfra,
no I/O.

The GPU limits are vLLM's own (each method's ``get_min_capability`` and its quantization docs,
v0.32): fp8 runs from compute capability 7.5, natively (W8A8) from 8.9 and weight-only (W8A16,
dequantized to 16 bits in the Marlin kernel) below; MXFP4 runs from 8.0 (Marlin below Hopper);
AWQ from 7.5; GPTQ from 6.0; compressed-tensors int weight-only schemes from 8.0 (Marlin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

LINEAR_KINDS = ("attention", "mlp", "experts")
"""The linear layers a format may quantize: attention projections, dense (or shared-expert) MLPs,
routed experts."""

MXFP4_BITS = 4 + 8 / 32
"""OCP MX FP4: a 4-bit (e2m1) value per weight and one 8-bit (e8m0) scale per block of 32."""

FP8_NATIVE_CAPABILITY = 8.9
"""Compute capability of the first GPUs with fp8 tensor cores (Ada); below it fp8 is weight-only."""

MIN_CAPABILITY = {"fp8": 7.5, "mxfp4": 8.0, "awq": 7.5, "gptq": 6.0}
"""Lowest compute capability vLLM runs each method on (compressed-tensors: per scheme, below)."""


@dataclass(frozen=True)
class QuantScheme:
    """How one quantization format stores a model's linear layers."""

    method: str
    """vLLM's name for it: the checkpoint's ``quant_method``, or ``--quantization``."""
    bits: float
    """Bits per quantized weight, its share of the scales and zero points included."""
    kept: tuple[tuple[str, float], ...]
    """Per linear kind, the fraction of layers the format leaves in the model dtype."""
    fp8: bool
    """fp8 weights: fp8 GEMMs from compute capability 8.9, weight-only through Marlin below."""
    min_capability: float
    description: str
    """The weights as the plan names them, e.g. ``int4 (group 128)``."""

    def kept_fraction(self, kind: str) -> float:
        return dict(self.kept).get(kind, 0.0)


def on_the_fly(method: str) -> QuantScheme:
    """``--quantization fp8`` applied to a 16-bit checkpoint (every linear layer, a per-tensor
    scale), or an AWQ/GPTQ checkpoint the planner has not seen: 4 bits, an fp16 scale and a 4-bit
    zero point per group of 128, the layout those tools write by default."""
    if method == "fp8":
        return QuantScheme("fp8", 8, (), True, MIN_CAPABILITY["fp8"], "fp8")
    return QuantScheme(method, 4 + (16 + 4) / 128, (), False, MIN_CAPABILITY[method], "int4 (group 128)")


def checkpoint_scheme(qcfg: Mapping[str, Any], layers: int) -> QuantScheme | None:
    """The scheme a checkpoint's ``quantization_config`` describes; None for a method the planner
    does not model (it then plans the weights in 16 bits, an upper bound)."""
    method = str(qcfg.get("quant_method") or "")
    skipped = qcfg.get("modules_to_not_convert") or qcfg.get("ignored_layers") or qcfg.get("ignore") or []
    kept = _kept(skipped, layers)
    if method == "mxfp4":
        # vLLM quantizes only the fused MoE experts with MXFP4; every other linear layer loads unquantized.
        kept = {**kept, "attention": 1.0, "mlp": 1.0}
        return QuantScheme("mxfp4", MXFP4_BITS, tuple(kept.items()), False, MIN_CAPABILITY["mxfp4"], "mxfp4")
    if method == "fp8":
        block = qcfg.get("weight_block_size")
        bits = 8 + (32 / (block[0] * block[1]) if block else 0)  # an fp32 scale per block
        return QuantScheme("fp8", bits, tuple(kept.items()), True, MIN_CAPABILITY["fp8"], "fp8")
    if method in ("awq", "gptq"):
        bits = int(qcfg.get("bits") or qcfg.get("w_bit") or 4)
        group = int(qcfg.get("group_size") or qcfg.get("q_group_size") or 128)
        zero_point = method == "gptq" or qcfg.get("zero_point", True)  # GPTQ stores zeros even when symmetric
        per_weight = bits + ((16 + (bits if zero_point else 0)) / group if group > 0 else 0)
        grouping = f"group {group}" if group > 0 else "per channel"
        return QuantScheme(method, per_weight, tuple(kept.items()), False, MIN_CAPABILITY[method],
                           f"int{bits} ({grouping})")
    if method == "compressed-tensors":
        return _compressed_tensors(qcfg, kept)
    return None


def _compressed_tensors(qcfg: Mapping[str, Any], kept: dict[str, float]) -> QuantScheme | None:
    """llm-compressor's format: the widest weight scheme of its ``config_groups``."""
    groups = [g for g in (qcfg.get("config_groups") or {}).values() if isinstance(g, Mapping) and g.get("weights")]
    if not groups:
        return None
    widest = max(groups, key=lambda g: int(g["weights"].get("num_bits") or 16))
    weights = widest["weights"]
    bits, kind = int(weights.get("num_bits") or 16), str(weights.get("type") or "int")
    group = int(weights.get("group_size") or 0)
    overhead = 0.0
    if group > 0 and str(weights.get("strategy") or "group") in ("group", "tensor_group"):
        # fp4 (NVFP4) keeps an fp8 scale per group, ints an fp16 scale and, when asymmetric, a zero point.
        scale_bits = 8 if kind == "float" else 16 + (0 if weights.get("symmetric", True) else bits)
        overhead = scale_bits / group
    fp8 = kind == "float" and bits == 8
    activations = bool(widest.get("input_activations"))
    min_capability = 7.5 if fp8 or (kind == "int" and activations) else 8.0  # int weight-only: Marlin
    name = f"{'fp' if kind == 'float' else 'int'}{bits}"
    return QuantScheme("compressed-tensors", bits + overhead, tuple(kept.items()), fp8, min_capability,
                       f"{name} ({'group ' + str(group) if overhead else 'per channel'})")


def _kept(entries: Any, layers: int) -> dict[str, float]:
    """The fraction of layers whose attention, MLP or experts the checkpoint leaves unquantized, from
    its ``modules_to_not_convert`` / ``ignore`` entries (names or ``re:`` patterns). An entry that
    names one layer counts for that layer; embeddings, lm_head, norms, routers and vision towers
    are 16-bit in the plan already."""
    whole: set[str] = set()
    per_layer: dict[str, set[int]] = {}
    for entry in entries if isinstance(entries, list) else []:
        name = str(entry).lower().removeprefix("re:")
        layer = re.search(r"layers\.(\d+)\.", name)
        for kind in _kinds(name):
            if layer:
                per_layer.setdefault(kind, set()).add(int(layer.group(1)))
            else:
                whole.add(kind)
    fractions = {kind: min(1.0, len(idx) / max(layers, 1)) for kind, idx in per_layer.items()}
    return {**fractions, **{kind: 1.0 for kind in whole}}


def _kinds(name: str) -> tuple[str, ...]:
    if re.search(r"router|(?<![a-z_])gate(?!_)|expert_gate", name):
        return ()
    if "shared_expert" in name:
        return ("mlp",)
    if "expert" in name:
        return ("experts",)
    if "attn" in name or "attention" in name:
        return ("attention",)
    if re.search(r"mlp|feed_forward|ffn|(gate|up|down)_proj", name):
        return ("mlp", "experts")
    return ()
