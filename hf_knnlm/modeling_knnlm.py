"""KNNLMForCausalLM: a causal LM wrapped so that its outputs are kNN-LM log-probabilities."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LogitsProcessorList,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .datastore.datastore import Datastore
from .gate import GateSteps, load_gate
from .hooks import FFNInputCapture
from .knn import KNNSettings, check_setting
from .logits_process import KNNProcessor, load_datastore, mix_neighbours, mix_with_datastore
from .retomaton import RetoMaton, stream_neighbours

WRAPPER_CONFIG_NAME = "config.json"
DATASTORE_SUBFOLDER = "datastore"


@strict
class KNNLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`KNNLMForCausalLM`]: which base model and datastore, and the mixture settings.

    Args:
        base_model_name_or_path (`str`, *optional*): Hub id or path of the base causal LM.
        datastore (`str`, *optional*): Hub id or path of the datastore; a relative path is taken
            relative to the folder this config is saved in.
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
    k: int = 1024
    lmbda: float = 0.25
    temperature: float = 1.0
    recompute_dists: bool = False
    retomaton: int | None = None
    gate: bool = False


AutoConfig.register("knnlm", KNNLMConfig, exist_ok=True)


def _settings_of(config: KNNLMConfig) -> KNNSettings:
    return KNNSettings(config.k, config.lmbda, config.temperature, config.recompute_dists)


class _SettingsView:
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
        if isinstance(other, _SettingsView):
            other = _settings_of(other._config)
        return _settings_of(self._config) == other

    def __repr__(self) -> str:
        return repr(_settings_of(self._config))


def _knnlm_config_dict(path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The saved wrapper config at ``path`` (folder or repo id), or None if it is a plain model."""
    local = Path(path) / WRAPPER_CONFIG_NAME
    if local.is_file():
        data = json.loads(local.read_text())
    elif Path(path).exists():
        return None
    else:
        try:
            data, _ = PreTrainedConfig.get_config_dict(str(path), **hub_kwargs)
        except (OSError, ValueError):
            return None
    return data if data.get("model_type") == "knnlm" else None


