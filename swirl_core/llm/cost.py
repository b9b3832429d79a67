"""Per-call cost from litellm's bundled price table, read as JSON (importing litellm costs ~3 s).

An unknown price gives None (stored as NULL), never 0: a zero would silently under-report spend.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path


@functools.cache
def _price_table() -> dict[str, dict]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(spec.submodule_search_locations[0]) / "model_prices_and_context_window_backup.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def price_per_token(model: str) -> tuple[float, float] | None:
    """(input, output) USD per token for a litellm model name such as `openai/gpt-4o-mini`."""
    table = _price_table()
    candidates = [model]
    if "/" in model:
        candidates.append(model.split("/", 1)[1])
    for name in candidates:
        entry = table.get(name)
        if entry and "input_cost_per_token" in entry and "output_cost_per_token" in entry:
            return float(entry["input_cost_per_token"]), float(entry["output_cost_per_token"])
    return None


def call_cost(
    prices: tuple[float, float] | None, prompt_tokens: int | None, completion_tokens: int | None
) -> float | None:
    if prices is None or prompt_tokens is None or completion_tokens is None:
        return None
    return prices[0] * prompt_tokens + prices[1] * completion_tokens
