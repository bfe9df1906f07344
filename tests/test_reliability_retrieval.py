"""The retrievers and the chunker: what would index or search the wrong thing is refused, by name."""

from __future__ import annotations

import datasets
import pytest
import torch
from torch import nn

from hf_knnlm.retrieval import BM25Retriever, DenseRetriever, chunk_documents, load_retriever

DOCS = [{"text": "The cat sat on the mat."}, {"text": "A dog ran to the park."}, {"text": "Rome is old."}]


class MeanEmbedding(nn.Module):
    """A query and document encoder: the mean of a random token table (``seed`` picks the weights)."""

    def __init__(self, vocab_size: int, dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(vocab_size, dim)

    def forward(self, input_ids, attention_mask=None, **_):
        return self.table(input_ids).mean(1)


def test_a_dense_index_loaded_with_another_encoder_of_the_same_width_is_refused(tokenizer, tmp_path):
    encoder = MeanEmbedding(len(tokenizer), seed=0)
    DenseRetriever.build(DOCS, encoder, tokenizer).save_pretrained(tmp_path / "dense")
    same = DenseRetriever.from_pretrained(tmp_path / "dense", encoder, tokenizer)
    assert same.search(["cat"], k=1)[1].shape == (1, 1)
    with pytest.raises(ValueError, match="another query encoder"):
        DenseRetriever.from_pretrained(tmp_path / "dense", MeanEmbedding(len(tokenizer), seed=1), tokenizer)


@pytest.mark.parametrize(
    "rows",
    [
        [{"text": "The cat sat."}, {"text": None}],
        datasets.Dataset.from_dict({"text": ["The cat sat.", None]}),
        [{"text": "The cat sat.", "id": "a"}, {"text": "A dog.", "id": None}],
    ],
    ids=["dict-rows", "dataset", "none-id"],
)
def test_none_texts_are_refused_not_indexed_as_the_word_none(rows):
    with pytest.raises(ValueError, match=r"document 1.*None"):
        BM25Retriever.build(rows)


@pytest.mark.parametrize(
    "rows", [["The cat sat.", None], [{"text": "The cat sat."}, {"text": None}]], ids=["strings", "rows"]
)
def test_the_chunker_refuses_none_texts(tokenizer, rows):
    with pytest.raises(ValueError, match=r"document 1.*None"):
        chunk_documents(rows, tokenizer, chunk_tokens=8, overlap=2)


def test_the_chunker_names_a_file_that_is_not_utf8(tokenizer, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("The king sees the river caf\u00e9.".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        chunk_documents(bad, tokenizer, chunk_tokens=8, overlap=2)


@pytest.mark.parametrize(
    "kwargs, name", [(dict(chunk_tokens=8.0), "chunk_tokens=8.0"), (dict(overlap=True), "overlap")]
)
def test_the_chunker_refuses_non_integer_sizes(tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        chunk_documents(["The cat sat on the mat."], tokenizer, **{"chunk_tokens": 8, "overlap": 2, **kwargs})


def test_bm25_names_a_corpus_without_an_indexable_word():
    with pytest.raises(ValueError, match="no word BM25 can index"):
        BM25Retriever.build([{"text": "the a of"}, {"text": "!!"}])  # stopwords and punctuation only


@pytest.mark.parametrize("batch_size", [0, 2.5, True])
def test_dense_batch_sizes_are_refused_by_name(tokenizer, batch_size):
    encoder = MeanEmbedding(len(tokenizer))
    with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
        DenseRetriever.build(DOCS, encoder, tokenizer, batch_size=batch_size)
    index = DenseRetriever.build(DOCS, encoder, tokenizer).index
    with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
        DenseRetriever(index, encoder, tokenizer, batch_size=batch_size)


def test_a_hub_id_that_cannot_be_fetched_is_named_for_the_retriever_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-index"):
        load_retriever("no-such-org/no-such-index")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_retriever(tmp_path / "missing")


def test_retriever_searches_refuse_a_boolean_k():
    with pytest.raises(ValueError, match="k=True"):
        BM25Retriever.build(DOCS).search(["cat"], True)
