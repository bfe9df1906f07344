"""KNNLMForCausalLM: a causal LM wrapped so that its outputs are kNN-LM log-probabilities."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LogitsProcessorList, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..datastore.datastore import Datastore
from ..lm.caches import cache_of, output_cache
from ..lm.hooks import FFNInputCapture
from ..lm.loading import gguf_file_in
from ..utils.checks import check_has_tokens
from ..utils.files import atomic_path, folder_lock
from ..utils.hub import PUSH_OPTIONS, push_folder
from .configuration_knnlm import KNNLMConfig
from .logits_process import KNNProcessor
from .mixture import mix
from .policies import RetrievalStats, Step, search_policy
from .settings import KNNSettings

WRAPPER_CONFIG_NAME = "config.json"
DATASTORE_SUBFOLDER = "datastore"


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


def _saved_datastore(
    fields: dict[str, Any], source: str | os.PathLike, hub_kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Where a saved wrapper's datastore is: a folder or repo id, and the ``from_pretrained`` kwargs.

    ``datastore=None`` with a ``datastore_subfolder`` means inside the wrapper's own folder or Hub
    repository (at the same revision). Configs written before ``datastore_subfolder`` existed name
    that folder in ``datastore`` as a relative path.
    """
    name, subfolder = fields.get("datastore"), fields.get("datastore_subfolder")
    if name is None and subfolder is None:
        raise ValueError(f"{source} names no datastore: pass datastore=<Datastore, folder or Hub repo id>.")
    if name is None or (subfolder is None and _is_inside(name, source, Path(source).is_dir())):
        name, subfolder = str(source), subfolder or name
    if Path(name).is_dir():
        return str(Path(name).resolve()), {"subfolder": subfolder}
    kwargs = dict(hub_kwargs) if name == str(source) else {}  # same repo: same revision and token
    return name, {**kwargs, "subfolder": subfolder}


def _is_inside(name: str, source: str | os.PathLike, local: bool) -> bool:
    """Whether an old-style relative ``datastore`` entry points inside the wrapper's folder or repo."""
    if os.path.isabs(name):
        return False
    return (Path(source) / name).is_dir() if local else name == DATASTORE_SUBFOLDER


def _load_base(
    source: str | os.PathLike | PreTrainedModel, model_kwargs: dict[str, Any]
) -> tuple[PreTrainedModel, dict[str, Any] | None, dict[str, Any]]:
    """The base model, the saved wrapper config's fields (None for a plain model) and the Hub kwargs."""
    if isinstance(source, PreTrainedModel):
        return source, None, {}
    hub_kwargs = {key: model_kwargs[key] for key in ("revision", "token", "cache_dir") if key in model_kwargs}
    saved = _knnlm_config_dict(source, hub_kwargs)
    if saved is None:
        if "gguf_file" not in model_kwargs and (gguf_file := gguf_file_in(source)):
            model_kwargs["gguf_file"] = gguf_file  # a GGUF package folder; recorded in the config
        base = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        base.config._name_or_path = base.config._name_or_path or str(source)  # what to reload it from
        return base, None, hub_kwargs
    # A saved wrapper: ``revision`` is the wrapper's (and its datastore's), not the base model's.
    model_kwargs.pop("revision", None)
    saved = {key: v for key, v in saved.items() if key not in ("model_type", "transformers_version")}
    base_id = saved.get("base_model_name_or_path")
    if not base_id:
        raise ValueError(f"{source} has no base_model_name_or_path to load.")
    if saved.get("base_model_gguf_file") and "gguf_file" not in model_kwargs:
        model_kwargs["gguf_file"] = saved["base_model_gguf_file"]
    return AutoModelForCausalLM.from_pretrained(base_id, **model_kwargs), saved, hub_kwargs


