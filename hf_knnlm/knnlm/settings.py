"""KNNSettings: the one object that says how a kNN-LM searches and mixes.

Every entry point (``KNNProcessor``, ``KNNLMForCausalLM`` and its ``config.json``,
``evaluate_perplexity``, ``tune``, ``train_gate``, ``explain_generation``,
``evaluate_retrieval_perplexity`` and the CLI, whose options are generated from these fields) takes
one as ``settings=`` and states no default of its own; keyword arguments such as ``k=`` override
single fields. Like peft's configs: ``help`` metadata on every field, validation in
``__post_init__`` (and on every assignment), unknown keys tolerated with a warning when read back.

``temperature=None`` means the datastore's calibrated temperature (recorded when the store was built, see
``calibrate_temperature``): squared L2 distances between FFN inputs are in the tens to thousands, so a fixed
temperature of 1 makes p_kNN a one-hot on the nearest neighbour and usually hurts.
[`KNNSettings.resolve`][hf_knnlm.KNNSettings.resolve] fills it in for one store.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..lm.windows import WindowSettings
from ..utils.checks import check_flag, check_fraction, check_positive_finite, check_positive_int, is_int

if TYPE_CHECKING:
    from ..datastore import Datastore

logger = logging.getLogger(__name__)


def check_k(k: Any) -> None:
    check_positive_int("k", k, "the number of neighbours, e.g. k=1024")


def check_lmbda(lmbda: Any) -> None:
    check_fraction("lmbda", lmbda, "it is the weight of p_kNN in the mixture")


def check_temperature(temperature: Any) -> None:
    if temperature is not None:
        check_positive_finite(
            "temperature", temperature, "it divides the neighbour distances (None: the store's)"
        )


def check_retomaton(threshold: Any) -> None:
    if threshold is not None and (not is_int(threshold) or threshold < 1):
        raise ValueError(
            f"retomaton={threshold!r} must be an integer >= 1: the fewest surviving pointers that replace a "
            f"search (e.g. 8; larger searches more often), or None for no RetoMaton."
        )


_CHECKS = {
    "k": check_k,
    "lmbda": check_lmbda,
    "temperature": check_temperature,
    "recompute_dists": lambda value: check_flag("recompute_dists", value),
    "retomaton": check_retomaton,
    "gate": lambda value: check_flag("gate", value),
}


@dataclass
class KNNSettings:
    """How a kNN-LM searches its datastore and mixes p_kNN into the LM. Every assignment is validated.

    Examples:

    ```python
    >>> from hf_knnlm import KNNSettings
    >>> settings = KNNSettings(k=16, lmbda=0.3)
    >>> settings.temperature is None  # the datastore's calibrated temperature
    True
    >>> settings.replace(lmbda=0.5).lmbda, settings.lmbda
    (0.5, 0.3)
    >>> KNNSettings(lmbda=1.5)
    Traceback (most recent call last):
    ...
    ValueError: lmbda=1.5 must be a number in [0, 1]: it is the weight of p_kNN in the mixture.
    ```
    """

    k: int = field(
        default=1024, metadata={"help": "Neighbours retrieved per query (clamped to the store size)."}
    )
    lmbda: float = field(
        default=0.25, metadata={"help": "Weight of p_kNN in the mixture, in [0, 1]; 0 gives the base model."}
    )
    temperature: float | None = field(
        default=None,
        metadata={
            "help": "Divides the squared L2 distances before the softmax over neighbours; "
            "default: the temperature the datastore was calibrated with."
        },
    )
    recompute_dists: bool = field(
        default=False,
        metadata={"help": "Exact distances from the stored keys (for PQ-compressed indexes)."},
    )
    retomaton: int | None = field(
        default=None,
        metadata={
            "help": "RetoMaton: follow corpus pointers and search only when fewer than this many survive."
        },
    )
    gate: bool = field(
        default=False,
        metadata={
            "help": "Adaptive retrieval: the gate saved with the datastore sets lmbda and skips searches."
        },
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CHECKS:
            _CHECKS[name](value)
        other = {"retomaton": "gate", "gate": "retomaton"}.get(name)
        if (
            other is not None
            and value not in (None, False)
            and getattr(self, other, None) not in (None, False)
        ):
            raise ValueError(
                f"{name}={value!r} does not combine with {other}={getattr(self, other)!r} (two ways of "
                "skipping searches); set one of them."
            )
        object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> KNNSettings:
        """A copy with ``changes`` applied (``None`` values are ignored: they mean "not given")."""
        unknown = sorted(set(changes) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown}; the kNN-LM settings are {SETTING_NAMES}."
            )
        return dataclasses.replace(self, **{name: v for name, v in changes.items() if v is not None})

    @classmethod
    def merge(cls, settings: KNNSettings | dict | None = None, **overrides: Any) -> KNNSettings:
        """``settings`` (or the defaults) with every override that is not ``None`` applied."""
        if isinstance(settings, dict):
            settings = cls.from_dict(settings)
        if settings is not None and not isinstance(settings, KNNSettings):
            raise ValueError(
                f"settings={settings!r} is not a KNNSettings; pass hf_knnlm.KNNSettings(k=..., lmbda=...)."
            )
        return (settings or cls()).replace(**overrides)

    def resolve(self, datastore: Datastore) -> KNNSettings:
        """These settings for ``datastore``: ``k`` cut to its size, the calibrated temperature if none."""
        temperature = self.temperature if self.temperature is not None else datastore.default_temperature
        return dataclasses.replace(self, k=datastore.clamp_k(self.k), temperature=temperature)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KNNSettings:
        """Settings read back from JSON; unknown keys (a newer hf_knnlm's) are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown kNN-LM settings %s (written by a newer hf_knnlm?)", unknown)
        return cls(**{name: value for name, value in data.items() if name in known})


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(KNNSettings))
_WINDOW_FIELDS = tuple(f.name for f in dataclasses.fields(WindowSettings))


def settings_from(
    settings: KNNSettings | dict | None,
    windows: WindowSettings | None,
    overrides: dict[str, Any],
    gate: bool | None = None,
) -> tuple[KNNSettings, WindowSettings]:
    """An entry point's ``settings=`` / ``windows=`` with its keyword overrides (``k=``, ``max_length=``...)
    applied, each checked by its dataclass; a keyword that is neither is refused by name."""
    changes = dict(overrides)
    window_changes = {name: changes.pop(name) for name in _WINDOW_FIELDS if name in changes}
    knn = KNNSettings.merge(settings, gate=gate, **changes)
    return knn, (windows or WindowSettings()).replace(**window_changes)


__all__ = ["SETTING_NAMES", "KNNSettings", "check_k", "check_lmbda", "check_temperature", "settings_from"]
