"""The capacity plan as a person reads it: per host and instance, the fit, flags, ceilings, cost."""

from __future__ import annotations

from roles.common import gb
from roles.plan import settings
from roles.plan.cost import break_even, cost_per_million_tokens, fallback_cost_per_day
from roles.plan.fleet import FleetPlan, HostPlan, Instance
from roles.plan.instance import RESERVE_REASON


def _flag(inst: Instance, setting: str, value: int) -> str:
    """A value, marked * when the plan derived it rather than the inventory setting it."""
    return f"{value:,}{'' if inst.get(setting) is not None else '*'}"


def instance_row(host: HostPlan, inst: Instance) -> list[str]:
    fit = inst.fit
    hardware = f"{fit.tensor_parallel}x {host.gpu.name}" if host.gpu else "cpu"
    quant = fit.quantization or fit.weight_dtype
    budget = gb(fit.budget_bytes_per_gpu) + ("!" if fit.warnings else "")
    # A multi-host instance shows once per host, with the host's pipeline stage.
    name = inst.name if inst.node is None else f"{inst.name} {inst.node.rank + 1}/{inst.node.nnodes}"
    return [host.name, name, hardware, quant, gb(fit.weight_bytes_per_gpu), budget,
            f"{fit.kv_tokens:,}", _flag(inst, "vllm_max_model_len", fit.max_model_len),
            f"{fit.max_concurrent_seqs:,}", _flag(inst, "vllm_max_num_seqs", fit.max_num_seqs),
            _speed(fit.decode_ceiling_weights_only_tokens_per_s), _speed(fit.decode_ceiling_tokens_per_s)]


def _speed(tokens_per_s: float | None) -> str:
    return f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "-"


def cost_lines(plan: FleetPlan) -> list[str]:
    """Cost per million tokens and break-even utilization, where the inventory gives prices."""
    data = plan.hosts[0].data
    price, rate = settings.value(data, "vllm_gpu_hour_price"), settings.value(data, "vllm_tokens_per_s")
    if not price or not rate:
        return ["cost: set vllm_gpu_hour_price and vllm_tokens_per_s (measured or assumed) to see it."]
    gpus = sum(i.fit.tensor_parallel for h in plan.hosts for i in h.instances)
    instances = sum(i.serves for h in plan.hosts for i in h.instances)  # a multi-host instance counts once
    hourly, tokens_per_s = price * gpus, rate * instances
    lines = [f"cost: {gpus} GPU(s) at {price:g}/h, {instances} instance(s) at {rate:,.0f} tok/s each: "
             f"{cost_per_million_tokens(hourly, tokens_per_s):.3f} per million tokens at full load"]
    api, daily = settings.value(data, "vllm_api_price_per_million"), settings.value(data, "vllm_daily_tokens")
    fallback_price = settings.value(data, "vllm_fallback_price_per_million")
    share = settings.value(data, "vllm_fallback_share")
    if fallback_price and daily:
        lines.append(f"      the fallback provider at {fallback_price:g} per million, carrying {share:.0%} of the "
                     f"{daily:,} tokens a day (vllm_fallback_share): "
                     f"{fallback_cost_per_day(daily, share, fallback_price):,.2f}/day")
    if api and daily:
        b = break_even(hourly, tokens_per_s, api, daily)
        lines.append(f"      against an API at {api:g} per million and {daily:,} tokens a day: self-hosting costs "
                     f"{b.self_host_cost_per_day:,.2f}/day, the API {b.api_cost_per_day:,.2f}/day; utilization "
                     f"{b.utilization:.0%}, break-even at {b.break_even_utilization:.0%}: {b.cheaper} is cheaper")
    return lines


def render(plan: FleetPlan) -> str:
    header = ["host", "instance", "hardware", "weights", "weights/GPU", "KV budget/GPU", "KV tokens",
              "max-model-len", "seqs at max len", "max-num-seqs", "decode: weights", "decode: max len"]
    rows = [header] + [instance_row(h, i) for h in plan.hosts for i in h.instances]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    # Warnings come straight after the table: a tight fit is the one thing to act on before deploying.
    warnings = [f"WARNING {h.name}/{i.name}: {w}" for h in plan.hosts for i in h.instances for w in i.fit.warnings]
    notes = sorted({f"{h.name}/{i.name}: {n}" for h in plan.hosts for i in h.instances for n in i.fit.notes})
    legend = ["* derived by the plan (unset in the inventory)"]
    if warnings:
        legend.append("! warned about (a tight fit, an instance group without RDMA): see the WARNING lines above")
    legend += ["decode ceilings: one stream, memory bandwidth over the bytes read per token: the weights alone, "
               "and the weights plus one max-length sequence's KV cache",
               f"KV budget/GPU: memory × utilization − weights − reserve; the reserve: {RESERVE_REASON}"]
    notes_block = ["notes:"] + [f"  {n}" for n in notes] if notes else []
    return "\n".join(lines + warnings + legend + cost_lines(plan) + notes_block)