def _load_store(
    datastore: Datastore | str | os.PathLike | None,
    saved: dict[str, Any] | None,
    source,
    hub_kwargs: dict[str, Any],
    datastore_kwargs: dict[str, Any] | None,
) -> tuple[Datastore, tuple[str, str | None]]:
    """The datastore and how the config refers to it: ``(folder or repo id, subfolder)``."""
    if isinstance(datastore, Datastore):
        return datastore, (str(datastore.folder.resolve()), None)
    if datastore is not None:
        name, store_kwargs = str(datastore), {}
        if Path(name).is_dir():  # a relative folder stays valid wherever the wrapper is saved
            name = str(Path(name).resolve())
    elif saved is not None:
        name, store_kwargs = _saved_datastore(saved, source, hub_kwargs)
    else:
        raise ValueError("datastore=None: pass datastore=<Datastore, folder or Hub repo id>.")
    store = Datastore.from_pretrained(name, **{**store_kwargs, **(datastore_kwargs or {})})
    return store, (name, store_kwargs.get("subfolder"))


def _causal_lm_loss(
    log_probs: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``) on log-probabilities that are already normalised.

    Position t predicts ``labels[t + 1]`` (or ``shift_labels[t]``); with ``num_items_in_batch`` (what
    ``Trainer`` passes under gradient accumulation) the sum is divided by it instead of taking the mean.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != log_probs.shape[:-1]:
        raise ValueError(
            f"labels give {tuple(shift_labels.shape)} targets for logits of {tuple(log_probs.shape[:-1])} "
            f"positions; with logits_to_keep, pass shift_labels for the kept positions."
        )
    reduction = "sum" if num_items_in_batch is not None else "mean"
    flat = log_probs.reshape(-1, log_probs.shape[-1]).float()
    targets = shift_labels.reshape(-1).to(flat.device)
    loss = F.nll_loss(flat, targets, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class KNNLMForCausalLM(PreTrainedModel):
    r"""
    A causal LM whose next-token distribution is the kNN-LM mixture
    ``log(lmbda * p_kNN + (1 - lmbda) * p_LM)``.

    ``forward`` returns a
    [`CausalLMOutputWithPast`](https://huggingface.co/docs/transformers/main/en/main_classes/output#transformers.modeling_outputs.CausalLMOutputWithPast)
    whose ``logits`` are the mixed log-probabilities and whose ``loss`` is the kNN-LM negative
    log-likelihood of ``labels`` (shifted inside, ``-100`` ignored, as in transformers). ``generate``
    mixes automatically through a [`KNNProcessor`][hf_knnlm.KNNProcessor]. Every other attribute is
    read from the base model. ``save_pretrained`` writes only this wrapper's ``config.json`` (and, if
    asked, the datastore), never base weights.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import KNNLMForCausalLM
    >>> base, tokenizer, store = tiny_datastore("store")
    >>> model = KNNLMForCausalLM.from_pretrained(base, datastore=store, k=4, lmbda=0.25)
    >>> inputs = tokenizer("The cat sat", return_tensors="pt")
    >>> out = model(**inputs, labels=inputs["input_ids"])
    >>> out.logits.shape  # log-probabilities of the mixture, one row per position
    torch.Size([1, 3, 50257])
    >>> model.save_pretrained("knnlm", save_datastore=True)  # config.json + datastore/, no base weights
    >>> sorted(p.name for p in Path("knnlm").iterdir())
    ['config.json', 'datastore']

    A saved wrapper, or a base model with a datastore, also loads by Hub id:
    ``KNNLMForCausalLM.from_pretrained("gpt2", datastore="org/wikitext-gpt2-knn", lmbda=0.25)``.
    ```
    """

    config_class = KNNLMConfig
    base_model_prefix = "model"
    _supports_cache_class = True

    def __init__(self, config: KNNLMConfig, model: PreTrainedModel, datastore: Datastore, tokenizer=None):
        super().__init__(config)
        self.model = model
        self.datastore = datastore
        datastore.check_compatible(model, tokenizer)
        self.retrieval_stats: RetrievalStats | None = None
        self.post_init()

    @property
    def settings(self) -> KNNSettings:
        """The kNN-LM settings, ``config.settings`` itself (validated on every assignment): a change
        through either is honoured by the next ``forward`` or ``generate``."""
        return self.config.settings

    @settings.setter
    def settings(self, value: KNNSettings) -> None:
        self.config.settings = KNNSettings.merge(value)

    def _current_settings(self) -> KNNSettings:
        """The settings as of this call, resolved for the store (k clamped, its temperature if none)."""
        return self.config.settings.resolve(self.datastore)

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
        settings: KNNSettings | None = None,
        k: int | None = None,
        lmbda: float | None = None,
        temperature: float | None = None,
        recompute_dists: bool | None = None,
        retomaton: int | None = None,
        gate: bool | None = None,
        datastore_kwargs: dict[str, Any] | None = None,
        tokenizer=None,
        **model_kwargs: Any,
    ) -> KNNLMForCausalLM:
        """Wrap a base model (instance, Hub id or path) or load a saved wrapper.

        Args:
            pretrained_model_name_or_path: a `PreTrainedModel`, a base model id/path (loaded with
                `AutoModelForCausalLM.from_pretrained(..., **model_kwargs)`, e.g. ``gguf_file=``), or
                a folder / repo saved by [`save_pretrained`][hf_knnlm.KNNLMForCausalLM.save_pretrained].
            datastore: a `Datastore`, a folder or a Hub repo id; defaults to the saved one.
            settings (`KNNSettings`, *optional*): the kNN-LM settings (default:
                the saved ones, else ``KNNSettings()``); ``k``, ``lmbda``, ``temperature``,
                ``recompute_dists``, ``retomaton`` and ``gate`` override single fields.
            datastore_kwargs: passed to `Datastore.from_pretrained` (revision, token, ...).
            tokenizer: the tokenizer used with the model, checked against the datastore's fingerprint.
        """
        base, saved, hub_kwargs = _load_base(pretrained_model_name_or_path, model_kwargs)
        store, reference = _load_store(
            datastore, saved, pretrained_model_name_or_path, hub_kwargs, datastore_kwargs
        )
        if settings is None and saved is not None:
            settings = KNNLMConfig(**saved).settings
        overrides = dict(k=k, lmbda=lmbda, temperature=temperature, recompute_dists=recompute_dists)
        settings = KNNSettings.merge(settings, **overrides, retomaton=retomaton, gate=gate)
        config = KNNLMConfig(
            base_model_name_or_path=getattr(base.config, "_name_or_path", None) or None,
            base_model_gguf_file=model_kwargs.get("gguf_file") or (saved or {}).get("base_model_gguf_file"),
            datastore=reference[0],
            datastore_subfolder=reference[1],
            settings=settings,
        )
        return cls(config, base, store, tokenizer=tokenizer)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        save_datastore: bool = False,
        max_shard_size: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json`` (base model id, datastore reference, settings); never base weights.

        With ``save_datastore=True`` the datastore is saved into ``save_directory/datastore`` (re-sharded
        if ``max_shard_size`` is given) and referenced as that subfolder, so the folder, or the Hub repo
        it is pushed to, is self-contained apart from the base model. Otherwise the config references
        the datastore where it was loaded from (an absolute folder or a Hub repo id), so it stays valid
        wherever it is saved. Other keyword arguments (what ``Trainer`` passes) are ignored.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)  # saving never changes where this wrapper's datastore is
        if save_datastore:
            self.datastore.save_pretrained(out / DATASTORE_SUBFOLDER, max_shard_size=max_shard_size)
            config.datastore, config.datastore_subfolder = None, DATASTORE_SUBFOLDER
        with folder_lock(out), atomic_path(out / "config.json") as tmp:  # a failed write keeps the old one
            config.to_json_file(tmp)

    def push_to_hub(
        self, repo_id: str, *, save_datastore: bool = False, commit_message: str | None = None, **kwargs: Any
    ) -> Any:
        """Save into a temporary folder ([`save_pretrained`][hf_knnlm.KNNLMForCausalLM.save_pretrained]) and
        upload it to ``repo_id`` in one commit.

        Args:
            repo_id (`str`): the Hub model repository (created if missing).
            save_datastore (`bool`, defaults to `False`): upload the datastore too, in ``datastore/``.
            commit_message (`str`, *optional*): defaults to "Upload kNN-LM model".
            kwargs: ``revision``, ``private``, ``token``, ``create_pr``, ``commit_description`` go to the
                upload; ``max_shard_size`` to [`save_pretrained`][hf_knnlm.KNNLMForCausalLM.save_pretrained].
        """
        hub_kwargs = {name: kwargs.pop(name) for name in PUSH_OPTIONS if name in kwargs}
        return push_folder(
            functools.partial(self.save_pretrained, save_datastore=save_datastore, **kwargs),
            repo_id,
            commit_message=commit_message or "Upload kNN-LM model",
            **hub_kwargs,
        )

    # ----------------------------------------------------------------- scoring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the base model and mix p_kNN into every kept position, as transformers' causal LMs do.

        Args:
            input_ids, attention_mask, kwargs: passed to the base model (``past_key_values``, ...).
            labels (`torch.LongTensor`, *optional*): position t is scored against ``labels[t + 1]``;
                ``-100`` is ignored.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0): keep the last N positions (0: all)
                or the given sequence indices; only those are searched in the datastore.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this
                instead of averaging (``Trainer`` passes it under gradient accumulation).
            shift_labels (`torch.LongTensor`, *optional*): targets already aligned with the kept positions.

        Returns:
            `CausalLMOutputWithPast` whose ``logits`` are the mixed log-probabilities.
        """
        check_has_tokens(input_ids)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            kwargs["logits_to_keep"] = logits_to_keep  # base models without it are called as before
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # The hook is removed when the call ends: nothing stays on the base model holding activations.
        with FFNInputCapture(self.model, self.datastore.config.hook_module) as capture:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = capture.hidden_states(out.logits.shape[0])
        ran = hidden.shape[1]  # positions this call ran (fewer than the mask with past_key_values)
        hidden = hidden[:, kept]
        lm_log_probs = torch.log_softmax(out.logits.float(), dim=-1)
        if hidden.shape[1] != lm_log_probs.shape[1]:
            raise ValueError(
                f"the base model returned logits for {lm_log_probs.shape[1]} positions but its last FFN saw "
                f"{hidden.shape[1]} kept ones; does it support logits_to_keep={logits_to_keep!r}?"
            )
        if attention_mask is None:
            scored = torch.ones(lm_log_probs.shape[:2], dtype=torch.bool, device=lm_log_probs.device)
        else:
            scored = attention_mask[:, -ran:][:, kept].bool()
        mixed = self._mix(lm_log_probs, hidden, input_ids[:, -ran:][:, kept], scored)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = _causal_lm_loss(mixed, labels, num_items_in_batch, shift_labels)
        return CausalLMOutputWithPast(
            loss=loss, logits=mixed, **output_cache(CausalLMOutputWithPast, cache_of(out))
        )

    def _mix(self, lm_log_probs, hidden, tokens, scored) -> torch.Tensor:
        """The kNN-LM log-probs of the scored positions; the others keep the LM's."""
        settings = self._current_settings()
        policy = search_policy(self.datastore, settings)  # a store's gate is read from disk once
        mixed = lm_log_probs.clone()
        if policy.follows_tokens:  # each row is one stream: position t follows t - 1 through token t
            # A sharded store: one collective round per position, and ranks' batches have different
            # positions (masks); a rank done with its rows serves the others' until all are.
            with self.datastore.serving():
                for row in range(len(mixed)):
                    policy.reset()
                    pos = torch.nonzero(scored[row]).flatten()
                    found, _ = policy(Step(hidden[row, pos], tokens=tokens[row, pos].tolist()))
                    mixed[row, pos] = mix(found, lm_log_probs[row, pos], settings)
        else:
            found, lmbda = policy(Step(hidden[scored], lm_log_probs=lm_log_probs[scored]))
            mixed[scored] = mix(found, lm_log_probs[scored], settings, lmbda)
        self.retrieval_stats = policy.stats
        return mixed

    @torch.no_grad()
    def generate(self, *args: Any, logits_processor: LogitsProcessorList | None = None, **kwargs: Any):
        """``base_model.generate`` with a [`KNNProcessor`][hf_knnlm.KNNProcessor] for the current settings
        appended to ``logits_processor``; its hook comes off the base model when generation returns."""
        # A processor per call: it sees this call's settings, and another thread's generate has its own.
        processor = KNNProcessor(self.model, self.datastore, settings=self._current_settings())
        with processor:
            processors = LogitsProcessorList(logits_processor or [])
            processors.append(processor)
            return self.model.generate(*args, logits_processor=processors, **kwargs)
