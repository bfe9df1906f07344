"""Which module is "the last FFN" of a causal LM, and capture of its input.

kNN-LM keys are the input of the last transformer layer's feed-forward block, taken after that
layer's LayerNorm (Khandelwal et al. 2020, section 3). A forward pre-hook on the FFN module sees
exactly that tensor.
"""

from __future__ import annotations

import threading

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


def num_hidden_layers(model: nn.Module) -> int | None:
    """The number of decoder layers the model's (text) config declares, or None."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def _generic_ffn_path(model: nn.Module) -> str | None:
    """The last element of the longest ModuleList of decoder layers, then its FFN child."""
    expected = num_hidden_layers(model)
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

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> model, tokenizer = tiny_causal_lm()  # a random 2-layer GPT-2, GPT-2's tokenizer
    >>> from hf_knnlm import find_ffn_module
    >>> find_ffn_module(model)  # the last decoder layer's FFN: its input is a kNN-LM key
    'transformer.h.1.mlp'
    ```
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
    """Keeps the input of a module from its latest forward call, per thread.

    The captured tensor lives in thread-local storage: one model (and one capture, or several)
    can serve several threads at once, each reading the input of its own latest forward pass.
    Use as a context manager or call ``remove``; the hook holds no graph when the model runs
    under ``torch.no_grad()``.

    Args:
        model (`nn.Module`): the model to hook.
        hook_module (`str`, *optional*): module path; defaults to
            [`find_ffn_module`][hf_knnlm.find_ffn_module].
        stop_forward (`bool`, *optional*, defaults to `False`): raise ``StopForward`` right
            after capturing, in the thread that created the capture only. Building a datastore
            needs nothing past the last FFN's input, so this skips the last FFN, the final norm and
            the LM head (a large share of small models).
        expected_width (`int`, *optional*): refuse (ValueError naming ``hook_module``) a module whose
            input is not a float tensor of this width, e.g. an embedding or an FFN's second linear layer.

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> model, tokenizer = tiny_causal_lm()  # a random 2-layer GPT-2, GPT-2's tokenizer
    >>> import torch
    >>> from hf_knnlm import FFNInputCapture
    >>> ids = tokenizer("The cat sat on the mat", return_tensors="pt")
    >>> with FFNInputCapture(model) as capture, torch.no_grad():
    ...     logits = model(**ids).logits
    ...     print(capture.path, tuple(capture.captured.shape))  # [batch, positions, hidden]: a query each
    transformer.h.1.mlp (1, 6, 32)
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        hook_module: str | None = None,
        stop_forward: bool = False,
        expected_width: int | None = None,
    ) -> None:
        self.path = find_ffn_module(model, hook_module)
        self.module = model.get_submodule(self.path)
        self.stop_forward = stop_forward
        self.expected_width = expected_width
        self._owner = threading.get_ident()
        self._local = threading.local()
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        self._check(hidden)
        self._local.captured = hidden
        self._local.count = self.forward_count + 1
        if self.stop_forward and threading.get_ident() == self._owner:
            raise StopForward

    def _check(self, hidden: object) -> None:
        width = hidden.shape[-1] if isinstance(hidden, torch.Tensor) and hidden.dim() else None
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
            if self.expected_width is None or width == self.expected_width:
                return
        seen = (
            f"a {hidden.dtype} tensor of shape {list(hidden.shape)}"
            if isinstance(hidden, torch.Tensor)
            else type(hidden).__name__
        )
        want = f"[..., {self.expected_width}]" if self.expected_width else "float"
        raise ValueError(
            f"hook_module={self.path!r} receives {seen}; kNN-LM keys are the {want} input of the last "
            f"layer's feed-forward block (after its LayerNorm). Leave hook_module unset, or name that FFN "
            f"module (e.g. 'model.layers.11.mlp')."
        )

    @property
    def captured(self) -> torch.Tensor | None:
        """The input of this thread's latest forward call of the hooked module (None before any)."""
        return getattr(self._local, "captured", None)

    @property
    def forward_count(self) -> int:
        """How many forward calls of the hooked module this thread has made since the hook was added."""
        return getattr(self._local, "count", 0)

    def hidden_states(self, batch_size: int) -> torch.Tensor:
        """The captured input as ``[batch_size, seq_len, hidden]`` (some FFNs see it flattened)."""
        captured = self.captured
        if captured is None:
            raise RuntimeError(
                f"No input was captured at {self.path}: run the model forward before asking for the "
                f"kNN query (and don't remove the hook in between)."
            )
        rows = captured.shape[0] if captured.dim() == 3 else None
        if (rows is not None and rows != batch_size) or captured[..., 0].numel() % batch_size:
            raise ValueError(
                f"the last forward pass at {self.path} had input of shape {list(captured.shape)}, which "
                f"does not hold {batch_size} rows: the scores do not come from that forward pass."
            )
        return captured.reshape(batch_size, -1, captured.shape[-1])

    def remove(self) -> None:
        self._handle.remove()
        self._local = threading.local()

    def __enter__(self) -> FFNInputCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
