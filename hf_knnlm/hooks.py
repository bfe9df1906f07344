"""Which module is "the last FFN" of a causal LM, and capture of its input.

kNN-LM keys are the input of the last transformer layer's feed-forward block, taken after that
layer's LayerNorm (Khandelwal et al. 2020, section 3). A forward pre-hook on the FFN module sees
exactly that tensor.
"""

from __future__ import annotations

import torch
from torch import nn

# model_type -> (decoder layer list, FFN module inside one layer). Families not listed here are
# handled by `_generic_ffn_path`; add a row when a family names things differently.
FFN_MODULES: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h", "mlp"),
    "gpt_bigcode": ("transformer.h", "mlp"),
    "gptj": ("transformer.h", "mlp"),
    "bloom": ("transformer.h", "mlp"),
    "falcon": ("transformer.h", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "mlp"),
    "opt": ("model.decoder.layers", "fc1"),
    "llama": ("model.layers", "mlp"),
    "mistral": ("model.layers", "mlp"),
    "mixtral": ("model.layers", "mlp"),
    "qwen2": ("model.layers", "mlp"),
    "qwen3": ("model.layers", "mlp"),
    "gemma": ("model.layers", "mlp"),
    "gemma2": ("model.layers", "mlp"),
    "phi": ("model.layers", "mlp"),
    "phi3": ("model.layers", "mlp"),
    "olmo": ("model.layers", "mlp"),
    "granite": ("model.layers", "mlp"),
    "starcoder2": ("model.layers", "mlp"),
}

# Child names that hold a layer's feed-forward block across the families transformers ships.
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "fc1", "block_sparse_moe")


def _module_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def _generic_ffn_path(model: nn.Module) -> str | None:
    """The last element of the longest ModuleList of decoder layers, then its FFN child."""
    expected = _num_layers(model)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (expected is None or len(mod) == expected)
    ]
    for name, layers in sorted(candidates, key=lambda item: -len(item[1])):
        for child in _FFN_NAMES:
            if hasattr(layers[-1], child):
                return f"{name}.{len(layers) - 1}.{child}"
    return None


def find_ffn_module(model: nn.Module, hook_module: str | None = None) -> str:
    """Return the dotted path of the last decoder layer's FFN module.

    Args:
        model (`nn.Module`): a causal LM (any ``PreTrainedModel``; wrappers such as peft work
            through the generic fallback).
        hook_module (`str`, *optional*): an explicit path, e.g. ``"model.layers.29.mlp"``.
    """
    if hook_module is not None:
        if _module_or_none(model, hook_module) is None:
            raise ValueError(
                f"hook_module={hook_module!r} is not a submodule of {type(model).__name__}; "
                f"pick one from `[n for n, _ in model.named_modules()]`."
            )
        return hook_module
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FFN_MODULES:
        layers_path, ffn = FFN_MODULES[model_type]
        layers = _module_or_none(model, layers_path)
        if isinstance(layers, nn.ModuleList) and hasattr(layers[-1], ffn):
            return f"{layers_path}.{len(layers) - 1}.{ffn}"
    path = _generic_ffn_path(model)
    if path is None:
        raise ValueError(
            f"Could not find the last feed-forward module of {type(model).__name__} "
            f"(model_type={model_type!r}). Pass hook_module='<dotted path>' naming the module whose input "
            f"is the post-LayerNorm hidden state of the last layer, e.g. 'model.layers.11.mlp'."
        )
    return path


class StopForward(Exception):
    """Raised by a capture with ``stop_forward=True`` once the key is in hand."""


class FFNInputCapture:
    """Keeps the input of a module from its latest forward call.

    Use as a context manager or call :meth:`remove`; the hook holds no graph when the model runs
    under ``torch.no_grad()``.

    Args:
        model (`nn.Module`): the model to hook.
        hook_module (`str`, *optional*): module path; defaults to :func:`find_ffn_module`.
        stop_forward (`bool`, *optional*, defaults to `False`): raise :class:`StopForward` right
            after capturing. Building a datastore needs nothing past the last FFN's input, so this
            skips the last FFN, the final norm and the LM head (a large share of small models).
    """

    def __init__(self, model: nn.Module, hook_module: str | None = None, stop_forward: bool = False) -> None:
        self.path = find_ffn_module(model, hook_module)
        self.module = model.get_submodule(self.path)
        self.captured: torch.Tensor | None = None
        self.stop_forward = stop_forward
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.captured = hidden
        if self.stop_forward:
            raise StopForward

    def hidden_states(self, batch_size: int) -> torch.Tensor:
        """The captured input as ``[batch_size, seq_len, hidden]`` (some FFNs see it flattened)."""
        if self.captured is None:
            raise RuntimeError(
                f"No input was captured at {self.path}: run the model forward before asking for the "
                f"kNN query (and don't remove the hook in between)."
            )
        return self.captured.reshape(batch_size, -1, self.captured.shape[-1])

    def remove(self) -> None:
        self._handle.remove()
        self.captured = None

    def __enter__(self) -> FFNInputCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
