"""Will this model fit, how much KV cache is left, and how fast can it possibly decode?

Pure arithmetic from a model's ``config.json`` and a GPU's facts (``roles.plan.gpus``): no pyinfra, no
I/O except reading the config. A deployment that cannot work is refused with
``FleetConfigError``, the arithmetic in the message and the ways out in the fix, before any host is
touched. The numbers follow what vLLM does:

* Weights: every parameter in the checkpoint's dtype. ``--quantization fp8|awq|gptq`` shrinks the
  linear layers of attention and MLP only; embeddings, ``lm_head``, norms and MoE routers stay in
  the model dtype (as vLLM's quantization methods leave them). Tensor parallelism splits weights
  evenly over the GPUs (the replicated norms are ignored: a few MB).
* Memory: vLLM may use ``total memory × gpu_memory_utilization`` per GPU. Out of that come the
  weights and ``RESERVE_BYTES_PER_GPU`` (activations, CUDA graphs, CUDA context); the rest is KV
  cache. On CPU the KV cache is exactly ``--kv-cache-memory-bytes``.
* KV cache: ``2 (K and V) × layers × KV heads × head_dim × dtype bytes`` per token. With tensor
  parallelism each GPU holds ``max(1, kv_heads // tp)`` KV heads: split when there are at least as
  many KV heads as GPUs, one replicated head per GPU otherwise (vLLM's rule). Sliding-window
  layers hold at most ``sliding_window`` tokens of a sequence.
* Blocks: 16 tokens on GPUs, 128 on CPU; capacities are rounded down to whole blocks.

Units in messages: GB = 1e9 bytes, one decimal, everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from roles.common import GIB
from roles.errors import FleetConfigError
from roles.plan.gpus import GPUS, GpuSpec
from roles.plan.model import (
    KV_CACHE_BYTES,
    QUANTIZATIONS,
    ModelArch,
    kv_bytes,
    kv_dtype_bytes,
    kv_heads_per_gpu,
    resolve_weight_dtype,
    weight_bytes,
)

RESERVE_BYTES_PER_GPU = 2 * GIB
"""Memory per GPU kept out of the KV cache besides the weights.

vLLM measures, at start-up, the peak of a profile forward pass (activations of a full batch of
``max_num_batched_tokens``: about 1-1.5 GiB for 7B-70B models at 8,192 tokens, as its start-up log
reports), memory outside PyTorch's allocator (CUDA context, cuBLAS/NCCL workspaces: 0.1-0.5 GiB)
and the CUDA-graph pools (0.2-0.5 GiB). None of these grow with the GPU's size, so the reserve is a
flat amount rather than a fraction of memory (4% of an H200 would be 5.8 GB, several times what an
8B model needs). Expect vLLM's own figure to differ by up to about a GiB either way; one GiB is
3,300 tokens of Llama 3.3 70B's 16-bit KV cache."""

GPU_BLOCK_SIZE = 16
"""Tokens per KV-cache block on NVIDIA GPUs (vLLM's default)."""
CPU_BLOCK_SIZE = 128
"""Tokens per KV-cache block on CPU (vLLM's CPU default)."""

MAX_NUM_SEQS_CAP = 256
"""Upper bound of a derived max_num_seqs (vLLM's long-standing default)."""

