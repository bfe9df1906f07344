"""The model card (``README.md``) of a saved datastore, rendered with ``huggingface_hub.ModelCard``.

The card is rendered from ``model_cards/datastore.md`` and the datastore's config. It is not in the
config's sha256 ``files`` map: users edit cards on the Hub, and ``push_to_hub`` never overwrites a
card the repository already has (see ``hf_knnlm.utils.hub_mixin``).
"""

from __future__ import annotations

import os
import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..utils.hub_mixin import render_card
from .config import DatastoreConfig

TAGS = ["knn-lm", "retrieval", "hf_knnlm"]
PLACEHOLDER_REPO_ID = "path/to/this/datastore"

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".txt", ".tokens", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".md")
# Names hf_knnlm.lm.corpus gives corpora that are not Hub datasets.
_ANONYMOUS_CORPORA = {"texts", "dataset"}


def hub_id_or_none(name: str | None, anonymous: set[str] | frozenset[str] = frozenset()) -> str | None:
    """``name`` if it can be a Hub repo id (metadata the Hub validates), else None (paths, file names)."""
    if not name or name in anonymous or _REPO_ID.fullmatch(name) is None:
        return None
    if name.lower().endswith(_FILE_SUFFIXES) or os.path.exists(name):
        return None
    return name


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _evaluation_rows(evaluation: dict[str, Any] | None) -> list[tuple[str, str]]:
    labels = {
        "base_ppl": "Perplexity, base model",
        "knn_ppl": "Perplexity, kNN-LM",
        "num_tokens": "Tokens scored",
    }
    rows = []
    for key, value in (evaluation or {}).items():
        if value is not None and not isinstance(value, (dict, list)):
            rows.append((labels.get(key, key), _format_value(value)))
    return rows


def datastore_card(
    config: DatastoreConfig, repo_id: str | None = None, num_shards: int | None = None
) -> ModelCard:
    """Render the card of a datastore described by ``config``.

    Args:
        config (`DatastoreConfig`): the saved store's config.
        repo_id (`str`, *optional*): the Hub repository the card is for (used in the usage snippet).
        num_shards (`int`, *optional*): shard count; defaults to ``len(config.shards)``.
    """
    base_model = hub_id_or_none(config.base_model)
    datasets = [d for d in (hub_id_or_none(n, _ANONYMOUS_CORPORA) for n in config.datasets) if d]
    card_data = ModelCardData(
        library_name="hf_knnlm",
        base_model=base_model,
        datasets=datasets or None,
        tags=list(TAGS),
    )
    return render_card(
        "datastore.md",
        card_data,
        config,
        corpora=", ".join(f"`{d}`" for d in config.datasets) or "not recorded",
        num_shards=num_shards if num_shards is not None else max(len(config.shards), 1),
        evaluation_rows=_evaluation_rows(config.evaluation),
        repo_id=repo_id or PLACEHOLDER_REPO_ID,
        usage_model=config.base_model or "<base model id>",
    )
