"""Every way the capacity plan refuses an instance, in the order ``roles.plan.capacity`` runs them:
each check returns a ``FleetConfigError`` with the arithmetic in the problem and the ways out in
the fix (or None when it passes), and the ways out are themselves checked to fit."""

from __future__ import annotations

from roles.common import gb
from roles.errors import FleetConfigError
from roles.plan.gpus import GPUS, GpuSpec
from roles.plan.instance import (
    TP_CHOICES,
    Deployment,
    PlannedInstance,
    Room,
    fitting_layout,
    round_up,
    seq_bytes,
    stage_of,
    tokens_in,
    tp_ok,
    weight_dtype,
)
from roles.plan.model import KV_CACHE_BYTES, QUANTIZATIONS, ModelArch, quant_scheme
from roles.plan.quantization import FP8_NATIVE_CAPABILITY, MIN_CAPABILITY, QuantScheme

E5M2_KV_CAPABILITY = 8.0
"""Lowest compute capability for an fp8_e5m2 KV cache on a GPU without fp8: the cache is stored in 8
bits and widened to 16 bits inside vLLM's attention kernels, which Ampere's Triton supports for e5m2
but not for e4m3 (``fp8``, ``fp8_e4m3``: "type fp8e4nv not supported in this architecture", vLLM
issues 18182 and 26431)."""


def check_inputs(arch: ModelArch, dep: Deployment, where: str) -> FleetConfigError | None:
    """Settings that are invalid whatever the model and GPU."""
    tp = dep.gpus_per_instance
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        return FleetConfigError(f"{where}`vllm_tensor_parallel_size`", f"must be a positive integer, got {tp!r}.",
                                "set it to the number of GPUs one instance is split across (1, 2, 4 or 8).")
    pp = dep.pipeline_parallel
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        return FleetConfigError(f"{where}`pipeline_parallel_size`", f"must be a positive integer, got {pp!r}.",
                                "set it to the number of hosts the instance spans (one pipeline stage each).")
    if pp > arch.num_layers:
        return FleetConfigError(f"{where}`pipeline_parallel_size`",
                                f"{pp} pipeline stages need at least one of {arch.name}'s {arch.num_layers} layers "
                                "each.", f"span at most {arch.num_layers} hosts; vLLM refuses more stages than layers.")
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
    if weight_dtype(arch, dep) not in ("bfloat16", "float16", "float32"):
        return FleetConfigError(f"{where}`vllm_dtype`", f"{dep.weight_dtype!r} is not a weight dtype.",
                                "use auto, bfloat16, float16 or float32 (quantization is a separate setting).")
    return None


def check_checkpoint_quantization(inst: PlannedInstance) -> FleetConfigError | None:
    """A quantization asked for a checkpoint that is quantized in another format already."""
    asked, own = inst.dep.quantization, inst.arch.quantization
    if asked is None or own is None or asked == own:
        return None
    return inst.refuse("vllm_quantization",
                       f"{asked} asked, but {inst.arch.name}'s checkpoint is quantized with {own} already (its "
                       "config.json's quantization_config); vLLM refuses to start when the two differ.",
                       "leave it unset: vLLM serves a pre-quantized checkpoint in its own format.")


def check_number_formats(inst: PlannedInstance) -> FleetConfigError | None:
    """Number formats vLLM does not run on the GPU: weight formats below their compute capability,
    an fp8 KV cache without fp8, bfloat16."""
    gpu, kv_dtype = inst.gpu, inst.dep.kv_cache_dtype
    if gpu is None:
        return None
    scheme = quant_scheme(inst.arch, inst.quant)
    if scheme is not None and gpu.compute_capability < scheme.min_capability:
        return _refuse_weight_format(inst, gpu, scheme)
    fp8_gpus = ", ".join(sorted(k for k, g in GPUS.items() if g.fp8))
    e5m2 = gpu.compute_capability >= E5M2_KV_CAPABILITY
    if kv_dtype.startswith("fp8") and not gpu.fp8 and not (kv_dtype == "fp8_e5m2" and e5m2):
        problem = (f"{kv_dtype} KV cache needs a GPU with fp8 (e4m3) support; {gpu.name} has none, and vLLM's "
                   "attention kernels stop there (\"type fp8e4nv not supported in this architecture\")."
                   if kv_dtype != "fp8_e5m2" else
                   f"fp8_e5m2 KV cache on a GPU without fp8 needs compute capability {E5M2_KV_CAPABILITY:.1f} "
                   f"(Ampere) or later; {gpu.name} is {gpu.compute_capability:.1f}.")
        e5m2_fix = (", or to fp8_e5m2 (stored in 8 bits, widened to 16 inside the attention kernel: half the KV "
                    "memory)" if e5m2 else "")
        return inst.refuse("vllm_kv_cache_dtype", problem,
                           f"set it to auto (16-bit KV cache){e5m2_fix}, or use a GPU with fp8 ({fp8_gpus}).")
    if inst.dtype == "bfloat16" and not gpu.bf16:
        return inst.refuse("vllm_dtype", f"{gpu.name} does not compute in bfloat16.",
                           "set it to float16 (or auto, which picks float16 there).")
    return None