class KNNLMForCausalLM(PreTrainedModel):
    r"""
    A causal LM whose next-token distribution is the kNN-LM mixture
    ``log(lmbda * p_kNN + (1 - lmbda) * p_LM)``.

    ``forward`` returns a [`~modeling_outputs.CausalLMOutputWithPast`] whose ``logits`` are the
    mixed log-probabilities and whose ``loss`` is the kNN-LM negative log-likelihood of ``labels``
    (shifted inside, ``-100`` ignored, as in transformers). ``generate`` mixes automatically through
    a [`KNNProcessor`]. Every other attribute is read from the base model. ``save_pretrained``
    writes only this wrapper's ``config.json`` (and, if asked, the datastore), never base weights.

    Examples:

    ```python
    >>> from hf_knnlm import KNNLMForCausalLM
    >>> model = KNNLMForCausalLM.from_pretrained("gpt2", datastore="org/wikitext103-gpt2-knn", lmbda=0.25)
    >>> out = model(**tokenizer("Hello world", return_tensors="pt"), labels=ids)
    >>> out.loss, out.logits.shape
    ```
    """

    config_class = KNNLMConfig
    base_model_prefix = "model"
    _supports_cache_class = True

    def __init__(self, config: KNNLMConfig, model: PreTrainedModel, datastore: Datastore, tokenizer=None):
        _settings_of(config)  # refuse bad settings before anything else
        super().__init__(config)
        self.model = model
        self.datastore = datastore
        datastore.check_compatible(model, tokenizer)
        self._processor: KNNProcessor | None = None
        self._processor_key: tuple | None = None
        self._processor_lock = threading.Lock()

    @property
    def settings(self) -> _SettingsView:
        """k, lmbda, temperature and recompute_dists, read from and written to ``config`` (validated):
        a change through either is honoured by the next ``forward`` or ``generate``."""
        return _SettingsView(self.config)

    @settings.setter
    def settings(self, value: KNNSettings) -> None:
        for name in KNNSettings.__dataclass_fields__:
            setattr(self.settings, name, getattr(value, name))

    def _current_settings(self) -> KNNSettings:
        """The settings as of this call, validated, with k clamped to the store size."""
        settings = _settings_of(self.config)
        settings.k = self.datastore.clamp_k(settings.k)
        return settings

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ----------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | PreTrainedModel,
        *,
        datastore: Datastore | str | os.PathLike | None = None,
        k: int | None = None,
        lmbda: float | None = None,
        temperature: float | None = None,
        recompute_dists: bool | None = None,
        datastore_kwargs: dict[str, Any] | None = None,
        retomaton: int | None = None,
        gate: bool | None = None,
        tokenizer=None,
        **model_kwargs: Any,
    ) -> KNNLMForCausalLM:
        """Wrap a base model (instance, Hub id or path) or load a saved wrapper.

        Args:
            pretrained_model_name_or_path: a `PreTrainedModel`, a base model id/path (loaded with
                `AutoModelForCausalLM.from_pretrained(..., **model_kwargs)`, e.g. ``gguf_file=``), or
                a folder / repo saved by :meth:`save_pretrained`.
            datastore: a `Datastore`, a folder or a Hub repo id; defaults to the saved one.
            k, lmbda, temperature, recompute_dists: override the saved (or default) settings.
            retomaton, gate: skip searches with RetoMaton (a threshold) or the store's gate.
            datastore_kwargs: passed to `Datastore.from_pretrained` (revision, token, ...).
            tokenizer: the tokenizer used with the model, checked against the datastore's fingerprint.
        """
        overrides = {"k": k, "lmbda": lmbda, "temperature": temperature, "recompute_dists": recompute_dists}
        overrides = {key: v for key, v in overrides.items() if v is not None}
        saved_dir: Path | None = None
        if isinstance(pretrained_model_name_or_path, PreTrainedModel):
            base = pretrained_model_name_or_path
            fields: dict[str, Any] = {}
        else:
            hub_kwargs = {
                key: model_kwargs[key] for key in ("revision", "token", "cache_dir") if key in model_kwargs
            }
            saved = _knnlm_config_dict(pretrained_model_name_or_path, hub_kwargs)
            fields = {key: v for key, v in (saved or {}).items() if key in KNNLMConfig.__dataclass_fields__}
            if saved is not None:
                if Path(pretrained_model_name_or_path).is_dir():
                    saved_dir = Path(pretrained_model_name_or_path)
                base_id = fields.get("base_model_name_or_path")
                if not base_id:
                    raise ValueError(
                        f"{pretrained_model_name_or_path} has no base_model_name_or_path to load."
                    )
            else:
                base_id = pretrained_model_name_or_path
            base = AutoModelForCausalLM.from_pretrained(base_id, **model_kwargs)
        if datastore is None:
            datastore = fields.get("datastore")
            if datastore is None:
                raise ValueError("datastore=None: pass datastore=<Datastore, folder or Hub repo id>.")
            if saved_dir is not None and not os.path.isabs(datastore) and (saved_dir / datastore).is_dir():
                datastore = saved_dir / datastore
        saved_settings = {key: fields[key] for key in KNNSettings.__dataclass_fields__ if key in fields}
        settings = KNNSettings(**{**saved_settings, **overrides})
        store = load_datastore(datastore, **(datastore_kwargs or {}))
        config = KNNLMConfig(
            base_model_name_or_path=getattr(base.config, "_name_or_path", None) or None,
            datastore=str(store.folder if isinstance(datastore, Datastore) else datastore),
            k=settings.k,
            lmbda=settings.lmbda,
            temperature=settings.temperature,
            recompute_dists=settings.recompute_dists,
            retomaton=retomaton if retomaton is not None else fields.get("retomaton"),
            gate=gate if gate is not None else fields.get("gate", False),
        )
        return cls(config, base, store, tokenizer=tokenizer)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, save_datastore: bool = False, **kwargs: Any
    ) -> None:
        """Write ``config.json`` (base model id, datastore reference, settings); no base weights.

        With ``save_datastore=True`` the datastore is copied into ``save_directory/datastore`` and
        referenced by that relative path, so the folder (or the Hub repo it is pushed to) is
        self-contained apart from the base model.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if save_datastore:
            self.datastore.save_pretrained(out / DATASTORE_SUBFOLDER)
            self.config.datastore = DATASTORE_SUBFOLDER
        self.config.save_pretrained(out)

    # ----------------------------------------------------------------- scoring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        with FFNInputCapture(self.model, self.datastore.config.hook_module) as capture:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = capture.hidden_states(out.logits.shape[0])[:, -out.logits.shape[1] :]
        lm_log_probs = torch.log_softmax(out.logits.float(), dim=-1)
        if attention_mask is None:
            scored = torch.ones(lm_log_probs.shape[:2], dtype=torch.bool, device=lm_log_probs.device)
        else:
            scored = attention_mask[:, -lm_log_probs.shape[1] :].bool()
        mixed = lm_log_probs.clone()
        settings = self._current_settings()
        if self.config.retomaton is not None:
            self._retomaton_mix(mixed, input_ids, hidden, lm_log_probs, scored, settings)
        elif self.config.gate:
            found, lmbda = GateSteps(load_gate(True, self.datastore), self.datastore, settings)(
                None, hidden[scored], lm_log_probs[scored]
            )
            mixed[scored] = mix_neighbours(found, lm_log_probs[scored], settings, lmbda)
        else:
            mixed[scored] = mix_with_datastore(self.datastore, hidden[scored], lm_log_probs[scored], settings)
        loss = None
        if labels is not None:
            shift_log_probs = mixed[:, :-1].reshape(-1, mixed.shape[-1])
            loss = F.nll_loss(shift_log_probs, labels[:, 1:].reshape(-1).to(mixed.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=mixed, past_key_values=out.past_key_values)

    def _retomaton_mix(self, mixed, input_ids, hidden, lm_log_probs, scored, settings) -> None:
        """Each row is one stream: position t follows the pointers of t - 1 through token t."""
        automaton = RetoMaton(self.datastore, self.config.retomaton, settings.k, settings.recompute_dists)
        for row in range(len(mixed)):
            automaton.reset()
            pos = torch.nonzero(scored[row]).flatten()
            tokens = input_ids[row, -mixed.shape[1] :][pos].tolist()
            found = stream_neighbours(automaton, hidden[row, pos], tokens)
            mixed[row, pos] = mix_neighbours(found, lm_log_probs[row, pos], settings)
        self.retrieval_stats = automaton.stats()

    @torch.no_grad()
    def generate(self, *args: Any, logits_processor: LogitsProcessorList | None = None, **kwargs: Any):
        """``base_model.generate`` with a [`KNNProcessor`] appended to ``logits_processor``."""
        settings = self._current_settings()
        # A processor is made for the settings of this call: a change since the last one is honoured.
        key = (dataclasses.astuple(settings), self.config.retomaton, self.config.gate)
        with self._processor_lock:
            if self._processor is None or self._processor_key != key:
                if self._processor is not None:
                    self._processor.remove()
                self._processor = KNNProcessor(
                    self.model,
                    self.datastore,
                    **dataclasses.asdict(settings),
                    retomaton=self.config.retomaton,
                    gate=self.config.gate or None,
                )
                self._processor_key = key
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(self._processor)
        return self.model.generate(*args, logits_processor=processors, **kwargs)
