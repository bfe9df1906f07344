"""Is a model (and tokenizer) the kind that built a datastore? Checked before any search."""

from __future__ import annotations

import torch

from ..lm.hooks import find_ffn_module, num_hidden_layers
from ..utils.fingerprints import tokenizer_fingerprint
from .config import DatastoreConfig


def model_vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_compatible(cfg: DatastoreConfig, model: torch.nn.Module, tokenizer=None) -> None:
    """Raise ValueError naming both values and the fix when ``model`` cannot use the store."""
    model_type = model.config.model_type
    if model_type != cfg.model_type:
        raise ValueError(
            f"model_type mismatch: the datastore was built with a {cfg.model_type!r} model, "
            f"this model is {model_type!r}. Use the base model {cfg.base_model or cfg.model_type!r} "
            f"(or a fine-tune of it) or build a datastore with this model."
        )
    width = model.config.get_text_config().hidden_size
    if width != cfg.hidden_size:
        raise ValueError(
            f"hidden size mismatch: datastore keys have dimension {cfg.hidden_size}, "
            f"the model's hidden size is {width}. Build a datastore with this model."
        )
    layers = num_hidden_layers(model)
    if cfg.num_hidden_layers is not None and layers is not None and layers != cfg.num_hidden_layers:
        raise ValueError(
            f"layer count mismatch: the datastore keys come from a model with {cfg.num_hidden_layers} layers "
            f"(the input of {cfg.hook_module!r}), this model has {layers} layers, so the same module path "
            f"would hook another layer. Use {cfg.base_model or 'the model that built it'!r} or build a "
            f"datastore with this model."
        )
    if hasattr(model, "get_submodule"):
        find_ffn_module(model, cfg.hook_module)  # raises, naming the path, if the model lacks it
    vocab = model_vocab_size(model)
    if vocab != cfg.vocab_size:
        raise ValueError(
            f"vocab size mismatch: datastore values index a vocabulary of {cfg.vocab_size}, "
            f"the model has {vocab}. Use the model and tokenizer the datastore was built with "
            f"({cfg.base_model!r})."
        )
    if tokenizer is not None and cfg.tokenizer_fingerprint:
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != cfg.tokenizer_fingerprint:
            raise ValueError(
                f"tokenizer mismatch: fingerprint {fingerprint[:19]}... differs from the datastore's "
                f"{cfg.tokenizer_fingerprint[:19]}...; token ids would mean different words. Load the "
                f"tokenizer of {cfg.base_model!r}."
            )


# ----------------------------------------------------------------- re-indexing
