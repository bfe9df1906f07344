"""DatastoreConfig: the on-disk contract of a datastore (``datastore_config.json``).

Like peft's adapter configs: a versioned dataclass, ``help`` metadata on every field, validation
in ``__post_init__``, unknown keys tolerated with a warning, sorted JSON, relative file names only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..checks import is_int, is_real
from ..files import atomic_write_json

logger = logging.getLogger(__name__)

CONFIG_NAME = "datastore_config.json"
FORMAT_VERSION = 1
KEY_DTYPES = ("float16", "float32")
METRICS = ("l2",)


@dataclass
class DatastoreConfig:
    """What a datastore is, what built it and which files belong to it."""

    model_type: str = field(metadata={"help": "transformers model_type of the model that produced the keys."})
    hook_module: str = field(metadata={"help": "Dotted path of the FFN module whose input is the key."})
    hidden_size: int = field(metadata={"help": "Dimension of every key (the FFN input width)."})
    vocab_size: int = field(metadata={"help": "Vocabulary size of the model; values are token ids below it."})
    num_hidden_layers: int | None = field(
        default=None,
        metadata={"help": "Decoder layers of the model that built the store; other depths are refused."},
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of this on-disk format."})
    hf_knnlm_version: str = field(default="", metadata={"help": "hf_knnlm version that wrote the store."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id or path of the base model."})
    base_model_revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    tokenizer_fingerprint: str | None = field(
        default=None,
        metadata={"help": "sha256 of the tokenizer's vocabulary; guards against a wrong tokenizer."},
    )
    key_dtype: str = field(default="float16", metadata={"help": "dtype of the stored keys."})
    metric: str = field(default="l2", metadata={"help": "Distance used by the index (squared L2)."})
    index_factory: str = field(
        default="Flat", metadata={"help": "faiss index_factory string of index.faiss."}
    )
    num_entries: int = field(default=0, metadata={"help": "Number of (key, value) pairs."})
    max_length: int | None = field(default=None, metadata={"help": "Sliding-window length used to build."})
    stride: int | None = field(default=None, metadata={"help": "Sliding-window stride used to build."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Names of the corpora in the store."})
    shards: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Entry ranges: [{'keys': file, 'values': file, 'start': i, 'end': j}], relative."},
    )
    files: dict[str, str] = field(default_factory=dict, metadata={"help": "sha256 of every file, by name."})
    evaluation: dict[str, Any] | None = field(
        default=None, metadata={"help": "Recorded perplexities (base_ppl, knn_ppl, ...) for the model card."}
    )

    def __post_init__(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"datastore format_version {self.format_version} is newer than this hf_knnlm supports "
                f"({FORMAT_VERSION}); upgrade with `pip install -U hf-knnlm`."
            )
        if self.hidden_size <= 0 or self.vocab_size <= 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) and vocab_size ({self.vocab_size}) must be > 0."
            )
        if self.key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype={self.key_dtype!r} is not one of {KEY_DTYPES}.")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r} is not supported; kNN-LM uses {METRICS}.")
        for shard in self.shards:
            if not {"keys", "values", "start", "end"} <= set(shard):
                raise ValueError(f"shard {shard!r} needs 'keys', 'values', 'start' and 'end'.")
        for name in list(self.files) + [f for s in self.shards for f in (s["keys"], s["values"])]:
            if os.path.isabs(name) or ".." in name.split("/"):
                raise ValueError(f"datastore file name {name!r} must be relative to the datastore folder.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_NAME) -> DatastoreConfig:
        """Check every field's presence and type (errors name ``source`` and the field), then build."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} holds a {type(data).__name__}, not a JSON object of config fields.")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            logger.warning("Ignoring unknown keys in %s: %s (written by a newer hf_knnlm?)", source, unknown)
        hints = typing.get_type_hints(cls)
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in data:
                if required:
                    raise ValueError(f"{source}: required field {f.name!r} is missing. {_REBUILD}")
            elif not _matches(data[f.name], hints[f.name]):
                raise ValueError(
                    f"{source}: field {f.name!r} is {data[f.name]!r}, not of type {f.type}. {_REBUILD}"
                )
        try:
            return cls(**{f.name: data[f.name] for f in fields if f.name in data})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatastoreConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); the datastore config is truncated or edited."
            ) from err
        return cls.from_dict(data, source=str(path))


_REBUILD = "The file was truncated or edited: re-download the datastore or rebuild it."


def _matches(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a field's type hint (int, str, X | None, list[...], dict[..., ...])?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values())
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_real(value)
    return value is None if hint is type(None) else isinstance(value, hint)
