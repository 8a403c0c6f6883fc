"""Token prices per model, for the cost shown per turn and per incident and the spend limit.

USD per million tokens, from the model pages of the Anthropic documentation ("Models overview",
each model's page: input, output, 5-minute cache write, cache read). Cache reads are not one
ratio of the input price any more (Opus 5.5 reads at 0.05x), so each model has its own four
prices. A model not in the table has no known price: its cost is *unknown* (``cost_known``
False), never $0.00. Claude Haiku 5.5 is left out on purpose: its price depends on each
request's prompt length, which this table does not model.
"""

from __future__ import annotations

from dataclasses import dataclass

from breakglass_tui.core.events import Usage


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_write: float  # a 5-minute cache write (the kind this console asks for)
    cache_read: float


# Matched on the whole id or a prefix ending at "-" (a dated snapshot id): the longest wins, so
# "claude-sonnet-5-5" is never priced as "claude-sonnet-5".
PRICES: dict[str, Price] = {
    # The current lineup.
    "claude-sonnet-5-5": Price(2.0, 10.0, 2.5, 0.20),
    "claude-opus-5-5": Price(4.0, 20.0, 5.0, 0.20),
    "claude-fable-5-1": Price(10.0, 50.0, 12.5, 1.0),
    # Earlier models still served.
    "claude-sonnet-5": Price(2.0, 10.0, 2.5, 0.20),
    "claude-opus-5": Price(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-6": Price(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-5": Price(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-1": Price(15.0, 75.0, 18.75, 1.50),
    "claude-sonnet-4-6": Price(3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4-5": Price(3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4": Price(3.0, 15.0, 3.75, 0.30),
    "claude-haiku-4-5": Price(1.0, 5.0, 1.25, 0.10),
}


def price_for(model: str) -> Price | None:
    """The prices for ``model``, or None when unknown."""
    best = ""
    for key in PRICES:
        if (model == key or model.startswith(key + "-")) and len(key) > len(best):
            # A longer id of the same family ("claude-sonnet-5-5" under "claude-sonnet-5") is
            # another model, not a snapshot: only a date-like tail counts as the same model.
            tail = model[len(key) + 1 :]
            if model == key or tail.isdigit():
                best = key
    return PRICES[best] if best else None


def cost_usd(model: str, usage: Usage) -> float | None:
    """The cost of ``usage`` on ``model``; None when the model is not in the table."""
    price = price_for(model)
    if price is None:
        return None
    return (
        usage.input_tokens * price.input
        + usage.cache_creation_input_tokens * price.cache_write
        + usage.cache_read_input_tokens * price.cache_read
        + usage.output_tokens * price.output
    ) / 1_000_000


def add(a: Usage, b: Usage) -> Usage:
    """The sum of two usages (costs included; unknown if either is)."""
    return Usage(
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cache_creation_input_tokens=a.cache_creation_input_tokens + b.cache_creation_input_tokens,
        cache_read_input_tokens=a.cache_read_input_tokens + b.cache_read_input_tokens,
        cost_usd=a.cost_usd + b.cost_usd,
        cost_known=a.cost_known and b.cost_known,
    )


def describe_cost(usage: Usage) -> str:
    """ "$1.23", or "cost unknown" when a model without a price was used (never "$0.00")."""
    return f"${usage.cost_usd:.2f}" if usage.cost_known else "cost unknown"
