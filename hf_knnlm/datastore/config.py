"""DatastoreConfig: the on-disk contract of a datastore (``datastore_config.json``).

Like peft's adapter configs: a versioned dataclass, ``help`` metadata on every field, validation
in ``__post_init__``, unknown keys tolerated with a warning, sorted JSON, relative file names only.
The fields every saved store shares (format version, hf_knnlm version, sha256 of every file) and
the loading rules come from [`hf_knnlm.utils.hub_mixin.StoreConfig`][hf_knnlm.utils.StoreConfig].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..utils.hub_mixin import StoreConfig, check_relative

CONFIG_NAME = "datastore_config.json"
# 1: every store has index.faiss. 2: an exact ("Flat") store has none; its index is rebuilt from the
# fp16 keys when the store is opened (a reader of version 1 would not find the file, so it refuses).
# 3: a per-rank IVF build (``rank_shards``) has one index-0000r-of-0000N.faiss per rank and no
# index.faiss; only such stores are written as 3, so every other store stays readable by version 2.
FORMAT_VERSION = 3
SINGLE_INDEX_FORMAT_VERSION = 2
KEY_DTYPES = ("float16", "float32")
METRICS = ("l2",)


@dataclass(kw_only=True)
class DatastoreConfig(StoreConfig):
    """What a datastore is, what built it and which files belong to it.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> model, tokenizer, store = tiny_datastore("my-store")
    >>> config = store.config  # datastore_config.json
    >>> config.model_type, config.hook_module, config.hidden_size, config.num_entries, config.index_factory
    ('gpt2', 'transformer.h.1.mlp', 32, 6, 'Flat')
    >>> sorted(config.files)  # every file with its sha256, checked before it is read
    ['documents.safetensors', 'entries.safetensors', 'keys.safetensors', 'values.safetensors']
    ```
    """

    CONFIG_NAME: ClassVar[str] = CONFIG_NAME
    WHAT: ClassVar[str] = "datastore"
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION

    model_type: str = field(metadata={"help": "transformers model_type of the model that produced the keys."})
    hook_module: str = field(metadata={"help": "Dotted path of the FFN module whose input is the key."})
    hidden_size: int = field(metadata={"help": "Dimension of every key (the FFN input width)."})
    vocab_size: int = field(metadata={"help": "Vocabulary size of the model; values are token ids below it."})
    num_hidden_layers: int | None = field(
        default=None,
        metadata={"help": "Decoder layers of the model that built the store; other depths are refused."},
    )
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
    temperature: float | None = field(
        default=None,
        metadata={
            "help": "Default kNN temperature: 0.2 x the median distance of a sample of keys to their nearest "
            "other entry, measured when the store was written (None in stores written before it was)."
        },
    )
    datasets: list[str] = field(default_factory=list, metadata={"help": "Names of the corpora in the store."})
    shards: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Entry ranges: [{'keys': file, 'values': file, 'start': i, 'end': j}], relative."},
    )
    rank_shards: list[dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "Set by a build with shard_per_rank: [{'start': i, 'end': j, 'index': file or None}], "
            "the entries each of its processes wrote and that process's IVF index file (over one shared "
            "quantizer); distributed='shard' on as many processes gives each its own range and files."
        },
    )
    evaluation: dict[str, Any] | None = field(
        default=None, metadata={"help": "Recorded perplexities (base_ppl, knn_ppl, ...) for the model card."}
    )
    compression: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "How the store was compressed: source_entries, pca_dim, prune_to, merge_k."},
    )

    def written_format_version(self) -> int:
        """3 for a store with per-rank index files, else 2 (a per-rank Flat store has no index file).

        Examples:

        ```python
        >>> config = DatastoreConfig(model_type="gpt2", hook_module="h.1.mlp", hidden_size=8, vocab_size=9)
        >>> config.written_format_version()
        2
        >>> config.rank_shards = [{"start": 0, "end": 5, "index": "index-00001-of-00001.faiss"}]
        >>> config.written_format_version()
        3
        ```
        """
        if any(part.get("index") is not None for part in self.rank_shards or []):
            return FORMAT_VERSION
        return SINGLE_INDEX_FORMAT_VERSION

    def __post_init__(self) -> None:
        super().__post_init__()
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
        for name in [f for s in self.shards for f in (s["keys"], s["values"])]:
            check_relative(name, self.WHAT)
        for part in self.rank_shards or []:
            if not {"start", "end", "index"} <= set(part):
                raise ValueError(f"rank shard {part!r} needs 'start', 'end' and 'index'.")
            if part["index"] is not None:
                check_relative(part["index"], self.WHAT)
