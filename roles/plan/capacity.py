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

GIB = 1 << 30

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


def _fits(arch, gpu, util, tp, dtype, quant, kv_b, need_tokens) -> _Layout | None:
    lay = _layout(arch, gpu, util, tp, dtype, quant)
    if lay.budget > 0 and lay.budget >= _seq_bytes(arch, need_tokens, kv_b, tp, GPU_BLOCK_SIZE):
        return lay
    return None


def _tokens(arch, lay: _Layout, kv_b: int, tp: int) -> int:
    per_token = kv_bytes(arch, 1, kv_b, tp)
    return _round_down(max(lay.budget, 0) / per_token, GPU_BLOCK_SIZE)


def plan_capacity(arch: ModelArch, dep: Deployment, host_gpus: int | None = None, *,
                  where: str = "") -> Fit:
    """Check one instance of ``arch`` deployed as ``dep`` on a host with ``host_gpus`` GPUs (None:
    not checked); return its ``Fit`` or raise ``FleetConfigError``. ``where`` prefixes the field
    names in messages (e.g. ``"host gpu1: instance a: "``)."""
    tp = dep.gpus_per_instance
    gpu = dep.gpu
    f = lambda name: f"{where}`{name}`"  # noqa: E731
    notes: list[str] = []

    # --- inputs that are simply invalid -----------------------------------------------------------
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise FleetConfigError(f("vllm_tensor_parallel_size"), f"must be a positive integer, got {tp!r}.",
                               "set it to the number of GPUs one instance is split across (1, 2, 4 or 8).")
    if gpu is not None and not 0 < dep.gpu_memory_utilization <= 1:
        raise FleetConfigError(f("vllm_gpu_memory_utilization"),
                               f"must be above 0 and at most 1, got {dep.gpu_memory_utilization!r}.",
                               "use a fraction such as 0.90 (0.95 on a GPU nothing else uses).")
    if dep.quantization is not None and dep.quantization not in QUANTIZATIONS:
        raise FleetConfigError(f("vllm_quantization"), f"{dep.quantization!r} is not one the planner knows.",
                               f"use one of {', '.join(QUANTIZATIONS)}, or leave it unset.")
    if dep.kv_cache_dtype != "auto" and dep.kv_cache_dtype not in KV_CACHE_BYTES:
        raise FleetConfigError(f("vllm_kv_cache_dtype"), f"{dep.kv_cache_dtype!r} is not a KV-cache dtype.",
                               f"use auto or one of {', '.join(KV_CACHE_BYTES)}.")
    dtype = resolve_weight_dtype(arch, dep.weight_dtype, bf16=gpu.bf16 if gpu else True)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise FleetConfigError(f("vllm_dtype"), f"{dep.weight_dtype!r} is not a weight dtype.",
                               "use auto, bfloat16, float16 or float32 (quantization is a separate setting).")
    quant = dep.quantization
    if quant is None and arch.quantization in QUANTIZATIONS:
        quant = arch.quantization  # a pre-quantized checkpoint is served quantized
    kv_b = kv_dtype_bytes(dep.kv_cache_dtype, dtype)

    # --- refusal 5: number formats the GPU does not compute in ------------------------------------
    if gpu is not None:
        fp8_gpus = ", ".join(sorted(k for k, g in GPUS.items() if g.fp8))
        if quant == "fp8" and not gpu.fp8:
            raise FleetConfigError(
                f("vllm_quantization"), f"fp8 weights need a GPU with fp8 (Ada or Hopper); {gpu.name} has none.",
                f"serve an AWQ or GPTQ (int4) checkpoint of the model instead, which runs on {gpu.name}, "
                f"or use a GPU with fp8 ({fp8_gpus}).")
        if dep.kv_cache_dtype.startswith("fp8") and not gpu.fp8:
            raise FleetConfigError(
                f("vllm_kv_cache_dtype"),
                f"{dep.kv_cache_dtype} KV cache needs a GPU with fp8; {gpu.name} has none.",
                f"set it to auto (16-bit KV cache), or use a GPU with fp8 ({fp8_gpus}).")
        if dtype == "bfloat16" and not gpu.bf16:
            raise FleetConfigError(f("vllm_dtype"), f"{gpu.name} does not compute in bfloat16.",
                                   "set it to float16 (or auto, which picks float16 there).")

    # --- refusal 4: tensor-parallel size ----------------------------------------------------------
    limit = host_gpus if gpu is not None and host_gpus else max(TP_CHOICES)
    valid = [t for t in TP_CHOICES if t <= limit and _tp_ok(arch, t)]
    valid_text = ", ".join(map(str, valid)) or "none"
    if not _tp_ok(arch, tp):
        raise FleetConfigError(
            f("vllm_tensor_parallel_size"),
            f"tensor-parallel {tp} does not divide {arch.name}'s {arch.num_heads} attention heads "
            f"({arch.num_kv_heads} KV heads) evenly across the GPUs.",
            f"use a size that does: {valid_text}" + (f" (at most this host's {host_gpus} GPUs)." if
                                                    gpu is not None and host_gpus else "."))
    if gpu is not None and host_gpus is not None and tp > host_gpus:
        raise FleetConfigError(
            f("vllm_tensor_parallel_size"),
            f"tensor-parallel {tp} needs {tp} GPUs in one host; this host has {host_gpus}.",
            f"lower it to one of {valid_text}, or run the instance on a host with {tp} or more GPUs.")

    # --- refusal 2: longer than the model was built for -------------------------------------------
    max_pos = arch.max_position_embeddings
    if dep.max_model_len is not None and max_pos and dep.max_model_len > max_pos:
        raise FleetConfigError(
            f("vllm_max_model_len"),
            f"{dep.max_model_len:,} tokens is above {arch.name}'s max_position_embeddings of {max_pos:,}.",
            f"set it to {max_pos:,} or less: vLLM refuses a longer one, and the model was not trained "
            f"for positions past its limit.")

    need = dep.max_model_len or GPU_BLOCK_SIZE  # a derived length needs at least one block
    if gpu is None:
        block = CPU_BLOCK_SIZE
        total = weight_bytes(arch, dtype, quant)
        lay = _Layout(total, math.ceil(total / tp), dep.cpu_kv_cache_bytes, 0, dep.cpu_kv_cache_bytes)
        notes.append(f"CPU: the weights ({_gb(total)}) live in host memory besides the "
                     f"{_gb(lay.budget)} KV cache.")
    else:
        block = GPU_BLOCK_SIZE
        lay = _layout(arch, gpu, dep.gpu_memory_utilization, tp, dtype, quant)
    per_token = kv_bytes(arch, 1, kv_b, tp)
    kv_tokens = _round_down(max(lay.budget, 0) / per_token, block)

    def fixes_more_memory(need_tokens: int) -> list[str]:
        """Other tensor-parallel sizes and quantizations that would fit ``need_tokens`` per sequence."""
        out = []
        bigger = [t for t in TP_CHOICES if t > tp and _tp_ok(arch, t)]
        for t in bigger:
            alt = _fits(arch, gpu, dep.gpu_memory_utilization, t, dtype, quant, kv_b, need_tokens)
            if alt:
                host = (f"; needs a host with {t} GPUs, this one has {host_gpus}"
                        if host_gpus is not None and t > host_gpus else "")
                out.append(f"set {f('vllm_tensor_parallel_size')} to {t} ({_gb(alt.weights_per_gpu)} of weights "
                           f"per GPU, leaves {_gb(alt.budget)} per GPU for KV cache = "
                           f"{_tokens(arch, alt, kv_b, t):,} tokens{host})")
                break
        if quant is None:
            options = ["fp8"] if gpu.fp8 else []
            options.append("awq")
            for q in options:
                hit = next(((t, alt) for t in [tp, *bigger] if (alt := _fits(
                    arch, gpu, dep.gpu_memory_utilization, t, dtype, q, kv_b, need_tokens))), None)
                if hit is None:
                    continue
                t, alt = hit
                how = (f"`--quantization fp8`, on the fly from this checkpoint; {gpu.name} has fp8" if q == "fp8"
                       else "an AWQ (int4) checkpoint of the model; GPTQ is the same size")
                size = (_gb(alt.weights_total) if t == 1 else
                        f"{_gb(alt.weights_total)}, {_gb(alt.weights_per_gpu)} per GPU")
                out.append(f"quantize the weights: {q} ({size} at tensor-parallel {t}, leaves "
                           f"{_gb(alt.budget)} per GPU for KV cache = "
                           f"{_tokens(arch, alt, kv_b, t):,} tokens; {how})")
                break
        return out

    # --- refusal 1: the weights alone do not fit ----------------------------------------------------
    if gpu is not None and lay.budget <= 0:
        quant_text = f" quantized to {quant}" if quant else ""
        fixes = fixes_more_memory(need) or [
            "use a GPU with more memory (add one with `vllm_gpu_types`) or a smaller model"]
        raise FleetConfigError(
            f("vllm_tensor_parallel_size"),
            f"{arch.name} in {dtype}{quant_text} needs {_gb(lay.weights_total)} of weights, "
            f"{_gb(lay.weights_per_gpu)} per GPU at tensor-parallel {tp}; one {gpu.name} holds "
            f"{_gb(gpu.memory_bytes)} × {dep.gpu_memory_utilization:g} = {_gb(lay.usable)}, of which "
            f"{_gb(lay.reserve)} is kept for activations and CUDA graphs.",
            "; or ".join(fixes) + ".")

    # --- refusal 3: not even one sequence of max_model_len fits in the KV cache ----------------------
    longest = _longest_sequence(arch, max(lay.budget, 0), kv_b, tp, block)
    if max_pos:
        longest = min(longest, max_pos)
    seq = _seq_bytes(arch, need, kv_b, tp, block)
    if lay.budget < seq:
        what = f"a {need:,}-token sequence" if dep.max_model_len else "one block of tokens"
        if gpu is None:
            problem = (f"{what} of {arch.name} needs {_gb(seq)} of KV cache ({kv_b}-byte elements) but the "
                       f"CPU KV cache is {_gb(lay.budget)} ({lay.budget:,} bytes): {kv_tokens:,} tokens.")
            fixes = [f"raise `vllm_kv_cache_bytes` to at least {_round_up(seq, 1 << 20):,}"]
        else:
            problem = (f"{what} of {arch.name} needs {_gb(seq)} of KV cache per GPU but only {_gb(lay.budget)} "
                       f"is left: {_gb(lay.usable)} usable − {_gb(lay.weights_per_gpu)} of weights − "
                       f"{_gb(lay.reserve)} reserve, {kv_tokens:,} tokens.")
            fixes = fixes_more_memory(need)
            if dep.gpu_memory_utilization < 0.95:
                alt = _fits(arch, gpu, 0.95, tp, dtype, quant, kv_b, need)
                if alt:
                    fixes.append(f"raise {f('vllm_gpu_memory_utilization')} to 0.95 "
                                 f"({_tokens(arch, alt, kv_b, tp):,} tokens; only if nothing else uses the GPU)")
            if kv_b > 1 and gpu.fp8:
                fixes.append(f"set {f('vllm_kv_cache_dtype')} to fp8 (about {kv_b}× the tokens)")
        if longest >= block:
            fixes.insert(0, f"set {f('vllm_max_model_len')} to {longest:,} or less")
        raise FleetConfigError(f("vllm_max_model_len"), problem, "; or ".join(fixes) + ".")

    # --- it fits: derive what was not given ------------------------------------------------------------
    if dep.max_model_len is not None:
        max_model_len = dep.max_model_len
    else:
        max_model_len = longest
        if max_pos and longest < max_pos:
            notes.append(f"max_model_len derived as {longest:,} (the model allows {max_pos:,}): pass it as "
                         f"--max-model-len, else vLLM takes the model's limit and refuses to start.")
    max_concurrent = lay.budget // _seq_bytes(arch, max_model_len, kv_b, tp, block)
    if dep.max_num_seqs is not None:
        max_num_seqs = dep.max_num_seqs
    else:
        max_num_seqs = min(MAX_NUM_SEQS_CAP, max(1, max_concurrent))
        notes.append(f"max_num_seqs derived as {max_num_seqs}: as many max-length sequences as the KV cache "
                     f"holds at once (at most {MAX_NUM_SEQS_CAP}), so none is ever preempted; raise it "
                     f"if most requests are much shorter than {max_model_len:,} tokens.")
    if dep.max_num_seqs is not None and max_num_seqs > max_concurrent:
        notes.append(f"max_num_seqs {max_num_seqs} exceeds the {max_concurrent} max-length sequences the KV "
                     f"cache holds: long requests will be preempted and recomputed.")
    if arch.sliding_window_layers:
        notes.append(f"{len(arch.sliding_window_layers)} of {arch.num_layers} layers use a "
                     f"{arch.sliding_window:,}-token sliding window; kv_tokens counts every layer, "
                     f"max_concurrent_seqs caps those layers at the window.")
    if tp > arch.num_kv_heads:
        notes.append(f"{arch.num_kv_heads} KV heads over {tp} GPUs: each GPU keeps a replica of one KV head, "
                     f"so KV cache is not split further.")
    if quant in ("awq", "gptq") and arch.quantization != quant:
        notes.append(f"{quant} needs a checkpoint quantized with {quant}; this config is {arch.torch_dtype}.")

    decode = None
    smallest = None
    active = weight_bytes(arch, dtype, quant, active=True)
    if gpu is not None:
        step_bytes = active / tp + _seq_bytes(arch, max_model_len, kv_b, tp, block)
        decode = gpu.bandwidth_bytes_per_s / step_bytes
        notes.append(f"single-stream decode is bounded by memory bandwidth at {decode:.0f} tokens/s "
                     f"({gpu.bandwidth_bytes_per_s / 1e12:.2f} TB/s over {_gb(step_bytes)} read per GPU "
                     f"per token).")
        smallest = next((t for t in TP_CHOICES if _tp_ok(arch, t) and _fits(
            arch, gpu, dep.gpu_memory_utilization, t, dtype, quant, kv_b, need)), None)

    return Fit(
        tensor_parallel=tp, weight_dtype=dtype, quantization=quant, kv_cache_dtype_bytes=kv_b,
        weight_bytes_total=lay.weights_total, weight_bytes_per_gpu=lay.weights_per_gpu,
        active_weight_bytes=active, usable_bytes_per_gpu=lay.usable, reserve_bytes_per_gpu=lay.reserve,
        budget_bytes_per_gpu=lay.budget, kv_bytes_per_token=per_token, block_size=block, kv_tokens=kv_tokens,
        max_model_len=max_model_len, max_concurrent_seqs=max_concurrent, max_num_seqs=max_num_seqs,
        decode_ceiling_tokens_per_s=decode, smallest_tp=smallest, notes=tuple(notes),
    )
