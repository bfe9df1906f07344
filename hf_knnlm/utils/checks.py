"""Argument checks shared by every entry point: each error names the argument, its value and the fix.

``bool`` is refused where a number is expected (``k=True`` is a bug, not ``k=1``), and NaN or
infinity where a finite number is.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, meaning: str = "") -> None:
    """``value`` is an integer >= 1 (``meaning`` says what it counts, for the message)."""
    if not is_int(value) or value < 1:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}={value!r} must be a positive integer{what}.")


def check_fraction(name: str, value: Any, meaning: str = "") -> None:
    """``value`` is a real number in [0, 1]."""
    if not is_real(value) or not 0.0 <= value <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]{': ' + meaning if meaning else ''}.")


def check_positive_finite(name: str, value: Any, meaning: str = "") -> None:
    """``value`` is a real number with 0 < value < inf."""
    if not is_real(value) or not 0.0 < value < math.inf:
        raise ValueError(f"{name}={value!r} must be a finite number > 0{': ' + meaning if meaning else ''}.")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False.")


def check_text(name: str, value: Any, example: str = "The history of") -> None:
    """``value`` is a string with something besides whitespace (a prompt, a question)."""
    if not isinstance(value, str) or not value.strip():
        what = "is empty" if isinstance(value, str) else f"is {type(value).__name__}, not text"
        raise ValueError(f"{name} {what} ({name}={value!r}); pass the text, e.g. {name}={example!r}.")


def check_has_tokens(input_ids: Any) -> None:
    """A batch of token ids ``[batch, length]`` with at least one token per row."""
    if input_ids is not None and getattr(input_ids, "ndim", 0) >= 1 and input_ids.shape[-1] == 0:
        raise ValueError(
            f"input_ids has no tokens (shape {list(input_ids.shape)}): the prompt is empty; pass at least "
            "one token, e.g. the tokenizer's BOS token to start from nothing."
        )
