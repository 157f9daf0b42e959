"""One vLLM instance as the capacity plan sees it: the deployment the inventory describes, resolved
against the model and GPU, and where its memory goes per GPU. The arithmetic here is shared by the
checks and refusals (``roles.plan.refusals``) and the fit (``roles.plan.capacity``).

Units in messages: GB = 1e9 bytes, one decimal, everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from roles.common import GIB
from roles.errors import FleetConfigError
from roles.plan.gpus import GpuSpec
from roles.plan.model import (
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

RESERVE_REASON = (f"{RESERVE_BYTES_PER_GPU / GIB:g} GiB per GPU reserved for what vLLM measures at start-up: "
                  "activations of one max_num_batched_tokens batch (1-1.5 GiB for 7B-70B models), CUDA context "
                  "and CUDA graphs; flat because none grows with the GPU, and vLLM's own figure may differ by "
                  "about a GiB")
"""The reserve's reasoning in one line, for the plan's output."""

GPU_BLOCK_SIZE = 16
"""Tokens per KV-cache block on NVIDIA GPUs (vLLM's default)."""
CPU_BLOCK_SIZE = 128
"""Tokens per KV-cache block on CPU (vLLM's CPU default)."""

TP_CHOICES = (1, 2, 4, 8)
"""Tensor-parallel sizes tried for ``smallest_tp`` and suggested in fixes (one host's GPUs)."""


def round_down(n: float, block: int) -> int:
    return max(0, int(n // block) * block)


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def longest_sequence(arch: ModelArch, budget: int, kv_b: int, tp: int, block: int) -> int:
    """The most tokens (whole blocks) one sequence can hold in ``budget`` bytes per GPU."""
    layer_token = 2 * kv_heads_per_gpu(arch, tp) * arch.head_dim * kv_b
    full, sliding = arch.full_attention_layers, len(arch.sliding_window_layers)
    n = budget / (layer_token * (full + sliding))
    if sliding and n > (window := arch.sliding_window or 0):
        n = math.inf if full == 0 else (budget / layer_token - sliding * window) / full
    if n == math.inf:
        return arch.max_position_embeddings or 0
    return round_down(n, block)


@dataclass(frozen=True)
class Deployment:
    """One vLLM instance as the inventory describes it."""

    gpu: GpuSpec | None = None
    """The GPU type; None for a CPU instance."""
    gpus_per_instance: int = 1
    """Tensor-parallel size (``vllm_tensor_parallel_size``): GPUs per host."""
    pipeline_parallel: int = 1
    """Pipeline stages, one per host (an instance of ``vllm_instance_groups`` spans that many)."""
    weight_dtype: str = "auto"
    """``vllm_dtype``: auto, bfloat16, float16 or float32."""
    quantization: str | None = None
    """None (a pre-quantized checkpoint's own format applies), fp8 (on the fly from a 16-bit
    checkpoint), awq or gptq (pre-quantized checkpoints)."""
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None
    """None: the longest one sequence that fits, at most the model's max_position_embeddings."""
    max_num_seqs: int | None = None
    """None: derived, see ``Fit.max_num_seqs``."""
    cpu_kv_cache_bytes: int = 1 << 30
    """KV cache of a CPU instance (``vllm_kv_cache_bytes``)."""


@dataclass(frozen=True)
class Layout:
    weights_total: int
    weights_per_gpu: int
    usable: int
    reserve: int
    budget: int


def stage_of(arch: ModelArch, pp: int) -> ModelArch:
    """The heaviest of ``pp`` pipeline stages as a model of its own: vLLM gives each stage at most
    ceil(layers / pp) layers. The embeddings live on the first stage and lm_head on the last; the
    stage counts both (conservative by one embedding matrix: 4.2 GB for Llama 3.1 405B in bf16),
    and the first stage's sliding-window layers."""
    if pp == 1:
        return arch
    layers = -(-arch.num_layers // pp)
    return replace(arch, num_layers=layers,
                   sliding_window_layers=tuple(i for i in arch.sliding_window_layers if i < layers))


def stage_weights_per_gpu(stage: ModelArch, dtype: str, quant: str | None, tp: int) -> int:
    """Weight bytes each of a stage's ``tp`` GPUs (or a CPU host) holds: tensor parallelism splits
    them evenly."""
    return math.ceil(weight_bytes(stage, dtype, quant) / tp)


def layout(arch: ModelArch, stage: ModelArch, gpu: GpuSpec, util: float, tp: int, dtype: str,
           quant: str | None) -> Layout:
    """Memory per GPU of ``arch`` when each GPU holds its part of ``stage`` (``arch`` itself
    without pipeline parallelism)."""
    per_gpu = stage_weights_per_gpu(stage, dtype, quant, tp)
    usable = int(gpu.memory_bytes * util)
    return Layout(weight_bytes(arch, dtype, quant), per_gpu, usable, RESERVE_BYTES_PER_GPU,
                  usable - per_gpu - RESERVE_BYTES_PER_GPU)


def tp_ok(arch: ModelArch, tp: int) -> bool:
    """vLLM splits query heads evenly, and KV heads either evenly or by whole replicas."""
    kv = arch.num_kv_heads
    return arch.num_heads % tp == 0 and (kv % tp == 0 if kv >= tp else tp % kv == 0)


def seq_bytes(arch: ModelArch, tokens: int, kv_b: int, tp: int, block: int) -> int:
    return kv_bytes(arch, round_up(tokens, block), kv_b, tp)


def tokens_in(arch: ModelArch, lay: Layout, kv_b: int, tp: int) -> int:
    """Tokens a GPU layout's KV budget holds, in whole GPU blocks."""
    return round_down(max(lay.budget, 0) / kv_bytes(arch, 1, kv_b, tp), GPU_BLOCK_SIZE)


def weight_dtype(arch: ModelArch, dep: Deployment) -> str:
    """``vllm_dtype`` with ``auto`` resolved for the GPU."""
    return resolve_weight_dtype(arch, dep.weight_dtype, bf16=dep.gpu.bf16 if dep.gpu else True)


@dataclass(frozen=True)
class PlannedInstance:
    """One instance whose inputs passed the input checks, resolved: what every later step reads.
    ``arch`` is the whole model; ``stage`` the heaviest pipeline stage (the model itself without
    pipeline parallelism): what one GPU holds weights and KV cache of."""
    arch: ModelArch
    dep: Deployment
    host_gpus: int | None
    where: str
    tp: int
    stage: ModelArch
    gpu: GpuSpec | None
    dtype: str  # vllm_dtype, `auto` resolved
    quant: str | None  # the deployment's quantization, else a pre-quantized checkpoint's
    kv_b: int  # bytes per KV-cache element
    need: int  # tokens one sequence must hold: max_model_len, or one block when that is derived

    def field(self, name: str) -> str:
        return f"{self.where}`{name}`"

    def refuse(self, name: str, problem: str, fix: str) -> FleetConfigError:
        return FleetConfigError(self.field(name), problem, fix)


def resolve(arch: ModelArch, dep: Deployment, host_gpus: int | None, where: str) -> PlannedInstance:
    quant = dep.quantization
    if quant is None and arch.checkpoint_quant is not None:
        quant = arch.quantization  # a pre-quantized checkpoint is served in its own format
    need = dep.max_model_len or GPU_BLOCK_SIZE  # a derived length needs at least one block
    dtype = weight_dtype(arch, dep)
    return PlannedInstance(arch, dep, host_gpus, where, dep.gpus_per_instance, stage_of(arch, dep.pipeline_parallel),
                           dep.gpu, dtype, quant,
                           kv_dtype_bytes(dep.kv_cache_dtype, dtype), need)


@dataclass(frozen=True)
class Room:
    """Where one instance's memory goes, per GPU, and how many tokens that leaves."""
    block: int
    lay: Layout
    active: int  # weight bytes one decoded token reads, all GPUs together
    per_token: int
    kv_tokens: int
    longest: int  # the longest one sequence the KV cache holds (whole blocks), at most the model's limit


def room(inst: PlannedInstance) -> Room:
    arch, stage, dep, tp, kv_b = inst.arch, inst.stage, inst.dep, inst.tp, inst.kv_b
    block = CPU_BLOCK_SIZE if inst.gpu is None else GPU_BLOCK_SIZE
    if inst.gpu is None:
        # On CPU the KV cache is exactly the size asked for; the weights live in host memory beside it.
        per_host = stage_weights_per_gpu(stage, inst.dtype, inst.quant, tp)
        lay = Layout(weight_bytes(arch, inst.dtype, inst.quant), per_host, dep.cpu_kv_cache_bytes, 0,
                     dep.cpu_kv_cache_bytes)
    else:
        lay = layout(arch, stage, inst.gpu, dep.gpu_memory_utilization, tp, inst.dtype, inst.quant)
    per_token = kv_bytes(stage, 1, kv_b, tp)
    longest = longest_sequence(stage, max(lay.budget, 0), kv_b, tp, block)
    if arch.max_position_embeddings:
        longest = min(longest, arch.max_position_embeddings)
    return Room(block, lay, weight_bytes(arch, inst.dtype, inst.quant, active=True), per_token,
                round_down(max(lay.budget, 0) / per_token, block), longest)


def fitting_layout(inst: PlannedInstance, tp: int, quant: str | None, util: float | None = None,
                   pp: int | None = None) -> Layout | None:
    """The GPU layout at ``tp``, ``quant``, ``util`` and ``pp`` (None: the deployment's) if one
    sequence fits."""
    util = inst.dep.gpu_memory_utilization if util is None else util
    stage = inst.stage if pp is None else stage_of(inst.arch, pp)
    lay = layout(inst.arch, stage, inst.gpu, util, tp, inst.dtype, quant)
    one_sequence = lay.budget > 0 and lay.budget >= seq_bytes(stage, inst.need, inst.kv_b, tp, GPU_BLOCK_SIZE)
    return lay if one_sequence else None
