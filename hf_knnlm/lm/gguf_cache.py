"""A de-quantized safetensors copy of a GGUF checkpoint, written once and reused by every later load.

transformers de-quantizes a GGUF file into torch tensors on every load, and builds its tokenizer
from the GGUF vocabulary: SmolLM2-135M-Instruct takes about 22 s for the model and 6 s for the
tokenizer on a 2-core CPU, every time a CLI verb starts. The same weights saved as safetensors
load in well under a second and give the same logits. The copy is keyed by the sha256 of the GGUF
file and the dtype, lives under ``$HF_KNNLM_CACHE`` (default ``$HF_HOME/hf_knnlm``) in
``gguf/<sha256>-<dtype>``, and is written through ``atomic_folder``, so a killed write leaves no
half copy. ``HF_KNNLM_GGUF_CACHE=0`` turns it off.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from huggingface_hub import constants
from safetensors.torch import save_model

from ..utils.files import sha256_file, write_folder

_DONE = "hf_knnlm_gguf_cache.json"
_FORMAT = 1


def gguf_cache_root() -> Path | None:
    """The folder the copies live in, or ``None`` when ``HF_KNNLM_GGUF_CACHE=0`` turns the cache off."""
    if os.environ.get("HF_KNNLM_GGUF_CACHE", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    default = Path(constants.HF_HOME) / "hf_knnlm"
    return Path(os.environ.get("HF_KNNLM_CACHE", default)).expanduser() / "gguf"


def local_gguf_path(name_or_path: str | os.PathLike, gguf_file: str | None) -> Path | None:
    """The GGUF file on disk when ``name_or_path`` is a local folder that holds ``gguf_file``."""
    if not gguf_file:
        return None
    path = Path(name_or_path).expanduser() / gguf_file
    return path if path.is_file() else None


def cache_folder(gguf_path: Path, dtype: str) -> Path | None:
    """Where the copy of ``gguf_path`` in ``dtype`` is (or would be) kept; ``None`` with the cache off."""
    root = gguf_cache_root()
    return None if root is None else root / f"{sha256_file(gguf_path)}-{dtype}"


def cached_copy(folder: Path | None) -> Path | None:
    """``folder`` if it holds a complete copy (its marker file is written last), else ``None``."""
    if folder is None or not (folder / _DONE).is_file():
        return None
    return folder


def has_tokenizer(folder: Path) -> bool:
    """Whether the copy holds the tokenizer too (it does when the tokenizer came from the GGUF file)."""
    return json.loads((folder / _DONE).read_text())["tokenizer"]


def write_copy(folder: Path, gguf_path: Path, model, tokenizer=None) -> None:
    """Save ``model`` (and ``tokenizer``) as safetensors into ``folder``, atomically, one writer at a time.

    ``save_pretrained`` refuses a model loaded from GGUF; its weights are plain tensors once loaded,
    so they are written with safetensors directly, and the config without its GGUF quantization
    entry (the weights in the copy are the de-quantized ones).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with write_folder(folder) as tmp:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        marker = {"format": _FORMAT, "gguf_file": gguf_path.name, "tokenizer": tokenizer is not None}
        (tmp / _DONE).write_text(json.dumps(marker, indent=2) + "\n")
