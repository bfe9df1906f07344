"""Passage chunking and the BM25 / dense retrievers: one search contract, safe save/load round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_knnlm.rag import BM25Retriever, DenseRetriever, Retriever, chunk_documents
from hf_knnlm.retrieval.chunking import token_spans
from hf_knnlm.utils.files import IntegrityError

try:
    from tests.open_qa_utils import DOCUMENTS, make_index, make_model, make_tokenizer
except ImportError:  # tests/ on sys.path rather than importable as a package
    from open_qa_utils import DOCUMENTS, make_index, make_model, make_tokenizer

ROWS = [
    {"title": "Bridges", "text": "The king sees the bridge and the river below it."},
    {"title": "Markets", "text": "A merchant sells a silver crown at the market."},
    {"title": "Roads", "text": "The fool crosses the northern road at night."},
]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """The open-QA document index of a tiny REALM model, queried through its query embedder."""
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("bert"))
    model = make_model(
        tokenizer, retriever_pooling="mean", retriever_proj_size=None, retriever_normalize=True
    )
    return DenseRetriever(make_index(model, tokenizer), model.query_embedder, tokenizer)


def test_token_spans_cover_with_overlap():
    assert token_spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert token_spans(3, 4, 1) == [(0, 3)]
    with pytest.raises(ValueError, match="overlap"):
        token_spans(10, 4, 4)


def test_chunks_are_substrings_of_fixed_token_length(tokenizer, corpus_text):
    passages = chunk_documents(
        [{"title": "T", "text": corpus_text[:2000]}, "second document"], tokenizer, chunk_tokens=32, overlap=8
    )
    assert passages.column_names == ["id", "title", "text", "document", "start_token"]
    first = [p for p in passages if p["document"] == 0]
    assert all(p["title"] == "T" and p["text"] in corpus_text for p in first)
    assert [p["start_token"] for p in first[:3]] == [0, 24, 48]
    lengths = [len(tokenizer(p["text"], add_special_tokens=False)["input_ids"]) for p in first[:-1]]
    assert max(abs(n - 32) for n in lengths) <= 1  # re-tokenizing a cut may merge one boundary token
    assert passages[-1]["text"] == "second document" and passages[-1]["id"] == "1-0"
    with pytest.raises(ValueError, match="empty"):
        chunk_documents(["   "], tokenizer)


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_retrievers_share_one_contract(kind, dense):
    retriever = BM25Retriever.build(DOCUMENTS) if kind == "bm25" else dense
    assert isinstance(retriever, Retriever) and len(retriever) == len(DOCUMENTS) == 6
    assert retriever.texts == [d["text"] for d in DOCUMENTS] and retriever.titles[0] == "france"
    scores, doc_ids = retriever.search(["what is the capital of france", "tiber river"], k=3)
    assert scores.dtype == np.float32 and doc_ids.dtype == np.int64
    assert scores.shape == doc_ids.shape == (2, 3)
    assert ((doc_ids >= -1) & (doc_ids < 6)).all() and (doc_ids[:, 0] >= 0).all()
    valid = doc_ids >= 0
    assert (np.diff(np.where(valid, scores, -np.inf), axis=1) <= 0).all()  # best first
    for bad in (0, 7):
        with pytest.raises(ValueError, match="k="):
            retriever.search(["x"], k=bad)


def test_bm25_finds_the_passage_and_nothing_for_unknown_words():
    bm25 = BM25Retriever.build(ROWS)
    scores, doc_ids = bm25.search(["merchant silver crown", "zebra quantum", ""], k=2)
    assert doc_ids[0, 0] == 1 and scores[0, 0] > 0
    assert (doc_ids[1:] == -1).all() and (scores[1:] == 0).all()


def test_bm25_round_trip_checks_sha256(tmp_path):
    bm25 = BM25Retriever.build(ROWS, method="bm25+")
    bm25.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "README.md",
        "bm25.safetensors",
        "bm25_config.json",
        "bm25_vocab.json",
        "documents.jsonl",
    ]
    config = json.loads((tmp_path / "bm25_config.json").read_text())
    assert set(config["files"]) == {"bm25.safetensors", "bm25_vocab.json", "documents.jsonl"}
    loaded = BM25Retriever.from_pretrained(tmp_path)
    queries = ["river bridge king", "northern road"]
    for a, b in zip(bm25.search(queries, 3), loaded.search(queries, 3), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.texts == bm25.texts and loaded.ids == ["0", "1", "2"]
    data = bytearray((tmp_path / "bm25.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "bm25.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="bm25.safetensors"):
        BM25Retriever.from_pretrained(tmp_path)


def test_dense_round_trip_checks_sha256(tmp_path, dense):
    dense.save_pretrained(tmp_path)
    loaded = DenseRetriever.from_pretrained(tmp_path, dense.query_encoder, dense.tokenizer)
    for a, b in zip(dense.search(["which river"], 3), loaded.search(["which river"], 3), strict=True):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "documents.jsonl").write_text("tampered\n")
    with pytest.raises(IntegrityError, match="documents.jsonl"):
        DenseRetriever.from_pretrained(tmp_path, dense.query_encoder, dense.tokenizer)