def _refuse_weight_format(inst: PlannedInstance, gpu: GpuSpec, scheme: QuantScheme) -> FleetConfigError:
    need, cc = scheme.min_capability, gpu.compute_capability
    asked = inst.dep.quantization is not None
    what = (f"{scheme.method} weights need" if asked
            else f"{inst.arch.name}'s checkpoint ({scheme.method}, from its quantization_config) needs")
    how = (f" (weight-only through its Marlin kernel below {FP8_NATIVE_CAPABILITY:.1f}, natively from there)"
           if scheme.fp8 else "")
    able = ", ".join(sorted(k for k, g in GPUS.items() if g.compute_capability >= need))
    int4 = [f"{'an' if q == 'awq' else 'a'} {q.upper()}" for q in ("awq", "gptq") if MIN_CAPABILITY[q] <= cc]
    fixes = [f"serve {int4[0]} (int4) checkpoint of the model instead, which runs on {gpu.name}"] if int4 else []
    fixes.append(f"use a GPU of compute capability {need:.1f} or later ({able})")
    return inst.refuse("vllm_quantization" if asked else "vllm_model_id",
                       f"{what} a GPU of compute capability {need:.1f} or later in vLLM{how}; {gpu.name} is {cc:.1f}.",
                       "; or ".join(fixes) + ".")


def check_tensor_parallel(inst: PlannedInstance) -> FleetConfigError | None:
    """A tensor-parallel size that does not divide the heads, or needs more GPUs than the host has."""
    arch, tp, host_gpus = inst.arch, inst.tp, inst.host_gpus
    # The sizes suggested are bounded by the host's GPUs only on a GPU host that states them.
    on_host = inst.gpu is not None and bool(host_gpus)
    valid = [t for t in TP_CHOICES if t <= (host_gpus if on_host else max(TP_CHOICES)) and tp_ok(arch, t)]
    valid_text = ", ".join(map(str, valid)) or "none"
    if not tp_ok(arch, tp):
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


def check_max_model_len(inst: PlannedInstance) -> FleetConfigError | None:
    """A max_model_len longer than the model was built for."""
    asked, max_pos = inst.dep.max_model_len, inst.arch.max_position_embeddings
    if asked is None or not max_pos or asked <= max_pos:
        return None
    return inst.refuse("vllm_max_model_len",
                       f"{asked:,} tokens is above {inst.arch.name}'s max_position_embeddings of {max_pos:,}.",
                       f"set it to {max_pos:,} or less: vLLM refuses a longer one, and the model was not trained "
                       f"for positions past its limit.")


def alternatives(inst: PlannedInstance) -> list[str]:
    """Other tensor-parallel sizes, the fewest hosts one instance could span when no size fits one
    host, and quantizations that would fit: the first of each that does."""
    arch, kv_b, gpu, out = inst.arch, inst.kv_b, inst.gpu, []
    bigger = [t for t in TP_CHOICES if t > inst.tp and tp_ok(arch, t)]
    if hit := next(((t, alt) for t in bigger if (alt := fitting_layout(inst, t, inst.quant))), None):
        t, alt = hit
        host = (f"; needs a host with {t} GPUs, this one has {inst.host_gpus}"
                if inst.host_gpus is not None and t > inst.host_gpus else "")
        out.append(f"set {inst.field('vllm_tensor_parallel_size')} to {t} ({gb(alt.weights_per_gpu)} of weights "
                   f"per GPU, leaves {gb(alt.budget)} per GPU for KV cache = "
                   f"{tokens_in(inst.stage, alt, kv_b, t):,} tokens{host})")
    elif proposal := multi_host_proposal(inst):
        out.append(proposal)
    if inst.quant is not None or arch.quantization:  # quantizing is offered only for weights not quantized already
        return out
    able = [q for q in QUANTIZATIONS if MIN_CAPABILITY[q] <= gpu.compute_capability]
    quants = [q for q in able if q != "gptq" or "awq" not in able]  # AWQ and GPTQ int4 are the same size
    if hit := next(((q, t, alt) for q in quants for t in [inst.tp, *bigger]
                    if (alt := fitting_layout(inst, t, q))), None):
        q, t, alt = hit
        size = gb(alt.weights_total) if t == 1 else f"{gb(alt.weights_total)}, {gb(alt.weights_per_gpu)} per GPU"
        out.append(f"quantize the weights: {q} ({size} at tensor-parallel {t}, leaves "
                   f"{gb(alt.budget)} per GPU for KV cache = {tokens_in(inst.stage, alt, kv_b, t):,} tokens; "
                   f"{_how(q, gpu)})")
    return out


PP_CHOICES = range(2, 9)
"""Hosts one instance may span (pipeline stages) in a multi-host proposal."""


