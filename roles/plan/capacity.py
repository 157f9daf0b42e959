"""Will this model fit, how much KV cache is left, and how fast can it possibly decode?

Pure arithmetic from a model's ``config.json`` and a GPU's facts (``roles.plan.gpus``): no pyinfra, no
I/O except reading the config. A deployment that cannot work is refused with
``FleetConfigError``, the arithmetic in the message and the ways out in the fix, before any host is
touched (``roles.plan.refusals``). The numbers follow what vLLM does:

* Weights: every parameter in the checkpoint's dtype, a vision tower's included. A pre-quantized
  checkpoint is planned in its own format (MXFP4, fp8, AWQ, GPTQ, compressed-tensors: its
  ``quantization_config``); ``--quantization fp8|awq|gptq`` shrinks the linear layers of attention
  and MLP only. Embeddings, ``lm_head``, norms and MoE routers stay in the model dtype (as vLLM's
  quantization methods leave them); see ``roles.plan.quantization``. Tensor parallelism splits
  weights evenly over the GPUs (the replicated norms are ignored: a few MB).
* Memory: vLLM may use ``total memory × gpu_memory_utilization`` per GPU. Out of that come the
  weights and ``RESERVE_BYTES_PER_GPU`` (activations, CUDA graphs, CUDA context); the rest is KV
  cache. On CPU the KV cache is exactly ``--kv-cache-memory-bytes``. A fit that leaves under
  ``TIGHT_KV_BYTES`` per GPU or fewer than ``TIGHT_SEQUENCES`` max-length sequences is accepted
  with a warning.
* KV cache: ``2 (K and V) × layers × KV heads × head_dim × dtype bytes`` per token. With tensor
  parallelism each GPU holds ``max(1, kv_heads // tp)`` KV heads: split when there are at least as
  many KV heads as GPUs, one replicated head per GPU otherwise (vLLM's rule). Sliding-window
  layers hold at most ``sliding_window`` tokens of a sequence.
* Blocks: 16 tokens on GPUs, 128 on CPU; capacities are rounded down to whole blocks.

Units in messages: GB = 1e9 bytes, one decimal, everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from roles.common import GIB, gb
from roles.errors import FleetConfigError
from roles.plan.instance import (
    CPU_BLOCK_SIZE,
    GPU_BLOCK_SIZE,
    RESERVE_BYTES_PER_GPU,
    TP_CHOICES,
    Deployment,
    PlannedInstance,
    Room,
    fitting_layout,
    longest_sequence,
    resolve,
    room,
    seq_bytes,
    tp_ok,
)
from roles.plan.model import ModelArch, quant_scheme
from roles.plan.quantization import FP8_NATIVE_CAPABILITY
from roles.plan.refusals import (
    alternatives,
    check_checkpoint_quantization,
    check_inputs,
    check_max_model_len,
    check_number_formats,
    check_tensor_parallel,
    refuse_kv,
    refuse_no_room,
)

__all__ = ["CPU_BLOCK_SIZE", "GPU_BLOCK_SIZE", "MAX_NUM_SEQS_CAP", "RESERVE_BYTES_PER_GPU", "TIGHT_KV_BYTES",
           "TIGHT_SEQUENCES", "TP_CHOICES", "Deployment", "Fit", "fits", "plan_capacity"]

MAX_NUM_SEQS_CAP = 256
"""Upper bound of a derived max_num_seqs (vLLM's long-standing default)."""

TIGHT_KV_BYTES = GIB
"""Less KV cache per GPU than this is a tight fit: vLLM's own start-up figures can exceed
``RESERVE_BYTES_PER_GPU`` by about this much, and then it refuses to start."""
TIGHT_SEQUENCES = 4
"""Fewer max-length sequences at once than this is a tight fit: long requests queue or are preempted."""


@dataclass(frozen=True)
class Fit:
    """What one instance holds and how fast it can go; every byte figure is per GPU unless named total."""

    tensor_parallel: int
    weight_dtype: str
    """The dtype the weights run in (``auto`` resolved)."""
    quantization: str | None
    kv_cache_dtype_bytes: int
    weight_bytes_total: int
    weight_bytes_per_gpu: int
    active_weight_bytes: int
    """Weight bytes one decoded token reads, all GPUs together (MoE: routed experts only)."""
    usable_bytes_per_gpu: int
    """``memory × gpu_memory_utilization`` (CPU: the KV cache size)."""
    reserve_bytes_per_gpu: int
    budget_bytes_per_gpu: int
    """KV-cache bytes per GPU: usable − weights − reserve (CPU: ``cpu_kv_cache_bytes`` exactly)."""
    kv_bytes_per_token: int
    """Bytes one cached token takes on each GPU, every layer counted (a sliding-window layer keeps a
    token until it leaves the window)."""
    block_size: int
    kv_tokens: int
    """Tokens the KV cache holds: budget / kv_bytes_per_token, rounded down to whole blocks."""
    max_model_len: int
    max_concurrent_seqs: int
    """Sequences of max_model_len tokens that fit at once (sliding windows taken into account)."""
    max_num_seqs: int
    decode_ceiling_tokens_per_s: float | None
    """Single-stream bound at max_model_len: GPU bandwidth over the bytes one step reads per GPU
    (active weights plus one max-length sequence's KV cache). Real decoding reaches 60-80% of it.
    None on CPU."""
    decode_ceiling_weights_only_tokens_per_s: float | None
    """The same for a short sequence: bandwidth over the active weights alone."""
    smallest_tp: int | None
    """Smallest tensor-parallel size in ``TP_CHOICES`` that divides the heads and fits (GPU only)."""
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    """Accepted, but tight: see ``TIGHT_KV_BYTES`` and ``TIGHT_SEQUENCES``."""


def plan_capacity(arch: ModelArch, dep: Deployment, host_gpus: int | None = None, *,
                  where: str = "") -> Fit:
    """Check one instance of ``arch`` deployed as ``dep`` on a host with ``host_gpus`` GPUs (None:
    not checked); return its ``Fit`` or raise ``FleetConfigError``. ``where`` prefixes the field
    names in messages (e.g. ``"host gpu1: instance a: "``)."""
    outcome = _fit_or_refusal(arch, dep, host_gpus, where)
    if isinstance(outcome, FleetConfigError):
        raise outcome
    return outcome


def fits(arch: ModelArch, dep: Deployment, host_gpus: int | None = None) -> Fit | None:
    """Would ``plan_capacity`` accept this instance? Its ``Fit`` if so, None where it would refuse: the
    same checks, for probing settings (the smallest tensor-parallel size that fits, say) without
    catching. Where ``plan_capacity`` fails with another exception, so does this."""
    outcome = _fit_or_refusal(arch, dep, host_gpus, "")
    return None if isinstance(outcome, FleetConfigError) else outcome


def _fit_or_refusal(arch: ModelArch, dep: Deployment, host_gpus: int | None, where: str) -> Fit | FleetConfigError:
    """The checks in the order they run. Each returns its refusal, or None when it passes; the first
    refusal is the answer, returned rather than raised so that ``fits`` need not catch it."""
    if refusal := check_inputs(arch, dep, where):
        return refusal
    inst = resolve(arch, dep, host_gpus, where)
    if refusal := (check_checkpoint_quantization(inst) or check_number_formats(inst)
                   or check_tensor_parallel(inst) or check_max_model_len(inst)):
        return refusal
    space = room(inst)
    if refusal := refuse_no_room(inst, space) or refuse_kv(inst, space):
        return refusal
    limits = _derive_limits(inst, space)
    return _fit(inst, space, limits)


@dataclass(frozen=True)
class _Limits:
    max_model_len: int
    max_concurrent: int
    max_num_seqs: int
    notes: tuple[str, ...]


def _derive_limits(inst: PlannedInstance, space: Room) -> _Limits:
    """max_model_len and max_num_seqs, as given or derived, with the notes a reader of the Fit needs."""
    arch, dep, max_pos, longest, notes = inst.arch, inst.dep, inst.arch.max_position_embeddings, space.longest, []
    if inst.gpu is None:
        notes.append(f"CPU: the weights ({gb(space.lay.weights_total)}) live in host memory besides the "
                     f"{gb(space.lay.budget)} KV cache.")
    max_model_len = longest if dep.max_model_len is None else dep.max_model_len
    if dep.max_model_len is None and max_pos and longest < max_pos:
        notes.append(f"max_model_len derived as {longest:,} (the model allows {max_pos:,}): pass it as "
                     f"--max-model-len, else vLLM takes the model's limit and refuses to start.")
    max_concurrent = space.lay.budget // seq_bytes(inst.stage, max_model_len, inst.kv_b, inst.tp, space.block)
    max_num_seqs = min(MAX_NUM_SEQS_CAP, max(1, max_concurrent)) if dep.max_num_seqs is None else dep.max_num_seqs
    if dep.max_num_seqs is None:
        notes.append(f"max_num_seqs derived as {max_num_seqs}: as many max-length sequences as the KV cache "
                     f"holds at once (at most {MAX_NUM_SEQS_CAP}), so none is ever preempted; raise it "
                     f"if most requests are much shorter than {max_model_len:,} tokens.")
    elif max_num_seqs > max_concurrent:
        notes.append(f"max_num_seqs {max_num_seqs} exceeds the {max_concurrent} max-length sequences the KV "
                     f"cache holds: long requests will be preempted and recomputed.")
    if arch.sliding_window_layers:
        notes.append(f"{len(arch.sliding_window_layers)} of {arch.num_layers} layers use a "
                     f"{arch.sliding_window:,}-token sliding window; kv_tokens counts every layer, "
                     f"max_concurrent_seqs caps those layers at the window.")
    if inst.tp > arch.num_kv_heads:
        notes.append(f"{arch.num_kv_heads} KV heads over {inst.tp} GPUs: each GPU keeps a replica of one KV head, "
                     f"so KV cache is not split further.")
    return _Limits(max_model_len, max_concurrent, max_num_seqs, tuple(notes) + _format_notes(inst, space))


def _format_notes(inst: PlannedInstance, space: Room) -> tuple[str, ...]:
    """How the weights and the KV cache are stored, where the plan reads that from the config or
    where the GPU runs a format weight-only."""
    arch, gpu, notes = inst.arch, inst.gpu, list(inst.arch.config_notes)
    scheme = quant_scheme(arch, inst.quant)
    if inst.quant in ("awq", "gptq") and arch.quantization != inst.quant:
        notes.append(f"{inst.quant} needs a checkpoint quantized with {inst.quant}; this config is {arch.torch_dtype}.")
    elif scheme is not None and arch.quantization == inst.quant:
        present = {"attention": True, "mlp": not arch.num_experts or bool(arch.shared_expert_intermediate_size),
                   "experts": bool(arch.num_experts)}
        quantized = [k for k, there in present.items() if there and scheme.kept_fraction(k) < 1.0]
        kept = [k for k, there in present.items() if there and scheme.kept_fraction(k) == 1.0]
        kept += ["embeddings", "lm_head", "norms"] + (["routers"] if arch.num_experts else [])
        notes.append(f"weights as the checkpoint's quantization_config stores them: "
                     f"{' and '.join(quantized) or 'no layer of this model'} in {scheme.description} at "
                     f"{scheme.bits:.2f} bits per weight (scales included); {', '.join(kept)} in {inst.dtype}: "
                     f"{gb(space.lay.weights_total)} in all.")
    if arch.vision_params:
        notes.append(f"the vision tower and projector ({arch.vision_params / 1e9:.2f}B parameters) are part of the "
                     "weights in memory, and not read when decoding.")
    if gpu is not None and scheme is not None and scheme.fp8 and gpu.compute_capability < FP8_NATIVE_CAPABILITY:
        notes.append(f"fp8 weights on {gpu.name} (compute capability {gpu.compute_capability:.1f}, no fp8 tensor "
                     "cores) run weight-only through vLLM's Marlin kernel: stored in 8 bits and dequantized to "
                     "16 bits in the kernel, so fp8 saves memory (and bytes read per token), not compute.")
    if gpu is not None and not gpu.fp8 and inst.dep.kv_cache_dtype == "fp8_e5m2":
        notes.append(f"fp8_e5m2 KV cache on {gpu.name}: stored in 8 bits and widened to 16 inside the attention "
                     "kernel, so it halves KV memory, not attention compute.")
    return tuple(notes)


def _decode_ceilings(inst: PlannedInstance, space: Room,
                     max_model_len: int) -> tuple[float | None, float | None, str | None]:
    """Single-stream decode bounds, tokens/s: bandwidth over the bytes one step reads per GPU, at
    max_model_len tokens of context and with the weights alone (none on CPU); and the note saying so."""
    if (gpu := inst.gpu) is None:
        return None, None, None
    weights = space.active / inst.tp
    kv = seq_bytes(inst.arch, max_model_len, inst.kv_b, inst.tp, space.block)
    at_len, weights_only = gpu.bandwidth_bytes_per_s / (weights + kv), gpu.bandwidth_bytes_per_s / weights
    note = (f"single-stream decode is bounded by memory bandwidth ({gpu.bandwidth_bytes_per_s / 1e12:.2f} TB/s): "
            f"{weights_only:.0f} tokens/s reading the weights alone ({gb(weights)} per GPU per token), "
            f"{at_len:.0f} tokens/s at {max_model_len:,} tokens of context (plus {gb(kv)} of KV cache per GPU).")
    return at_len, weights_only, note


def _warnings(inst: PlannedInstance, space: Room, limits: _Limits) -> tuple[str, ...]:
    """A GPU fit that vLLM's own start-up figures could tip over, or that holds few long requests."""
    budget = space.lay.budget
    if inst.gpu is None or (budget >= TIGHT_KV_BYTES and limits.max_concurrent >= TIGHT_SEQUENCES):
        return ()
    why = []
    if budget < TIGHT_KV_BYTES:
        why.append(f"{gb(budget)} of KV cache per GPU is under {gb(TIGHT_KV_BYTES)} ({TIGHT_KV_BYTES / GIB:g} GiB), "
                   f"about how far vLLM's own start-up measurement can exceed the {gb(RESERVE_BYTES_PER_GPU)} "
                   "reserve (it then refuses to start)")
    if limits.max_concurrent < TIGHT_SEQUENCES:
        count = limits.max_concurrent
        why.append(f"{count} sequence{'' if count == 1 else 's'} of {limits.max_model_len:,} tokens "
                   f"fit{'s' if count == 1 else ''} at once (under {TIGHT_SEQUENCES}): further long requests wait "
                   "or are preempted")
    fixes = []
    quarter = min(longest_sequence(inst.stage, budget // TIGHT_SEQUENCES, inst.kv_b, inst.tp, space.block),
                  inst.arch.max_position_embeddings or budget)
    if space.block <= quarter < limits.max_model_len:
        fixes.append(f"set {inst.field('vllm_max_model_len')} to {quarter:,} ({TIGHT_SEQUENCES} at once)")
    fixes += alternatives(inst)
    ways = f" Ways out: {'; or '.join(fixes)}." if fixes else ""
    return (f"tight fit: {'; '.join(why)}.{ways}",)


def _fit(inst: PlannedInstance, space: Room, limits: _Limits) -> Fit:
    lay = space.lay
    smallest = None if inst.gpu is None else next(
        (t for t in TP_CHOICES if tp_ok(inst.arch, t) and fitting_layout(inst, t, inst.quant)), None)
    at_len, weights_only, decode_note = _decode_ceilings(inst, space, limits.max_model_len)
    return Fit(
        tensor_parallel=inst.tp, weight_dtype=inst.dtype, quantization=inst.quant, kv_cache_dtype_bytes=inst.kv_b,
        weight_bytes_total=lay.weights_total, weight_bytes_per_gpu=lay.weights_per_gpu,
        active_weight_bytes=space.active, usable_bytes_per_gpu=lay.usable, reserve_bytes_per_gpu=lay.reserve,
        budget_bytes_per_gpu=lay.budget, kv_bytes_per_token=space.per_token, block_size=space.block,
        kv_tokens=space.kv_tokens, max_model_len=limits.max_model_len, max_concurrent_seqs=limits.max_concurrent,
        max_num_seqs=limits.max_num_seqs, decode_ceiling_tokens_per_s=at_len,
        decode_ceiling_weights_only_tokens_per_s=weights_only, smallest_tp=smallest,
        notes=limits.notes + ((decode_note,) if decode_note else ()), warnings=_warnings(inst, space, limits),
    )
