"""The console's vocabulary of quantization choices: precisions, activation methods, and the preset name a
choice maps to (and back, as the ratings CSV and MOS table name a recipe)."""
from __future__ import annotations

import quant

PRECISIONS = ("W8A8", "W4A8", "W8A16", "W4A16")
WEIGHT_ONLY = ("W8A16", "W4A16")  # no activation method applies
METHODS = quant.ACTIVATION_METHODS


def recipe_name(precision: str, method: str, lora: bool = False) -> str:
    """UI choices -> preset name: ("W8A8", "sqd", True) -> "w8a8-sqd+lora"; weight-only ignores the method."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    w_bits, a_bits = (int(bits) for bits in precision[1:].split("A"))
    if precision in WEIGHT_ONLY:
        method = "weight-only"
    elif method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return quant.preset_name(w_bits, a_bits, method, lora)


def describe(recipe: quant.Recipe) -> tuple[str, str]:
    """(precision, method) of a recipe as the ratings CSV and MOS table name them: ("W4A8", "sqd+lora")."""
    return f"W{recipe.w_bits}A{recipe.a_bits}", recipe.method + ("+lora" if recipe.lora_rank else "")