TP_CHOICES = (1, 2, 4, 8)
"""Tensor-parallel sizes tried for ``smallest_tp`` and suggested in fixes (one host's GPUs)."""


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _round_down(n: float, block: int) -> int:
    return max(0, int(n // block) * block)


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _longest_sequence(arch: ModelArch, budget: int, kv_b: int, tp: int, block: int) -> int:
    """The most tokens (whole blocks) one sequence can hold in ``budget`` bytes per GPU."""
    layer_token = 2 * kv_heads_per_gpu(arch, tp) * arch.head_dim * kv_b
    full, sliding = arch.full_attention_layers, len(arch.sliding_window_layers)
    n = budget / (layer_token * (full + sliding))
    if sliding and n > (window := arch.sliding_window or 0):
        n = math.inf if full == 0 else (budget / layer_token - sliding * window) / full
    if n == math.inf:
        return arch.max_position_embeddings or 0
    return _round_down(n, block)


# --- a deployment ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One vLLM instance as the inventory describes it."""

    gpu: GpuSpec | None = None
    """The GPU type; None for a CPU instance."""
    gpus_per_instance: int = 1
    """Tensor-parallel size (``vllm_tensor_parallel_size``)."""
    weight_dtype: str = "auto"
    """``vllm_dtype``: auto, bfloat16, float16 or float32."""
    quantization: str | None = None
    """None, fp8 (on the fly from a 16-bit checkpoint), awq or gptq (pre-quantized checkpoints)."""
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None
    """None: the longest one sequence that fits, at most the model's max_position_embeddings."""
    max_num_seqs: int | None = None
    """None: derived, see ``Fit.max_num_seqs``."""
    cpu_kv_cache_bytes: int = 1 << 30
    """KV cache of a CPU instance (``vllm_kv_cache_bytes``)."""


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
    """Single-stream bound: GPU bandwidth over the bytes one step reads per GPU (active weights
    plus one max-length sequence's KV cache). Real decoding reaches 60-80% of it. None on CPU."""
    smallest_tp: int | None
    """Smallest tensor-parallel size in ``TP_CHOICES`` that divides the heads and fits (GPU only)."""
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Layout:
    weights_total: int
    weights_per_gpu: int
    usable: int
    reserve: int
    budget: int


def _layout(arch: ModelArch, gpu: GpuSpec, util: float, tp: int, dtype: str, quant: str | None) -> _Layout:
    total = weight_bytes(arch, dtype, quant)
    per_gpu = math.ceil(total / tp)
    usable = int(gpu.memory_bytes * util)
    return _Layout(total, per_gpu, usable, RESERVE_BYTES_PER_GPU, usable - per_gpu - RESERVE_BYTES_PER_GPU)


def _tp_ok(arch: ModelArch, tp: int) -> bool:
    """vLLM splits query heads evenly, and KV heads either evenly or by whole replicas."""
    kv = arch.num_kv_heads
    return arch.num_heads % tp == 0 and (kv % tp == 0 if kv >= tp else tp % kv == 0)


def _seq_bytes(arch: ModelArch, tokens: int, kv_b: int, tp: int, block: int) -> int:
    return kv_bytes(arch, _round_up(tokens, block), kv_b, tp)


def _tokens(arch, lay: _Layout, kv_b: int, tp: int) -> int:
    return _round_down(max(lay.budget, 0) / kv_bytes(arch, 1, kv_b, tp), GPU_BLOCK_SIZE)


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
    if refusal := _check_inputs(arch, dep, where):
        return refusal
    inst = _resolve(arch, dep, host_gpus, where)
    if refusal := _check_number_formats(inst) or _check_tensor_parallel(inst) or _check_max_model_len(inst):
        return refusal
    room = _room(inst)
    if refusal := _refuse_no_room(inst, room) or _refuse_kv(inst, room):
        return refusal
    limits = _derive_limits(inst, room)
    decode, decode_notes = _decode_ceiling(inst, room, limits.max_model_len)
    return _fit(inst, room, limits, decode, decode_notes)


# --- the steps, in the order they run -------------------------------------------------------------


def _weight_dtype(arch: ModelArch, dep: Deployment) -> str:
    """``vllm_dtype`` with ``auto`` resolved for the GPU."""
    return resolve_weight_dtype(arch, dep.weight_dtype, bf16=dep.gpu.bf16 if dep.gpu else True)


def _check_inputs(arch: ModelArch, dep: Deployment, where: str) -> FleetConfigError | None:
    """Settings that are invalid whatever the model and GPU."""
    tp = dep.gpus_per_instance
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        return FleetConfigError(f"{where}`vllm_tensor_parallel_size`", f"must be a positive integer, got {tp!r}.",
                                "set it to the number of GPUs one instance is split across (1, 2, 4 or 8).")
    # A CPU instance's KV cache is a byte count; the utilization is not used there.
    if dep.gpu is not None and not 0 < dep.gpu_memory_utilization <= 1:
        return FleetConfigError(f"{where}`vllm_gpu_memory_utilization`",
                                f"must be above 0 and at most 1, got {dep.gpu_memory_utilization!r}.",
                                "use a fraction such as 0.90 (0.95 on a GPU nothing else uses).")
    if dep.quantization is not None and dep.quantization not in QUANTIZATIONS:
        return FleetConfigError(f"{where}`vllm_quantization`", f"{dep.quantization!r} is not one the planner knows.",
                                f"use one of {', '.join(QUANTIZATIONS)}, or leave it unset.")
    if dep.kv_cache_dtype != "auto" and dep.kv_cache_dtype not in KV_CACHE_BYTES:
        return FleetConfigError(f"{where}`vllm_kv_cache_dtype`", f"{dep.kv_cache_dtype!r} is not a KV-cache dtype.",
                                f"use auto or one of {', '.join(KV_CACHE_BYTES)}.")
    if _weight_dtype(arch, dep) not in ("bfloat16", "float16", "float32"):
        return FleetConfigError(f"{where}`vllm_dtype`", f"{dep.weight_dtype!r} is not a weight dtype.",
                                "use auto, bfloat16, float16 or float32 (quantization is a separate setting).")
    return None


@dataclass(frozen=True)
class _Instance:
    """One instance whose inputs passed ``_check_inputs``, resolved: what every later step reads."""
    arch: ModelArch
    dep: Deployment
    host_gpus: int | None
    where: str
    tp: int
    gpu: GpuSpec | None
    dtype: str  # vllm_dtype, `auto` resolved
    quant: str | None  # the deployment's quantization, else a pre-quantized checkpoint's
    kv_b: int  # bytes per KV-cache element
    need: int  # tokens one sequence must hold: max_model_len, or one block when that is derived

    def field(self, name: str) -> str:
        return f"{self.where}`{name}`"

    def refuse(self, name: str, problem: str, fix: str) -> FleetConfigError:
        return FleetConfigError(self.field(name), problem, fix)


def _resolve(arch: ModelArch, dep: Deployment, host_gpus: int | None, where: str) -> _Instance:
    dtype, quant = _weight_dtype(arch, dep), dep.quantization
    if quant is None and arch.quantization in QUANTIZATIONS:
        quant = arch.quantization  # a pre-quantized checkpoint is served quantized
    need = dep.max_model_len or GPU_BLOCK_SIZE  # a derived length needs at least one block
    return _Instance(arch, dep, host_gpus, where, dep.gpus_per_instance, dep.gpu, dtype, quant,
                     kv_dtype_bytes(dep.kv_cache_dtype, dtype), need)


def _check_number_formats(inst: _Instance) -> FleetConfigError | None:
    """Number formats the GPU does not compute in: fp8 weights or KV cache, bfloat16."""
    gpu, kv_dtype = inst.gpu, inst.dep.kv_cache_dtype
    if gpu is None:
        return None
    fp8_gpus = ", ".join(sorted(k for k, g in GPUS.items() if g.fp8))
    if inst.quant == "fp8" and not gpu.fp8:
        return inst.refuse("vllm_quantization",
                           f"fp8 weights need a GPU with fp8 (Ada or Hopper); {gpu.name} has none.",
                           f"serve an AWQ or GPTQ (int4) checkpoint of the model instead, which runs on {gpu.name}, "
                           f"or use a GPU with fp8 ({fp8_gpus}).")
    if kv_dtype.startswith("fp8") and not gpu.fp8:
        return inst.refuse("vllm_kv_cache_dtype", f"{kv_dtype} KV cache needs a GPU with fp8; {gpu.name} has none.",
                           f"set it to auto (16-bit KV cache), or use a GPU with fp8 ({fp8_gpus}).")
    if inst.dtype == "bfloat16" and not gpu.bf16:
        return inst.refuse("vllm_dtype", f"{gpu.name} does not compute in bfloat16.",
                           "set it to float16 (or auto, which picks float16 there).")
    return None


def _check_tensor_parallel(inst: _Instance) -> FleetConfigError | None:
    """A tensor-parallel size that does not divide the heads, or needs more GPUs than the host has."""
    arch, tp, host_gpus = inst.arch, inst.tp, inst.host_gpus
    # The sizes suggested are bounded by the host's GPUs only on a GPU host that states them.
    on_host = inst.gpu is not None and bool(host_gpus)
    valid = [t for t in TP_CHOICES if t <= (host_gpus if on_host else max(TP_CHOICES)) and _tp_ok(arch, t)]
    valid_text = ", ".join(map(str, valid)) or "none"
    if not _tp_ok(arch, tp):
        return inst.refuse("vllm_tensor_parallel_size",
                           f"tensor-parallel {tp} does not divide {arch.name}'s {arch.num_heads} attention heads "
                           f"({arch.num_kv_heads} KV heads) evenly across the GPUs.",
                           f"use a size that does: {valid_text}"
                           + (f" (at most this host's {host_gpus} GPUs)." if on_host else "."))
    if inst.gpu is not None and host_gpus is not None and tp > host_gpus:
        return inst.refuse("vllm_tensor_parallel_size",
                           f"tensor-parallel {tp} needs {tp} GPUs in one host; this host has {host_gpus}.",
                           f"lower it to one of {valid_text}, or run the instance on a host with {tp} or more GPUs.")
    return None


def _check_max_model_len(inst: _Instance) -> FleetConfigError | None:
    """A max_model_len longer than the model was built for."""
    asked, max_pos = inst.dep.max_model_len, inst.arch.max_position_embeddings
    if asked is None or not max_pos or asked <= max_pos:
        return None
    return inst.refuse("vllm_max_model_len",
                       f"{asked:,} tokens is above {inst.arch.name}'s max_position_embeddings of {max_pos:,}.",
                       f"set it to {max_pos:,} or less: vLLM refuses a longer one, and the model was not trained "
                       f"for positions past its limit.")


@dataclass(frozen=True)
class _Room:
    """Where one instance's memory goes, per GPU, and how many tokens that leaves."""
    block: int
    lay: _Layout
    active: int  # weight bytes one decoded token reads, all GPUs together
    per_token: int
    kv_tokens: int
    longest: int  # the longest one sequence the KV cache holds (whole blocks), at most the model's limit


def _room(inst: _Instance) -> _Room:
    arch, dep, tp, kv_b = inst.arch, inst.dep, inst.tp, inst.kv_b
    block = CPU_BLOCK_SIZE if inst.gpu is None else GPU_BLOCK_SIZE
    if inst.gpu is None:
        total = weight_bytes(arch, inst.dtype, inst.quant)
        # On CPU the KV cache is exactly the size asked for; the weights live in host memory beside it.
        lay = _Layout(total, math.ceil(total / tp), dep.cpu_kv_cache_bytes, 0, dep.cpu_kv_cache_bytes)
    else:
        lay = _layout(arch, inst.gpu, dep.gpu_memory_utilization, tp, inst.dtype, inst.quant)
    per_token = kv_bytes(arch, 1, kv_b, tp)
    longest = _longest_sequence(arch, max(lay.budget, 0), kv_b, tp, block)
    if arch.max_position_embeddings:
        longest = min(longest, arch.max_position_embeddings)
    return _Room(block, lay, weight_bytes(arch, inst.dtype, inst.quant, active=True), per_token,
                 _round_down(max(lay.budget, 0) / per_token, block), longest)


def _fitting_layout(inst: _Instance, tp: int, quant: str | None, util: float | None = None) -> _Layout | None:
    """The GPU layout at ``tp``, ``quant`` and ``util`` (None: the deployment's) if one sequence fits."""
    util = inst.dep.gpu_memory_utilization if util is None else util
    lay = _layout(inst.arch, inst.gpu, util, tp, inst.dtype, quant)
    one_sequence = lay.budget > 0 and lay.budget >= _seq_bytes(inst.arch, inst.need, inst.kv_b, tp, GPU_BLOCK_SIZE)
    return lay if one_sequence else None


def _alternatives(inst: _Instance) -> list[str]:
    """Other tensor-parallel sizes and quantizations that would fit: the first of each that does."""
    arch, kv_b, gpu, out = inst.arch, inst.kv_b, inst.gpu, []
    bigger = [t for t in TP_CHOICES if t > inst.tp and _tp_ok(arch, t)]
    if hit := next(((t, alt) for t in bigger if (alt := _fitting_layout(inst, t, inst.quant))), None):
        t, alt = hit
        host = (f"; needs a host with {t} GPUs, this one has {inst.host_gpus}"
                if inst.host_gpus is not None and t > inst.host_gpus else "")
        out.append(f"set {inst.field('vllm_tensor_parallel_size')} to {t} ({_gb(alt.weights_per_gpu)} of weights "
                   f"per GPU, leaves {_gb(alt.budget)} per GPU for KV cache = "
                   f"{_tokens(arch, alt, kv_b, t):,} tokens{host})")
    if inst.quant is not None:  # quantizing is offered only for weights not quantized already
        return out
    quants = (["fp8"] if gpu.fp8 else []) + ["awq"]  # fp8 first where the GPU has it
    if hit := next(((q, t, alt) for q in quants for t in [inst.tp, *bigger]
                    if (alt := _fitting_layout(inst, t, q))), None):
        q, t, alt = hit
        how = (f"`--quantization fp8`, on the fly from this checkpoint; {gpu.name} has fp8" if q == "fp8"
               else "an AWQ (int4) checkpoint of the model; GPTQ is the same size")
        size = _gb(alt.weights_total) if t == 1 else f"{_gb(alt.weights_total)}, {_gb(alt.weights_per_gpu)} per GPU"
        out.append(f"quantize the weights: {q} ({size} at tensor-parallel {t}, leaves "
                   f"{_gb(alt.budget)} per GPU for KV cache = {_tokens(arch, alt, kv_b, t):,} tokens; {how})")
    return out


def _refuse_no_room(inst: _Instance, room: _Room) -> FleetConfigError | None:
    """On a GPU, the weights and the reserve alone take all the usable memory."""
    gpu, lay = inst.gpu, room.lay
    if gpu is None or lay.budget > 0:
        return None
    quant_text = f" quantized to {inst.quant}" if inst.quant else ""
    fixes = _alternatives(inst) or ["use a GPU with more memory (add one with `vllm_gpu_types`) or a smaller model"]
    return inst.refuse("vllm_tensor_parallel_size",
                       f"{inst.arch.name} in {inst.dtype}{quant_text} needs {_gb(lay.weights_total)} of weights, "
                       f"{_gb(lay.weights_per_gpu)} per GPU at tensor-parallel {inst.tp}; one {gpu.name} holds "
                       f"{_gb(gpu.memory_bytes)} × {inst.dep.gpu_memory_utilization:g} = {_gb(lay.usable)}, of which "
                       f"{_gb(lay.reserve)} is kept for activations and CUDA graphs.",
                       "; or ".join(fixes) + ".")


def _refuse_kv(inst: _Instance, room: _Room) -> FleetConfigError | None:
    """Not even one sequence of max_model_len (one block, when derived) fits in the KV cache."""
    lay, kv_b, gpu = room.lay, inst.kv_b, inst.gpu
    seq = _seq_bytes(inst.arch, inst.need, kv_b, inst.tp, room.block)
    if lay.budget >= seq:
        return None
    what = f"a {inst.need:,}-token sequence" if inst.dep.max_model_len else "one block of tokens"
    if gpu is None:
        problem = (f"{what} of {inst.arch.name} needs {_gb(seq)} of KV cache ({kv_b}-byte elements) but the "
                   f"CPU KV cache is {_gb(lay.budget)} ({lay.budget:,} bytes): {room.kv_tokens:,} tokens.")
        fixes = [f"raise `vllm_kv_cache_bytes` to at least {_round_up(seq, 1 << 20):,}"]
    else:
        problem = (f"{what} of {inst.arch.name} needs {_gb(seq)} of KV cache per GPU but only {_gb(lay.budget)} "
                   f"is left: {_gb(lay.usable)} usable − {_gb(lay.weights_per_gpu)} of weights − "
                   f"{_gb(lay.reserve)} reserve, {room.kv_tokens:,} tokens.")
        fixes = _alternatives(inst)
        if inst.dep.gpu_memory_utilization < 0.95 and (alt := _fitting_layout(inst, inst.tp, inst.quant, 0.95)):
            fixes.append(f"raise {inst.field('vllm_gpu_memory_utilization')} to 0.95 "
                         f"({_tokens(inst.arch, alt, kv_b, inst.tp):,} tokens; only if nothing else uses the GPU)")
        if kv_b > 1 and gpu.fp8:
            fixes.append(f"set {inst.field('vllm_kv_cache_dtype')} to fp8 (about {kv_b}× the tokens)")
    if room.longest >= room.block:
        fixes.insert(0, f"set {inst.field('vllm_max_model_len')} to {room.longest:,} or less")
    return inst.refuse("vllm_max_model_len", problem, "; or ".join(fixes) + ".")


@dataclass(frozen=True)
class _Limits:
    max_model_len: int
    max_concurrent: int
    max_num_seqs: int
    notes: tuple[str, ...]


def _derive_limits(inst: _Instance, room: _Room) -> _Limits:
    """max_model_len and max_num_seqs, as given or derived, with the notes a reader of the Fit needs."""
    arch, dep, max_pos, longest, notes = inst.arch, inst.dep, inst.arch.max_position_embeddings, room.longest, []
    if inst.gpu is None:
        notes.append(f"CPU: the weights ({_gb(room.lay.weights_total)}) live in host memory besides the "
                     f"{_gb(room.lay.budget)} KV cache.")
    max_model_len = longest if dep.max_model_len is None else dep.max_model_len
    if dep.max_model_len is None and max_pos and longest < max_pos:
        notes.append(f"max_model_len derived as {longest:,} (the model allows {max_pos:,}): pass it as "
                     f"--max-model-len, else vLLM takes the model's limit and refuses to start.")
    max_concurrent = room.lay.budget // _seq_bytes(arch, max_model_len, inst.kv_b, inst.tp, room.block)
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
    if inst.quant in ("awq", "gptq") and arch.quantization != inst.quant:
        notes.append(f"{inst.quant} needs a checkpoint quantized with {inst.quant}; this config is {arch.torch_dtype}.")
    return _Limits(max_model_len, max_concurrent, max_num_seqs, tuple(notes))


def _decode_ceiling(inst: _Instance, room: _Room, max_model_len: int) -> tuple[float | None, tuple[str, ...]]:
    """Single-stream decode bound, tokens/s: bandwidth over the bytes one step reads per GPU (none on CPU)."""
    if (gpu := inst.gpu) is None:
        return None, ()
    step_bytes = room.active / inst.tp + _seq_bytes(inst.arch, max_model_len, inst.kv_b, inst.tp, room.block)
    decode = gpu.bandwidth_bytes_per_s / step_bytes
    note = (f"single-stream decode is bounded by memory bandwidth at {decode:.0f} tokens/s "
            f"({gpu.bandwidth_bytes_per_s / 1e12:.2f} TB/s over {_gb(step_bytes)} read per GPU per token).")
    return decode, (note,)


def _fit(inst: _Instance, room: _Room, limits: _Limits, decode: float | None, decode_notes: tuple[str, ...]) -> Fit:
    lay = room.lay
    smallest = None if inst.gpu is None else next(
        (t for t in TP_CHOICES if _tp_ok(inst.arch, t) and _fitting_layout(inst, t, inst.quant)), None)
    return Fit(
        tensor_parallel=inst.tp, weight_dtype=inst.dtype, quantization=inst.quant, kv_cache_dtype_bytes=inst.kv_b,
        weight_bytes_total=lay.weights_total, weight_bytes_per_gpu=lay.weights_per_gpu,
        active_weight_bytes=room.active, usable_bytes_per_gpu=lay.usable, reserve_bytes_per_gpu=lay.reserve,
        budget_bytes_per_gpu=lay.budget, kv_bytes_per_token=room.per_token, block_size=room.block,
        kv_tokens=room.kv_tokens, max_model_len=limits.max_model_len, max_concurrent_seqs=limits.max_concurrent,
        max_num_seqs=limits.max_num_seqs, decode_ceiling_tokens_per_s=decode, smallest_tp=smallest,
        notes=limits.notes + decode_notes,
    )
