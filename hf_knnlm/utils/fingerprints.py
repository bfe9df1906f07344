"""Fingerprints that tell whether a tokenizer or an encoder is the one that made stored data.

A datastore's values are token ids and a document index's vectors come from one encoder: a
tokenizer with the same vocabulary size but other ids, or an encoder with the same width but other
weights, would be accepted by every shape check and give wrong results silently.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

_ENCODER_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    return "sha256:" + hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def encoder_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's weights (names, dtypes, shapes, bytes), cached until a tensor changes."""
    tensors = list(module.state_dict().items())
    key = tuple((name, t.data_ptr(), t._version) for name, t in tensors)
    cached = _ENCODER_FINGERPRINTS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{list(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    fingerprint = "sha256:" + digest.hexdigest()
    _ENCODER_FINGERPRINTS[module] = (key, fingerprint)
    return fingerprint