def multi_host_proposal(inst: PlannedInstance) -> str | None:
    """The fewest hosts of this host's GPUs (all of them tensor-parallel, one pipeline stage per
    host) that hold one instance, in words; None when the instance spans hosts already, runs on
    CPU, or no such layout fits."""
    if inst.gpu is None or inst.dep.pipeline_parallel > 1:
        return None
    per_host = inst.host_gpus or max(TP_CHOICES)
    if not tp_ok(inst.arch, per_host):
        return None
    hit = next(((pp, alt) for pp in PP_CHOICES if pp <= inst.arch.num_layers
                and (alt := fitting_layout(inst, per_host, inst.quant, pp=pp))), None)
    if hit is None:
        return None
    pp, alt = hit
    stage = stage_of(inst.arch, pp)
    return (f"span {pp} hosts of {per_host} × {inst.gpu.name} with one instance (`vllm_instance_groups`: "
            f"tensor-parallel {per_host} in each host, pipeline-parallel {pp} across them, {stage.num_layers} of "
            f"{inst.arch.num_layers} layers per host): {gb(alt.weights_per_gpu)} of weights per GPU, leaves "
            f"{gb(alt.budget)} per GPU for KV cache = {tokens_in(stage, alt, inst.kv_b, per_host):,} tokens")


def _how(quant: str, gpu: GpuSpec) -> str:
    if quant == "fp8" and gpu.fp8:
        return f"`--quantization fp8`, on the fly from this checkpoint; {gpu.name} has fp8"
    if quant == "fp8":
        return (f"`--quantization fp8`, on the fly from this checkpoint; weight-only on {gpu.name} (Marlin): "
                "saves memory, not compute")
    if quant == "awq":
        return "an AWQ (int4) checkpoint of the model; GPTQ is the same size"
    return "a GPTQ (int4) checkpoint of the model"


def refuse_no_room(inst: PlannedInstance, room: Room) -> FleetConfigError | None:
    """On a GPU, the weights and the reserve alone take all the usable memory."""
    gpu, lay = inst.gpu, room.lay
    if gpu is None or lay.budget > 0:
        return None
    quant_text = f" quantized to {inst.quant}" if inst.quant else ""
    fixes = alternatives(inst) or ["use a GPU with more memory (add one with `vllm_gpu_types`) or a smaller model"]
    return inst.refuse("vllm_tensor_parallel_size",
                       f"{inst.arch.name} in {inst.dtype}{quant_text} needs {gb(lay.weights_total)} of weights, "
                       f"{gb(lay.weights_per_gpu)} per GPU at tensor-parallel {inst.tp}; one {gpu.name} holds "
                       f"{gb(gpu.memory_bytes)} × {inst.dep.gpu_memory_utilization:g} = {gb(lay.usable)}, of which "
                       f"{gb(lay.reserve)} is kept for activations and CUDA graphs.",
                       "; or ".join(fixes) + ".")


def refuse_kv(inst: PlannedInstance, room: Room) -> FleetConfigError | None:
    """Not even one sequence of max_model_len (one block, when derived) fits in the KV cache."""
    lay, kv_b, gpu = room.lay, inst.kv_b, inst.gpu
    seq = seq_bytes(inst.stage, inst.need, kv_b, inst.tp, room.block)
    if lay.budget >= seq:
        return None
    what = f"a {inst.need:,}-token sequence" if inst.dep.max_model_len else "one block of tokens"
    if gpu is None:
        problem = (f"{what} of {inst.arch.name} needs {gb(seq)} of KV cache ({kv_b}-byte elements) but the "
                   f"CPU KV cache is {gb(lay.budget)} ({lay.budget:,} bytes): {room.kv_tokens:,} tokens.")
        fixes = [f"raise `vllm_kv_cache_bytes` to at least {round_up(seq, 1 << 20):,}"]
    else:
        problem = (f"{what} of {inst.arch.name} needs {gb(seq)} of KV cache per GPU but only {gb(lay.budget)} "
                   f"is left: {gb(lay.usable)} usable − {gb(lay.weights_per_gpu)} of weights − "
                   f"{gb(lay.reserve)} reserve, {room.kv_tokens:,} tokens.")
        fixes = alternatives(inst)
        if inst.dep.gpu_memory_utilization < 0.95 and (alt := fitting_layout(inst, inst.tp, inst.quant, 0.95)):
            fixes.append(f"raise {inst.field('vllm_gpu_memory_utilization')} to 0.95 "
                         f"({tokens_in(inst.stage, alt, kv_b, inst.tp):,} tokens; only if nothing else uses the GPU)")
        kv_8bit = "fp8" if gpu.fp8 else "fp8_e5m2" if gpu.compute_capability >= E5M2_KV_CAPABILITY else None
        if kv_b > 1 and kv_8bit:
            fixes.append(f"set {inst.field('vllm_kv_cache_dtype')} to {kv_8bit} (about {kv_b}× the tokens)")
    if room.longest >= room.block:
        fixes.insert(0, f"set {inst.field('vllm_max_model_len')} to {room.longest:,} or less")
    return inst.refuse("vllm_max_model_len", problem, "; or ".join(fixes) + ".")

