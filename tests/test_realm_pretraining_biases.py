"""REALM's inductive biases as switches: salient-span masking (random spans as fallback and ablation), the
null document in every candidate set, and no trivial retrieval of the masked sentence's own document."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import BertTokenizerFast

from hf_knnlm.open_qa.pretraining import (
    RealmPretrainingCollator,
    RealmPretrainingSettings,
    masked_examples,
    salient_spans,
)
from hf_knnlm.open_qa.pretraining.spans import split_sentences

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import SPECIALS, make_tokenizer
    from tests.pretraining_utils import make_mlm_index, make_mlm_model, masked_row
except ImportError:
    from open_qa_utils import SPECIALS, make_tokenizer
    from pretraining_utils import make_mlm_index, make_mlm_model, masked_row

TEXTS = [
    "The University of Notre Dame was founded on November 26, 1842 by Edward Sorin. It grew fast.",
    "In 1990 the city of Berlin became the capital of Germany again. Students came from 45 countries.",
    "Construction began in March 1850 under the direction of the French architect Louis Dupont.",
    "all words here are lower case and nothing is salient at all in this sentence.",
]


@pytest.fixture(scope="module")
def text_tokenizer():
    words = sorted({w for t in TEXTS for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIALS + words)}, do_lower_case=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_salient_spans_rule_set():
    found = [[(text[s:e], kind) for s, e, kind in salient_spans(text)] for text in TEXTS]
    assert found == [
        [("University of Notre Dame", "entity"), ("November 26, 1842", "date"), ("Edward Sorin", "entity")],
        [("1990", "date"), ("Berlin", "entity"), ("Germany", "entity"), ("45", "number")],
        [("March 1850", "date"), ("French", "entity"), ("Louis Dupont", "entity")],
        [],
    ]
    text = TEXTS[0]
    assert [text[s:e] for s, e in split_sentences(text)] == [TEXTS[0][:-14], "It grew fast."]


def _masked_text(tokenizer, row):
    return tokenizer.decode([label for label in row["labels"] if label != -100])


def test_salient_masking_masks_one_salient_span(text_tokenizer):
    rows = masked_examples([{"text": t} for t in TEXTS], text_tokenizer, max_length=48)
    salient = {text[s:e] for text in TEXTS for s, e, _ in salient_spans(text)}
    by_kind = {row["kind"] for row in rows}
    assert by_kind <= {"date", "number", "entity", "random"}
    # "It grew fast." is too short; the lower-case sentence falls back to a random span
    assert [row["kind"] == "random" for row in rows] == [False, False, False, False, True]
    for row in rows:
        assert _masked_text(text_tokenizer, row) == row["target"].lower()
        assert (row["target"] in salient) == (row["kind"] != "random")
    assert [row["source"] for row in rows] == [0, 1, 1, 2, 3]
    without_fallback = RealmPretrainingSettings(fallback_to_random=False)
    kept = masked_examples([{"text": t} for t in TEXTS], text_tokenizer, without_fallback, max_length=48)
    assert [row["source"] for row in kept] == [row["source"] for row in rows if row["kind"] != "random"]


def test_random_span_ablation(text_tokenizer):
    settings = RealmPretrainingSettings(masking="random", random_span_words=2, seed=3)
    rows = masked_examples([{"text": t} for t in TEXTS], text_tokenizer, settings, max_length=48)
    assert rows and all(row["kind"] == "random" for row in rows)
    for row in rows:
        assert 1 <= len(row["target"].split()) <= 2
        masked = [i for i, label in enumerate(row["labels"]) if label != -100]
        assert masked == list(range(masked[0], masked[-1] + 1))  # one contiguous span
    again = masked_examples([{"text": t} for t in TEXTS], text_tokenizer, settings, max_length=48)
    assert again == rows  # seeded per (seed, document, sentence)


@pytest.mark.parametrize("null", [True, False])
def test_null_document_is_always_a_candidate(tokenizer, null):
    model = make_mlm_model(tokenizer, top_k=2, null_document=null)
    index = make_mlm_index(model, tokenizer)
    row = masked_row(tokenizer, "paris is the capital of france", ["paris"], source=0)
    batch = RealmPretrainingCollator(model, tokenizer, index)([row])
    assert batch["joined_input_ids"].shape[1] == 2 + null
    with torch.no_grad():
        logits = model(**batch).retriever_logits
    assert logits.shape == (1, 2 + null)
    if null:
        last = batch["joined_input_ids"][0, -1][batch["joined_attention_mask"][0, -1].bool()]
        assert last.tolist() == row["input_ids"]  # [CLS] x [SEP] and nothing else
        assert float(logits[0, -1]) == 0.0


def test_source_document_is_never_retrieved(tokenizer):
    model = make_mlm_model(tokenizer, top_k=6)  # every document of the index
    index = make_mlm_index(model, tokenizer)
    rows = [
        masked_row(tokenizer, "paris is the capital of france", ["paris"], source=0),
        masked_row(tokenizer, "vienna is the capital of austria on the danube river", ["vienna"], source=5),
    ]
    excluded = RealmPretrainingCollator(model, tokenizer, index).retrieve(rows)
    for positions, row in zip(excluded, rows, strict=True):
        assert row["source"] not in positions.tolist()
        assert sorted(positions.tolist()) == sorted({-1, *range(6)} - {row["source"]})
    kept = RealmPretrainingCollator(model, tokenizer, index, exclude_source=False).retrieve(rows)
    assert all(sorted(p.tolist()) == list(range(6)) for p in kept)
    batch = RealmPretrainingCollator(model, tokenizer, index)(rows)
    assert batch["doc_valid"].tolist() == [[True] * 5 + [False]] * 2
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss) and float(torch.softmax(out.retriever_logits, -1)[0, 5]) == 0.0
