"""KNNLMConfig: the saved form of a [`KNNLMForCausalLM`][hf_knnlm.KNNLMForCausalLM] (``config.json``).

A module of its own, as transformers keeps ``configuration_*.py`` apart from ``modeling_*.py``:
registering the ``knnlm`` model type with ``AutoConfig`` then needs no model code. The kNN-LM
settings are one [`KNNSettings`][hf_knnlm.KNNSettings] object, ``config.settings``, saved as a nested
``"settings"`` object; configs written before it (flat ``k``, ``lmbda``, ... keys) load the same.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .settings import SETTING_NAMES, KNNSettings


@strict
class KNNLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`KNNLMForCausalLM`][hf_knnlm.KNNLMForCausalLM]: which base model and datastore,
    and the kNN-LM settings.

    Args:
        base_model_name_or_path (`str`, *optional*): Hub id or path of the base causal LM.
        base_model_gguf_file (`str`, *optional*): the GGUF file inside ``base_model_name_or_path`` the
            base model was loaded from (passed back as ``gguf_file=`` when the wrapper is reloaded).
        datastore (`str`, *optional*): Hub id or path of the datastore, or `None` when it is saved
            inside this wrapper's own folder (or Hub repository), in ``datastore_subfolder``.
        datastore_subfolder (`str`, *optional*): the datastore's folder inside ``datastore`` (or inside
            this wrapper's folder or repository when ``datastore`` is `None`).
        settings (`KNNSettings` or `dict`, *optional*): k, lmbda, temperature,
            recompute_dists, retomaton and gate; defaults to ``KNNSettings()``.

    Examples:

    ```python
    >>> from hf_knnlm import KNNLMConfig
    >>> config = KNNLMConfig(base_model_name_or_path="gpt2", datastore="org/store", settings={"k": 64})
    >>> config.settings.k, config.settings.lmbda
    (64, 0.25)
    >>> config.to_dict()["settings"]["k"]
    64
    ```
    """

    model_type = "knnlm"

    base_model_name_or_path: str | None = None
    base_model_gguf_file: str | None = None
    datastore: str | None = None
    datastore_subfolder: str | None = None
    settings: dict | KNNSettings | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Configs saved before the nested "settings" object kept its fields at the top level.
        legacy = {name: kwargs.pop(name) for name in SETTING_NAMES if name in kwargs}
        settings = self.settings
        if isinstance(settings, dict) or settings is None:
            settings = KNNSettings.from_dict({**legacy, **(settings or {})})
        elif legacy:
            settings = settings.replace(**legacy)
        self.settings = settings
        super().__post_init__(**kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``config.lmbda = 0.5`` (the layout before "settings") sets the one settings object, validated.
        settings = self.__dict__.get("settings")
        if name in SETTING_NAMES and isinstance(settings, KNNSettings):
            setattr(settings, name, value)
            return
        super().__setattr__(name, value)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["settings"] = self.settings.to_dict()
        return output


AutoConfig.register("knnlm", KNNLMConfig, exist_ok=True)


__all__ = ["KNNLMConfig"]
