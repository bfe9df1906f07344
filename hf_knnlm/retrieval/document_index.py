"""The REALM document index: passages, their embeddings (safetensors) and a FAISS inner-product index.

Saved, loaded and pushed like a kNN-LM datastore (both are [`HubMixin`][hf_knnlm.utils.HubMixin]
stores): ``document_index.json`` (metadata + sha256 of every file), ``documents.jsonl`` (id, title,
text per line), ``embeddings.safetensors`` (the source of truth for the vectors), ``index.faiss``
(the search structure) and a ``README.md`` model card. Every file is checked against its recorded
sha256 before it is parsed; nothing is pickled.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..utils.faiss_support import import_faiss
from ..utils.files import atomic_path
from ..utils.fingerprints import encoder_fingerprint, tokenizer_fingerprint
from ..utils.hub_mixin import HubMixin, StoreConfig, render_card
from .documents import read_documents, write_documents
from .documents import rows_of as documents_from_rows  # the name importers of this module use
from .embedder import retriever_tokenizer

CONFIG_NAME = "document_index.json"
DOCUMENTS_NAME = "documents.jsonl"
EMBEDDINGS_NAME = "embeddings.safetensors"
FAISS_NAME = "index.faiss"
FORMAT = "hf_knnlm.document_index"
FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "hnsw")
_FILES = (DOCUMENTS_NAME, EMBEDDINGS_NAME, FAISS_NAME)


@dataclass(kw_only=True)
class DocumentIndexConfig(StoreConfig):
    """The on-disk contract of a document index (``document_index.json``)."""

    CONFIG_NAME: ClassVar[str] = CONFIG_NAME
    WHAT: ClassVar[str] = "document index"
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    FORMAT: ClassVar[str] = FORMAT

    format: str = field(default=FORMAT, metadata={"help": "Identifies the file as a document index."})
    num_documents: int = field(metadata={"help": "Number of documents (rows of every file)."})
    dim: int = field(metadata={"help": "Dimension of the document embeddings."})
    index_type: str = field(default="flat", metadata={"help": f"FAISS index type, one of {INDEX_TYPES}."})
    metric: str = field(default="inner_product", metadata={"help": "Retrieval score of the index."})
    metadata: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Encoder, pooling and lengths of the embedder that built it."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}.")
        self.metadata = dict(self.metadata or {})


def _faiss():
    return import_faiss("A REALM document index")


def _build_faiss(embeddings: np.ndarray, index_type: str):
    faiss = _faiss()
    dim = embeddings.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}.")
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


@torch.no_grad()
def embed_corpus(
    embedder: torch.nn.Module,
    tokenizer: Any,
    titles: list[str],
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int = 256,
    show_progress: bool = True,
) -> torch.Tensor:
    """Embed ``title [SEP] text`` pairs with a retriever embedder; returns float32 ``[n, d]`` on the CPU.

    Documents are processed in length order so that a batch pads to its own longest member.

    Examples:

    ```python
    >>> from hf_knnlm.retrieval import RetrieverEmbedder, embed_corpus
    >>> from hf_knnlm.retrieval.testing import tiny_encoder_config, tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()  # a word-level BERT tokenizer; any retriever tokenizer works
    >>> embedder = RetrieverEmbedder(tiny_encoder_config(len(tokenizer)), pooling="mean", normalize=True)
    >>> vectors = embed_corpus(embedder, tokenizer, ["france", "italy"], ["paris is the capital", "rome"],
    ...                        show_progress=False)
    >>> vectors.dtype, tuple(vectors.shape)  # float32 [documents, dim], on the CPU
    (torch.float32, (2, 32))
    ```
    """
    device = next(embedder.parameters()).device
    was_training = embedder.training
    embedder.eval()
    lengths = [len(title) + len(text) for title, text in zip(titles, texts, strict=True)]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    chunks = []
    try:
        for start in tqdm(
            range(0, len(order), batch_size), desc="embed documents", disable=not show_progress
        ):
            rows = order[start : start + batch_size]
            encoded = retriever_tokenizer(tokenizer)(
                [titles[i] for i in rows],
                [texts[i] for i in rows],
                truncation="only_second",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            encoded = {name: tensor.to(device) for name, tensor in encoded.items()}
            chunks.append(embedder(**encoded).float().cpu())
    finally:
        embedder.train(was_training)
    stacked = torch.cat(chunks)
    out = torch.empty_like(stacked)
    out[torch.tensor(order)] = stacked
    return out


class DocumentIndex(HubMixin):
    """Documents + one embedding each + a FAISS maximum-inner-product index over them.

    Build one with [`build`][hf_knnlm.retrieval.DocumentIndex.build]; ``save_pretrained`` /
    ``from_pretrained`` / ``push_to_hub`` work as for a [`Datastore`][hf_knnlm.Datastore] (local folder first,
    then the Hub; sha256-checked files).

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.retrieval import DocumentIndex
    >>> texts = ["Paris is in France.", "Rome is in Italy."]
    >>> index = DocumentIndex(["paris", "rome"], ["France", "Italy"], texts,
    ...                       torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # one vector per document
    >>> scores, positions = index.search(torch.tensor([[0.2, 0.9]]), k=2)  # maximum inner product first
    >>> positions.tolist(), [index.ids[i] for i in positions[0]]
    ([[1, 0]], ['rome', 'paris'])
    >>> folder = index.save_pretrained("my-index")  # documents + safetensors vectors + faiss, sha256-checked
    >>> DocumentIndex.from_pretrained("my-index").texts  # a folder or a Hub repo id
    ['Paris is in France.', 'Rome is in Italy.']
    ```
    """

    config_class = DocumentIndexConfig
    hub_patterns = (DOCUMENTS_NAME, EMBEDDINGS_NAME, FAISS_NAME)
    default_commit_message = "Upload REALM document index"

    def __init__(
        self,
        ids: list[str],
        titles: list[str],
        texts: list[str],
        embeddings: torch.Tensor,
        *,
        index_type: str = "flat",
        metadata: dict[str, Any] | None = None,
        faiss_index: Any = None,
    ):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)} but there are {len(texts)} documents; "
                "pass one row per document."
            )
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}.")
        self.ids, self.titles, self.texts = ids, titles, texts
        self.index_type = index_type
        self.metadata = dict(metadata or {})
        self._lock = threading.Lock()
        self._position: dict[str, int] | None = None
        self._embeddings = embeddings.float().contiguous()
        self._faiss = (
            faiss_index if faiss_index is not None else _build_faiss(self._embeddings.numpy(), index_type)
        )

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        documents: Iterable[Mapping[str, Any]],
        model: Any,
        tokenizer: Any,
        *,
        index_type: str = "flat",
        batch_size: int = 64,
        max_length: int | None = None,
        show_progress: bool = True,
    ) -> DocumentIndex:
        """Embed ``documents`` (rows with ``title``, ``text`` and optionally ``id``) with ``model``'s
        document embedder and index them."""
        _faiss()  # before the documents are embedded, not after
        ids, titles, texts = documents_from_rows(documents)
        max_length = max_length or model.config.max_doc_embed_length
        embeddings = embed_corpus(
            model.document_embedder,
            tokenizer,
            titles,
            texts,
            batch_size=batch_size,
            max_length=max_length,
            show_progress=show_progress,
        )
        metadata = {
            "encoder_fingerprint": encoder_fingerprint(model.document_embedder),
            "tokenizer_fingerprint": tokenizer_fingerprint(retriever_tokenizer(tokenizer)),
            "encoder": model.config.name_or_path or "",
            "max_length": max_length,
            "pooling": model.config.retriever_pooling,
            "normalize": model.config.retriever_normalize,
            "proj_size": model.config.retriever_proj_size,
        }
        return cls(ids, titles, texts, embeddings, index_type=index_type, metadata=metadata)

    # -- access ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.texts)

    @property
    def dim(self) -> int:
        return int(self._embeddings.shape[1])

    def positions_of(self, doc_ids: Iterable[str]) -> list[int]:
        """Index positions of the given document ids."""
        if getattr(self, "_position", None) is None:
            self._position = {doc_id: i for i, doc_id in enumerate(self.ids)}
        missing = [doc_id for doc_id in doc_ids if doc_id not in self._position]
        if missing:
            raise ValueError(
                f"document ids {missing[:5]} are not in the index; check the collection it was built on."
            )
        return [self._position[doc_id] for doc_id in doc_ids]

    @property
    def embeddings(self) -> torch.Tensor:
        return self._embeddings

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, positions) by inner product; positions are ``-1`` where fewer were found."""
        if k < 1 or k > len(self):
            raise ValueError(f"k={k} but the index holds {len(self)} documents; use 1 <= k <= {len(self)}.")
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have shape {queries.shape}; expected [n, {self.dim}] from the same retriever the "
                "index was built with."
            )
        with self._lock:
            faiss_index = self._faiss
        scores, positions = faiss_index.search(queries, k)
        return scores, positions

    def embeddings_for(self, positions: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Stored vectors of the given positions (``-1`` gives zeros), same leading shape plus ``[d]``."""
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        with self._lock:
            table = self._embeddings
        gathered = table[positions.clamp(min=0)]
        return gathered.masked_fill((positions < 0).unsqueeze(-1), 0.0)

    def check_compatible(self, model: Any, tokenizer: Any = None) -> None:
        """Refuse a model whose document embedder (or a tokenizer that) did not make these vectors.

        Compares the sha256 of the document embedder's weights and of the tokenizer's vocabulary with
        those recorded when the vectors were computed (indexes saved without them are not checked).
        """
        recorded = self.metadata.get("encoder_fingerprint")
        if recorded and recorded != encoder_fingerprint(model.document_embedder):
            raise ValueError(
                "this document index was embedded by another document encoder (its weights differ from the "
                "model's document embedder, though the widths match), so retrieval scores would be "
                "meaningless. Rebuild it with DocumentIndex.build(documents, model, tokenizer), or load the "
                "model it was built with."
            )
        recorded = self.metadata.get("tokenizer_fingerprint")
        tokenizer = None if tokenizer is None else retriever_tokenizer(tokenizer)
        if tokenizer is not None and recorded and recorded != tokenizer_fingerprint(tokenizer):
            raise ValueError(
                "tokenizer mismatch: this document index was embedded with another tokenizer (its vocabulary "
                "fingerprint differs); load the tokenizer the index was built with."
            )

    def replace_embeddings(self, embeddings: torch.Tensor, encoder: Any = None) -> None:
        """Swap in re-computed vectors (index refresh); searches running meanwhile see the old or new
        index. ``encoder``, the embedder that computed them, is recorded for
        [`check_compatible`][hf_knnlm.retrieval.DocumentIndex.check_compatible]."""
        if tuple(embeddings.shape) != tuple(self._embeddings.shape):
            raise ValueError(
                f"new embeddings have shape {tuple(embeddings.shape)}, the index holds "
                f"{tuple(self._embeddings.shape)}; re-embed with the same retriever architecture."
            )
        embeddings = embeddings.float().contiguous()
        faiss_index = _build_faiss(embeddings.numpy(), self.index_type)
        with self._lock:
            self._embeddings, self._faiss = embeddings, faiss_index
            if encoder is not None:
                self.metadata["encoder_fingerprint"] = encoder_fingerprint(encoder)

    # -- persistence -------------------------------------------------------------------------------------
    def _save_pretrained(self, folder: Path) -> tuple[DocumentIndexConfig, list[str]]:
        write_documents(folder / DOCUMENTS_NAME, self.ids, self.titles, self.texts)
        with self._lock:
            embeddings, faiss_index = self._embeddings, self._faiss
        with atomic_path(folder / EMBEDDINGS_NAME) as tmp:
            save_file({"embeddings": embeddings}, str(tmp), metadata={"format": FORMAT})
        faiss = _faiss()
        with atomic_path(folder / FAISS_NAME) as tmp, open(tmp, "wb") as f:  # a full disk raises here
            faiss.write_index(faiss_index, faiss.PyCallbackIOWriter(f.write))
        config = DocumentIndexConfig(
            num_documents=len(self), dim=self.dim, index_type=self.index_type, metadata=self.metadata
        )
        return config, list(_FILES)

    @classmethod
    def _from_pretrained(cls, folder: Path, config: DocumentIndexConfig) -> DocumentIndex:
        ids, titles, texts = read_documents(folder / DOCUMENTS_NAME)
        embeddings = load_file(str(folder / EMBEDDINGS_NAME))["embeddings"]
        faiss_index = _faiss().read_index(str(folder / FAISS_NAME))
        n = config.num_documents
        if len(texts) != n or embeddings.shape != (n, config.dim) or faiss_index.ntotal != n:
            raise ValueError(
                f"document index at {folder} is inconsistent: {len(texts)} documents, embeddings "
                f"{tuple(embeddings.shape)}, faiss {faiss_index.ntotal} vectors, config says {n} x "
                f"{config.dim}. Rebuild it."
            )
        return cls(
            ids,
            titles,
            texts,
            embeddings,
            index_type=config.index_type,
            metadata=config.metadata,
            faiss_index=faiss_index,
        )

    @classmethod
    def _files_read(cls, config: DocumentIndexConfig) -> tuple[str, ...]:
        return _FILES

    @classmethod
    def _model_card(cls, config: DocumentIndexConfig, repo_id: str | None = None):
        from huggingface_hub import ModelCardData

        encoder = config.metadata.get("encoder") or None
        card_data = ModelCardData(
            library_name="hf_knnlm", tags=["hf_knnlm", "realm", "document-index", "faiss"]
        )
        return render_card(
            "document_index.md",
            card_data,
            config,
            encoder=encoder or "unknown",
            repo_id=repo_id or "<this repo id or a local folder>",
        )


__all__ = ["DocumentIndex", "DocumentIndexConfig", "documents_from_rows", "embed_corpus"]
