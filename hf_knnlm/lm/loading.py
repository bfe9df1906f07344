"""Loading a model and tokenizer by Hub id or local path, GGUF checkpoints included."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..utils.files import FolderInUseError
from . import gguf_cache


def _looks_like_path(value: str | os.PathLike) -> bool:
    text = str(value)
    return isinstance(value, os.PathLike) or text.startswith((".", "/", "~")) or text.count("/") > 1


_DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` the way the CLI and the demo need them.

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> model, tokenizer = tiny_causal_lm()  # a random 2-layer GPT-2, GPT-2's tokenizer
    >>> from hf_knnlm.lm import load_model_and_tokenizer
    >>> model.save_pretrained("tiny-lm"), tokenizer.save_pretrained("tiny-lm")  # or a Hub id
    (None, ...)
    >>> model, tokenizer = load_model_and_tokenizer("tiny-lm")
    >>> type(model).__name__, model.training  # ready to score: in eval mode
    ('GPT2LMHeadModel', False)
    ```
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}.")
    for what, value in (("model", name_or_path), ("tokenizer", tokenizer)):
        if value is not None and _looks_like_path(value) and not Path(value).expanduser().exists():
            raise FileNotFoundError(
                f"{what} {str(value)!r} is not an existing folder (and a path cannot be a Hub id); "
                f"check the path, or pass a Hub model id such as 'gpt2'."
            )
    gguf_path = gguf_cache.local_gguf_path(name_or_path, gguf_file)
    if gguf_path is not None:
        model, tok = _load_gguf(name_or_path, gguf_path, tokenizer, dtype)
    else:
        kwargs = {"revision": revision, **({"gguf_file": gguf_file} if gguf_file else {})}
        tok_kwargs = kwargs if tokenizer is None else {}
        tok = AutoTokenizer.from_pretrained(tokenizer or name_or_path, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype], **kwargs)
    if device:
        model.to(device)
    return model.eval(), tok


def _load_gguf(folder: str | os.PathLike, gguf_path: Path, tokenizer: str | None, dtype: str):
    """A local GGUF checkpoint, from its de-quantized copy when there is one (written on first load).

    The model keeps the GGUF folder as its ``name_or_path``: that is what a datastore records as its
    base model and what a saved wrapper reloads from.
    """
    cache = gguf_cache.cache_folder(gguf_path, dtype)
    copy = gguf_cache.cached_copy(cache)
    source, kwargs = (copy, {}) if copy else (folder, {"gguf_file": gguf_path.name})
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    elif copy is not None and gguf_cache.has_tokenizer(copy):
        tok = AutoTokenizer.from_pretrained(copy)
    else:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], **kwargs)
    if cache is not None and copy is None:
        try:
            gguf_cache.write_copy(cache, gguf_path, model, tok if tokenizer is None else None)
        except (FolderInUseError, OSError):
            pass  # another process is writing the same copy, or the cache is not writable: load as is
    model.config._name_or_path = str(folder)
    return model, tok
