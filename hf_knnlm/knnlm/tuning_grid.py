"""TuningGrid: the points a tuning sweep tries, apart from the sweep itself so that the CLI can show
them in ``--help`` without importing torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..utils.checks import check_positive_int, is_int
from .settings import check_lmbda, check_temperature

DEFAULT_KS = (8, 32, 128, 512, 1024)


@dataclass
class TuningGrid:
    """lmbda x temperature x k points of a sweep (every point is computed from one cached search).

    Given to [`tune`][hf_knnlm.tune] as ``grid=`` (or field by field: ``tune(..., lmbdas=[0.1, 0.3])``);
    every value is checked when the grid is made.

    Args:
        lmbdas (`tuple[float, ...]`): lmbda values to try, each in [0, 1].
        temperatures (`tuple[float, ...]`, *optional*): temperatures to try; default:
            ``temperature_multiples`` x the median nearest-neighbour distance (of the tokens that
            ``max_cache_bytes`` holds), plus 1 and 10.
        temperature_multiples (`tuple[float, ...]`): multiples of that distance used by default.
        ks (`tuple[int, ...]`, *optional*): k values to try, each at most the k searched; default:
            those of ``DEFAULT_KS`` below it, and it.
        max_cache_bytes (`int`, defaults to 64 MiB): bytes of neighbours (tokens x k x 8) held before
            the sweep streams: the first tokens of the text that fit (8,192 at k 1024) set the
            temperature scale (their median nearest-neighbour distance). The whole text is swept.

    Examples:

    ```python
    >>> from hf_knnlm import TuningGrid
    >>> grid = TuningGrid(lmbdas=[0.1, 0.3], ks=[8, 64])
    >>> grid.lmbdas, grid.ks  # lists are kept as tuples
    ((0.1, 0.3), (8, 64))
    >>> TuningGrid().ks_for(100)  # the default ks below the k searched, and it
    (8, 32, 100)
    >>> TuningGrid(lmbdas=[0.1, 1.5])
    Traceback (most recent call last):
    ...
    ValueError: lmbda=1.5 must be a number in [0, 1]: it is the weight of p_kNN in the mixture.
    >>> grid.check_ks(32)  # a cache of 32 neighbours per token cannot answer k=64
    Traceback (most recent call last):
    ...
    ValueError: k=64 must be an integer in [1, 32] (the k searched once for the cache).
    ```
    """

    lmbdas: tuple[float, ...] = field(
        default=(0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
        metadata={"help": "lmbda values to try."},
    )
    temperatures: tuple[float, ...] | None = field(
        default=None,
        metadata={
            "help": "Temperatures to try; default: temperature_multiples x the median nearest-neighbour "
            "distance of the first tokens of the text (see max_cache_bytes), plus 1 and 10."
        },
    )
    temperature_multiples: tuple[float, ...] = field(
        default=(0.03, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
        metadata={"help": "Multiples of the median nearest-neighbour distance used as temperatures."},
    )
    ks: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": f"k values to try, each <= the k searched; default: {DEFAULT_KS} below it, and it."
        },
    )
    max_cache_bytes: int = field(
        default=1 << 26,
        metadata={
            "help": "Bytes of neighbours (tokens x k x 8) held before the sweep streams: the first tokens "
            "of the text that fit set the temperature scale (their median nearest-neighbour distance)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("lmbdas", "temperatures", "temperature_multiples", "ks"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        for lmbda in self.lmbdas:
            check_lmbda(lmbda)
        for temperature in (*(self.temperatures or ()), *self.temperature_multiples):
            check_temperature(temperature)
        for k in self.ks or ():
            if not is_int(k) or k < 1:
                raise ValueError(f"ks contains {k!r}; every k must be a positive integer.")
        check_positive_int("max_cache_bytes", self.max_cache_bytes, "bytes of neighbours held for the scale")

    def check_ks(self, searched: int) -> None:
        """Every k of the grid is one the cache holds (``<= searched``)."""
        for k in self.ks or ():
            if k > searched:
                raise ValueError(
                    f"k={k!r} must be an integer in [1, {searched}] (the k searched once for the cache)."
                )

    def ks_for(self, searched: int) -> tuple[int, ...]:
        if self.ks is not None:
            return self.ks
        return tuple(sorted({k for k in DEFAULT_KS if k < searched} | {searched}))

    def replace(self, **changes: Any) -> TuningGrid:
        return dataclasses.replace(self, **{name: v for name, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["DEFAULT_KS", "TuningGrid"]
