"""The KV cache under the name the installed transformers uses (``cache`` since 5.x, ``past_key_values``
before): read from a model output, passed back to a model, put into an output of ours."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned, without touching a deprecated attribute."""
    for name in ("cache", "past_key_values"):
        if name in getattr(output, "keys", lambda: ())():
            return output[name]
    return None


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """Pass ``cache`` back to ``model`` under the name its ``forward`` takes."""
    return (
        {"cache": cache}
        if "cache" in inspect.signature(model.forward).parameters
        else {"past_key_values": cache}
    )


def output_cache(output_class: type, cache: Any) -> dict[str, Any]:
    """``{field: cache}`` for a ``ModelOutput`` class, under the field name it declares."""
    fields = {f.name for f in dataclasses.fields(output_class)}
    return {"cache" if "cache" in fields else "past_key_values": cache}


__all__ = ["cache_kwargs", "cache_of", "output_cache"]
