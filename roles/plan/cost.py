"""What serving costs: dollars per million tokens of a busy machine, and when renting one beats
paying an API per token."""

from __future__ import annotations

import math
from dataclasses import dataclass

from roles.errors import FleetConfigError


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per million tokens of a machine that costs ``price_per_hour`` and is kept busy."""
    if price_per_hour < 0 or tokens_per_s <= 0:
        raise FleetConfigError("cost", f"needs a price ≥ 0 and a throughput > 0, got {price_per_hour!r} $/h "
                               f"and {tokens_per_s!r} tokens/s.", "give the measured aggregate tokens/s.")
    return price_per_hour / (tokens_per_s * 3600 / 1e6)


@dataclass(frozen=True)
class BreakEven:
    cost_per_million_at_full_load: float
    instances_needed: int
    """Machines to rent for ``daily_tokens`` (1 unless one cannot make that many tokens a day)."""
    self_host_cost_per_day: float
    """Rent of ``instances_needed`` machines for 24 hours, busy or not."""
    api_cost_per_day: float
    utilization: float
    """Share of one machine's daily capacity that ``daily_tokens`` uses."""
    break_even_utilization: float
    """Utilization above which self-hosting is cheaper: full-load cost per token / API price."""
    cheaper: str
    """``"self-host"`` or ``"api"``."""


def break_even(price_per_hour: float, tokens_per_s: float, api_price_per_million: float,
               daily_tokens: float) -> BreakEven:
    """Compare renting one machine around the clock with paying an API per token for ``daily_tokens``."""
    full = cost_per_million_tokens(price_per_hour, tokens_per_s)
    if api_price_per_million <= 0 or daily_tokens < 0:
        raise FleetConfigError("break-even", f"needs an API price > 0 and daily tokens ≥ 0, got "
                               f"{api_price_per_million!r} $/M and {daily_tokens!r}.", "give both.")
    utilization = daily_tokens / (tokens_per_s * 86400)
    instances = max(1, math.ceil(utilization))
    self_host = price_per_hour * 24 * instances
    api = daily_tokens / 1e6 * api_price_per_million
    return BreakEven(
        cost_per_million_at_full_load=full, instances_needed=instances, self_host_cost_per_day=self_host,
        api_cost_per_day=api, utilization=utilization, break_even_utilization=full / api_price_per_million,
        cheaper="self-host" if self_host < api else "api",
    )


def fallback_cost_per_day(daily_tokens: float, share: float, price_per_million: float) -> float:
    """What a fallback provider costs a day when it carries ``share`` of ``daily_tokens``."""
    return daily_tokens * share / 1e6 * price_per_million
