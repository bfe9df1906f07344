"""KNNLMConfig: the saved settings of a :class:`~hf_knnlm.KNNLMForCausalLM` (``config.json``), and the
validated view of its k / lmbda / temperature / recompute_dists that the wrapper exposes as ``settings``.

A module of its own, as transformers keeps ``configuration_*.py`` apart from ``modeling_*.py``:
registering the ``knnlm`` model type with ``AutoConfig`` then needs no model code.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .mixture import KNNSettings, check_setting


@strict
class KNNLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`KNNLMForCausalLM`]: which base model and datastore, and the mixture settings.

    Args:
        base_model_name_or_path (`str`, *optional*): Hub id or path of the base causal LM.
        datastore (`str`, *optional*): Hub id or path of the datastore, or `None` when it is saved
            inside this wrapper's own folder (or Hub repository), in ``datastore_subfolder``.
        datastore_subfolder (`str`, *optional*): the datastore's folder inside ``datastore`` (or inside
            this wrapper's folder or repository when ``datastore`` is `None`).
        k (`int`, defaults to 1024): neighbours per query.
        lmbda (`float`, defaults to 0.25): weight of p_kNN in [0, 1].
        temperature (`float`, defaults to 1.0): divides the neighbour distances.
        recompute_dists (`bool`, defaults to `False`): exact distances from the stored keys.
        retomaton (`int`, *optional*): RetoMaton threshold: follow corpus pointers and search only
            when fewer than this many survive.
        gate (`bool`, defaults to `False`): use the adaptive-retrieval gate saved with the datastore.
    """

    model_type = "knnlm"

    base_model_name_or_path: str | None = None
    datastore: str | None = None
    datastore_subfolder: str | None = None
    k: int = 1024
    lmbda: float = 0.25
    temperature: float = 1.0
    recompute_dists: bool = False
    retomaton: int | None = None
    gate: bool = False


AutoConfig.register("knnlm", KNNLMConfig, exist_ok=True)


def settings_of(config: KNNLMConfig) -> KNNSettings:
    return KNNSettings(config.k, config.lmbda, config.temperature, config.recompute_dists)


class SettingsView:
    """A wrapper's :class:`KNNSettings` kept in its config, so that the two never disagree."""

    def __init__(self, config: KNNLMConfig) -> None:
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str) -> Any:
        if name in KNNSettings.__dataclass_fields__:
            return getattr(self._config, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in KNNSettings.__dataclass_fields__:
            raise AttributeError(f"{name!r} is not one of {list(KNNSettings.__dataclass_fields__)}.")
        check_setting(name, value)
        setattr(self._config, name, value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SettingsView):
            other = settings_of(other._config)
        return settings_of(self._config) == other

    def __repr__(self) -> str:
        return repr(settings_of(self._config))


__all__ = ["KNNLMConfig", "SettingsView", "settings_of"]
