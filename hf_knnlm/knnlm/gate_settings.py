"""GateTraining: how the adaptive-retrieval gate is fitted (apart from the fitting, so that the CLI can
show it in ``--help`` without importing torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..utils.checks import check_flag, check_positive_finite, check_positive_int


def _check_share(name: str, value: Any, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1): {meaning}.")


@dataclass
class GateTraining:
    """How [`train_gate`][hf_knnlm.train_gate] / [`fit_gate`][hf_knnlm.knnlm.fit_gate] fit the gate.

    Args:
        use_queries (`bool`, defaults to `False`): also feed the query vector to the gate (ranks tokens
            better; needs tens of thousands of training tokens).
        skip_fraction (`float`, defaults to 0.5): share of tokens not searched, in [0, 1).
        calibration_fraction (`float`, defaults to 0.2): share of the text kept out of fitting to set
            the skip threshold, in [0, 1).
        width (`int`, defaults to 16): hidden units of the gate's MLP.
        epochs (`int`, defaults to 300): full-batch Adam steps.
        learning_rate (`float`, defaults to 1e-2): Adam learning rate.
        weight_decay (`float`, defaults to 1e-2): Adam weight decay.
        seed (`int`, defaults to 0): seed of the gate's initial weights.

    Examples:

    ```python
    >>> from hf_knnlm import GateTraining
    >>> training = GateTraining(skip_fraction=0.3)
    >>> training.replace(epochs=50).epochs, training.epochs  # a copy; None values are ignored
    (50, 300)
    >>> GateTraining(skip_fraction=1.0)
    Traceback (most recent call last):
    ...
    ValueError: skip_fraction=1.0 must be a number in [0, 1): the share of tokens not searched.
    ```
    """

    use_queries: bool = field(
        default=False,
        metadata={"help": "Also feed the query vector to the gate (ranks tokens better; needs more text)."},
    )
    skip_fraction: float = field(default=0.5, metadata={"help": "Share of tokens not searched."})
    calibration_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of the text kept out of fitting to set the skip threshold."},
    )
    width: int = field(default=16, metadata={"help": "Hidden units of the gate's MLP."})
    epochs: int = field(default=300, metadata={"help": "Full-batch Adam steps."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=1e-2, metadata={"help": "Adam weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed of the gate's initial weights."})

    def __post_init__(self) -> None:
        check_flag("use_queries", self.use_queries)
        _check_share("skip_fraction", self.skip_fraction, "the share of tokens not searched")
        _check_share(
            "calibration_fraction",
            self.calibration_fraction,
            "the share of tokens kept out of fitting to set the skip threshold (e.g. 0.2)",
        )
        check_positive_int("width", self.width, "hidden units of the gate")
        check_positive_int("epochs", self.epochs, "Adam steps")
        check_positive_finite("learning_rate", self.learning_rate)
        if isinstance(self.weight_decay, bool) or not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a number >= 0.")

    def replace(self, **changes: Any) -> GateTraining:
        return dataclasses.replace(self, **{name: v for name, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["GateTraining"]
