"""Retrieval inside attention through transformers' attention interface, without a modeling file.

:class:`RetrievalContext` registers one attention function per base implementation
(``hf_knnlm_retrieval_sdpa``, ``..._eager``) with ``AttentionInterface`` (and the base's mask
function with ``AttentionMaskInterface``, so masks are built exactly as for the base), switches the
model to it with ``set_attn_implementation`` while active, and adds two hooks:

* a forward pre-hook on every attention module keeps its input (the hidden states after the layer
  norm), which is what the memories store and what the query is projected from;
* a forward pre-hook on the base model gives the tokens their positions in the whole input
  (``offset`` + position in the call), so a window deep in a document, or ``generate`` on its last
  window, runs at the positions full attention would use.

A layer without a retrieval state, or whose memory is empty, calls the base implementation
unchanged, so an empty memory is the base model.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapters import AttentionAdapter

PREFIX = "hf_knnlm_retrieval_"
STATE = "_hf_knnlm_retrieval"  # the attribute of an attention module that holds its layer state


def base_function(module: nn.Module, implementation: str) -> Callable:
    """The attention function ``implementation`` names for ``module`` (eager: its modeling file's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    return (
        ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager) if implementation != "eager" else eager
    )


def _retrieval_attention(module, query, key, value, attention_mask, **kwargs):
    context, state = getattr(module, STATE)
    base = base_function(module, context.base_implementation)
    if state is None or not state.ready():
        return base(module, query, key, value, attention_mask, **kwargs)
    return state.attend(module, query, key, value, attention_mask, base=base, **kwargs)


def register(base_implementation: str) -> str:
    """Register the retrieval attention for models whose implementation is ``base_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if base_implementation.startswith(PREFIX):
        raise ValueError(
            "this model already has retrieval attention installed; leave the other context first."
        )
    name = PREFIX + base_implementation
    AttentionInterface.register(name, _retrieval_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_implementation])
    return name


def additive_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The local mask as additive scores (0 or the dtype's min); None: causal, bottom-right aligned."""
    low = torch.finfo(dtype).min
    if mask is None:
        rows = torch.arange(q_len)[:, None] + (kv_len - q_len)
        return torch.where(rows >= torch.arange(kv_len)[None, :], 0.0, low).to(dtype)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, low).to(dtype)
    return mask.to(dtype)


class LayerState(ABC):
    """One attention layer's memory: keeps the layer's inputs of the last call and commits them.

    Subclasses define ``ready``, ``attend``, ``_store`` and ``clear``.
    """

    def __init__(self, context: RetrievalContext, module: nn.Module) -> None:
        self.context, self.module = context, module
        self.hidden: torch.Tensor | None = None  # (n, hidden) inputs of the last collected call
        self.positions: torch.Tensor | None = None
        self.committed = 0  # every position below this one is in the memory

    def keep(self, hidden: torch.Tensor) -> None:
        if self.context.collect:
            self.hidden, self.positions = hidden[0].detach(), self.context.positions

    def commit(self, until: int) -> None:
        """Store the kept inputs at positions [committed, until) (each from the last call that ran it)."""
        if until <= self.committed:
            return
        if self.hidden is None or self.positions is None:
            raise RuntimeError("nothing to commit: run the model on the tokens first.")
        rows = (self.positions >= self.committed) & (self.positions < until)
        if int(rows.sum()) != until - self.committed:
            raise RuntimeError(f"positions [{self.committed}, {until}) were not all in the last call.")
        with torch.no_grad():
            hidden = self.hidden[rows]
            _, keys, values = self.context.adapter.project(self.module, hidden)
            self._store(hidden, keys, values, self.positions[rows])
        self.committed = until

    def reset(self) -> None:
        self.hidden = self.positions = None
        self.committed = 0
        self.clear()

    def queries(self) -> torch.Tensor:
        """Un-rotated queries (n, H, d) of the current call."""
        return self.context.adapter.queries(self.module, self.hidden_now)

    # hooks set ``hidden_now`` on every call, ``hidden`` only while collecting
    hidden_now: torch.Tensor

    @abstractmethod
    def ready(self) -> bool: ...

    @abstractmethod
    def attend(self, module, query, key, value, attention_mask, *, base, **kwargs): ...

    @abstractmethod
    def _store(self, hidden, keys, values, positions) -> None: ...

    @abstractmethod
    def clear(self) -> None: ...


class RetrievalContext:
    """Installs retrieval attention on ``model`` while active (``with context:``); see the module doc.

    Args:
        model (`PreTrainedModel`): A causal LM of the Llama family or GPT-2.
        make_state (`Callable`): ``(context, module) -> LayerState | None`` for every attention module.
        foldable (`bool`): Whether the method folds ``W_k`` into the query (see :class:`AttentionAdapter`).
    """

    def __init__(
        self, model: nn.Module, make_state: Callable[..., LayerState | None], *, foldable: bool
    ) -> None:
        self.model = model
        self.adapter = AttentionAdapter(model, foldable=foldable)
        self.states = {m.layer_idx: s for m in self.adapter.modules if (s := make_state(self, m)) is not None}
        self.offset, self.collect = 0, True
        self.positions: torch.Tensor | None = None
        self.base_implementation = model.config._attn_implementation
        self._handles: list[Any] = []
        self._depth = 0

    def __enter__(self) -> RetrievalContext:
        if self._depth == 0:
            name = register(self.base_implementation)
            for module in self.adapter.modules:
                setattr(module, STATE, (self, self.states.get(module.layer_idx)))
                self._handles.append(module.register_forward_pre_hook(self._keep_input, with_kwargs=True))
            self._handles.append(
                self.model.base_model.register_forward_pre_hook(self._positions, with_kwargs=True)
            )
            self.model.set_attn_implementation(name)
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.model.set_attn_implementation(self.base_implementation)
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for module in self.adapter.modules:
                if hasattr(module, STATE):
                    delattr(module, STATE)

    def _keep_input(self, module, args, kwargs):
        state = getattr(module, STATE)[1]
        if state is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            state.hidden_now = hidden[0]
            state.keep(hidden)

    def _positions(self, module, args, kwargs):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        n = inputs.shape[1]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + n, device=inputs.device)[None]
        position_ids = position_ids + self.offset
        self.positions = position_ids[0].cpu()
        kwargs["position_ids"] = position_ids
        return args, kwargs

    def commit(self, until: int) -> None:
        """Every retrieving layer stores the inputs at positions below ``until``."""
        for state in self.states.values():
            state.commit(until)

    def reset(self) -> None:
        """Forget every memory (a document boundary)."""
        for state in self.states.values():
            state.reset()
        self.offset = 0


__all__ = ["LayerState", "RetrievalContext", "additive_mask", "base_function", "register"]
