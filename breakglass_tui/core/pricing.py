"""Token prices per model family, for the cost shown per turn and per incident.

Prices in USD per million tokens (input, output); cache writes cost 1.25x input, cache reads 0.1x.
A model not in the table is reported in tokens only (cost None).
"""

from __future__ import annotations

from breakglass_tui.core.events import Usage

# Longest prefix wins. Source: Anthropic's public price list (per MTok).
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4-2025": (15.0, 75.0),
    "claude-sonnet-4-": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
}


def price_for(model: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens for ``model``, or None when unknown."""
    best = ""
    for prefix in PRICES:
        if model.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return PRICES[best] if best else None


def cost_usd(model: str, usage: Usage) -> float | None:
    """The cost of ``usage`` on ``model``; None when the model is not in the table."""
    price = price_for(model)
    if price is None:
        return None
    inp, out = price
    return (
        usage.input_tokens * inp
        + usage.cache_creation_input_tokens * inp * 1.25
        + usage.cache_read_input_tokens * inp * 0.1
        + usage.output_tokens * out
    ) / 1_000_000


def add(a: Usage, b: Usage) -> Usage:
    """The sum of two usages (costs included)."""
    return Usage(
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cache_creation_input_tokens=a.cache_creation_input_tokens + b.cache_creation_input_tokens,
        cache_read_input_tokens=a.cache_read_input_tokens + b.cache_read_input_tokens,
        cost_usd=a.cost_usd + b.cost_usd,
    )
