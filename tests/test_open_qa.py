"""REALM open-QA tests on a 1-layer random BERT and a six-document toy collection (offline, seconds)."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from hf_knnlm import IntegrityError
from hf_knnlm.open_qa import (
    DocumentIndex,
    IndexRefreshCallback,
    RealmDataCollator,
    RealmForOpenQA,
    build_features,
    embed_corpus,
)
from hf_knnlm.open_qa.data import find_answer_chars, match_answer_spans
from hf_knnlm.open_qa.modeling import SPAN_MASK_VALUE
from hf_knnlm.open_qa.squad import exact_match, f1_score, normalize_answer
from hf_knnlm.open_qa.training import train_realm

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import DOCUMENTS, QUESTIONS, make_index, make_model, make_tokenizer
except ImportError:
    from open_qa_utils import DOCUMENTS, QUESTIONS, make_index, make_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture()
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture()
def index(model, tokenizer):
    return make_index(model, tokenizer)


def _features(model, tokenizer, index, rows, k=None):
    collator = RealmDataCollator(model, tokenizer, index, top_k=k or len(index))
    return collator(rows)


def test_span_scores_only_cover_document_tokens(model, tokenizer, index):
    features = _features(model, tokenizer, index, QUESTIONS, k=3)
    with torch.no_grad():
        spans = model(**features).span_logits
    doc = features["doc_mask"]
    width = model.config.max_span_width
    batch, k, seq = doc.shape
    for b in range(batch):
        for z in range(k):
            for i in range(seq):
                for w in range(width):
                    inside = bool(doc[b, z, i]) and i + w < seq and bool(doc[b, z, i + w])
                    if inside:
                        assert spans[b, z, i, w] > SPAN_MASK_VALUE
                    else:
                        assert spans[b, z, i, w] == SPAN_MASK_VALUE
    # The mask really excludes [CLS], question, [SEP] and padding: the first doc token follows the first
    # [SEP].
    sep = tokenizer.sep_token_id
    first_sep = int((features["reader_input_ids"][0, 0] == sep).nonzero()[0])
    assert int(doc[0, 0].nonzero()[0]) == first_sep + 1


def test_answer_matching_on_characters_and_token_boundaries():
    text = "The Tiber river; the tiber, not Tiberius."
    # Case-insensitive, every occurrence, whole words only ("Tiberius" is not "tiber").
    assert find_answer_chars(text, ["tiber", " Tiber "]) == [(4, 9), (21, 26)]
    # Token offsets of "[CLS] q [SEP] the tiber river ; the tiber , not tiberius . [SEP]" (document = True).
    offsets = [(0, 0), (0, 1), (0, 0), (0, 3), (4, 9), (10, 15), (15, 16), (17, 20), (21, 26), (26, 27)]
    doc = [False, False, False] + [True] * 7
    assert match_answer_spans(offsets, doc, [(4, 9), (21, 26)], max_span_width=4, max_spans=8) == [
        (4, 4),
        (8, 8),
    ]
    assert match_answer_spans(offsets, doc, [(4, 15)], max_span_width=2, max_spans=8) == [(4, 5)]
    assert match_answer_spans(offsets, doc, [(4, 15)], max_span_width=1, max_spans=8) == []  # too wide
    assert match_answer_spans(offsets, doc, [(5, 9)], max_span_width=4, max_spans=8) == []  # mid-token
    assert match_answer_spans(offsets, [False] * 10, [(4, 9)], max_span_width=4, max_spans=8) == []


def test_marginal_loss_equals_brute_force(model, tokenizer, index):
    features = _features(model, tokenizer, index, QUESTIONS, k=3)
    with torch.no_grad():
        out = model(**features)
    doc_mask = features["doc_mask"]
    width = model.config.max_span_width
    batch, k, seq = doc_mask.shape
    losses = []
    for b in range(batch):
        retr = [float(x) for x in out.retriever_logits[b]]
        doc_norm = math.log(sum(math.exp(r) for r in retr))
        marginal = 0.0
        for z in range(k):
            candidates = {
                (i, i + w): float(out.span_logits[b, z, i, w])
                for i in range(seq)
                for w in range(width)
                if i + w < seq and doc_mask[b, z, i] and doc_mask[b, z, i + w]
            }
            span_norm = math.log(sum(math.exp(s) for s in candidates.values()))
            labels = {
                (int(s), int(e))
                for s, e in zip(features["answer_starts"][b, z], features["answer_ends"][b, z], strict=True)
                if s >= 0
            }
            for span in labels:
                marginal += math.exp(retr[z] - doc_norm) * math.exp(candidates[span] - span_norm)
        if marginal > 0:
            losses.append(-math.log(marginal))
    assert out.has_answer.tolist() == [True, True, True, True][:batch] or len(losses) == int(
        out.has_answer.sum()
    )
    assert len(losses) == int(out.has_answer.sum()) > 0
    assert float(out.loss) == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-5)


def test_questions_without_answer_are_left_out_of_the_mean(model, tokenizer, index):
    rows = [QUESTIONS[0], {"question": "what is the capital of spain", "answers": ["danube berlin seine"]}]
    features = _features(model, tokenizer, index, rows)
    with torch.no_grad():
        both = model(**features)
        alone = model(**_features(model, tokenizer, index, rows[:1]))
    assert both.has_answer.tolist() == [True, False]
    assert float(both.loss) == pytest.approx(float(alone.loss), abs=1e-5)
    none = _features(model, tokenizer, index, rows[1:])
    out = model(**none)
    assert out.loss.detach().item() == 0.0 and out.loss.requires_grad


def test_batch_of_three_equals_three_batches_of_one(model, tokenizer, index):
    rows = QUESTIONS[:3]
    with torch.no_grad():
        batched = model(**_features(model, tokenizer, index, rows))
        singles = [model(**_features(model, tokenizer, index, [row])) for row in rows]
    assert batched.has_answer.all()
    expected = sum(float(s.loss) for s in singles) / 3
    assert float(batched.loss) == pytest.approx(expected, abs=1e-5)
    for b, single in enumerate(singles):
        torch.testing.assert_close(
            batched.retriever_logits[b], single.retriever_logits[0], atol=1e-5, rtol=1e-5
        )


@pytest.mark.slow
def test_loss_falls_with_trainer(model, tokenizer, index, tmp_path):
    rows = QUESTIONS
    features = _features(model, tokenizer, index, rows)
    with torch.no_grad():
        before = float(model(**features).loss)
    train = datasets.Dataset.from_list(
        [{"question": r["question"], "answers": normalize_list(r["answers"])} for r in rows]
    )
    trainer = train_realm(
        model,
        tokenizer,
        index,
        train,
        output_dir=tmp_path,
        max_steps=16,
        batch_size=4,
        learning_rate=3e-3,
        head_learning_rate=1e-2,
        top_k=len(index),
        logging_steps=4,
        disable_tqdm=True,
        use_cpu=True,
    )
    model.eval()
    with torch.no_grad():
        after = float(model(**features).loss)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and logged == sorted(logged, reverse=True), logged
    assert after < 0.7 * before, (before, after, logged)


def normalize_list(answers):
    return answers["text"] if isinstance(answers, dict) else answers


def test_doc_encoder_frozen_query_encoder_trains(model, tokenizer, index):
    features = _features(model, tokenizer, index, QUESTIONS, k=3)
    model.train()
    model(**features).loss.backward()
    assert all(p.grad is None for p in model.doc_embedder.parameters())
    assert model.query_embedder.projection.weight.grad.abs().sum() > 0
    assert model.reader.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_save_load_round_trip_identical(model, tokenizer, index, tmp_path):
    features = _features(model, tokenizer, index, QUESTIONS, k=3)
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert isinstance(loaded, RealmForOpenQA)
    assert (tmp_path / "model" / "README.md").is_file()
    with torch.no_grad():
        a, b = model(**features), loaded(**features)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.span_logits, b.span_logits)
    assert torch.equal(a.retriever_logits, b.retriever_logits)
    assert all(not p.requires_grad for p in loaded.doc_embedder.parameters())


def test_from_encoder_copies_weights_everywhere(tokenizer, tmp_path):
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
        )
    )
    encoder.save_pretrained(tmp_path / "encoder")
    model = RealmForOpenQA.from_encoder(
        tmp_path / "encoder", retriever_proj_size=None, retriever_pooling="mean"
    )
    source = encoder.embeddings.word_embeddings.weight
    for module in (model.query_embedder.encoder, model.doc_embedder.encoder, model.reader):
        assert torch.equal(module.embeddings.word_embeddings.weight, source)
    assert model.config.retriever_dim == 32


def test_document_index_round_trip_and_integrity(model, tokenizer, index, tmp_path):
    folder = tmp_path / "index"
    index.save_pretrained(folder)
    loaded = DocumentIndex.from_pretrained(folder)
    assert loaded.ids == index.ids and loaded.texts == index.texts and loaded.titles == index.titles
    assert torch.equal(loaded.embeddings, index.embeddings)
    queries = torch.randn(2, index.dim)
    for (s1, p1), (s2, p2) in [(index.search(queries, 3), loaded.search(queries, 3))]:
        assert (p1 == p2).all() and (s1 == s2).all()
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "document_index.json",
        "documents.jsonl",
        "embeddings.safetensors",
        "index.faiss",
    ]
    with open(folder / "documents.jsonl", "a", encoding="utf-8") as f:
        f.write("\n")
    with pytest.raises(IntegrityError, match="documents.jsonl"):
        DocumentIndex.from_pretrained(folder)


def test_index_search_matches_brute_force(index):
    queries = torch.randn(3, index.dim)
    scores, positions = index.search(queries, 4)
    expected = (queries @ index.embeddings.T).topk(4, dim=-1)
    assert (torch.from_numpy(positions) == expected.indices).all()
    torch.testing.assert_close(torch.from_numpy(scores), expected.values, atol=1e-5, rtol=1e-5)


def test_bad_input_raises_clear_value_errors(model, tokenizer, index):
    with pytest.raises(ValueError, match="k=7"):
        index.search(torch.randn(1, index.dim), 7)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        RealmDataCollator(model, tokenizer, index)([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="doc_positions"):
        build_features(model, tokenizer, index, ["a question"], [[0], [1]])
    with pytest.raises(ValueError, match="'text'"):
        DocumentIndex.build([{"title": "no text"}], model, tokenizer)


def test_answer_returns_text_score_and_documents(model, tokenizer, index):
    results = model.answer(
        ["what is the capital of france", "which river flows through rome"], index, tokenizer, top_k=2
    )
    assert len(results) == 2
    for result in results:
        assert len(result["doc_ids"]) == 2 and result["doc_id"] in result["doc_ids"]
        text = next(d["text"] for d in DOCUMENTS if d["id"] == result["doc_id"])
        assert result["answer"] and result["answer"] in text
        assert 0.0 < result["score"] <= 1.0
        assert sum(result["doc_scores"]) == pytest.approx(1.0, abs=1e-5)


def test_index_refresh_callback_swaps_in_new_embeddings(tokenizer):
    model = make_model(tokenizer, share_retriever_encoders=True)
    index = make_index(model, tokenizer)
    old = index.embeddings.clone()
    with torch.no_grad():
        model.query_embedder.projection.weight.mul_(2.0)  # what a training step on a shared encoder does
    callback = IndexRefreshCallback(index, tokenizer, every_n_steps=2)

    class State:
        global_step = 1

    callback.on_step_end(None, State, None, model=model)
    callback.wait()
    assert callback.refreshes == 0 and torch.equal(index.embeddings, old)
    State.global_step = 2
    callback.on_step_end(None, State, None, model=model)
    callback.wait()
    assert callback.refreshes == 1
    expected = embed_corpus(
        model.document_embedder, tokenizer, index.titles, index.texts, max_length=32, show_progress=False
    )
    torch.testing.assert_close(index.embeddings, expected)
    assert not torch.allclose(index.embeddings, old)
    _, positions = index.search(expected[:1], 1)
    assert positions[0, 0] == 0


def test_squad_metrics_follow_the_official_normalisation():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower", ["Eiffel Tower"]) == 1.0
    assert f1_score("eiffel tower in paris", ["Eiffel Tower"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert f1_score("nothing", ["Eiffel Tower"]) == 0.0


def test_index_push_and_load_by_repo_id(index, tmp_path, monkeypatch):
    """push_to_hub makes one upload_folder commit; from_pretrained(repo_id) goes through snapshot_download."""
    import shutil

    import huggingface_hub

    remote = tmp_path / "remote"
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def file_exists(self, repo_id, filename, revision=None):
            return False

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(repo_id)
            shutil.copytree(folder_path, remote)

    downloads = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        assert repo_id == "user/toy-index"
        downloads.append(allow_patterns)
        return str(remote)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    index.push_to_hub("user/toy-index")
    assert calls == ["user/toy-index"]
    loaded = DocumentIndex.from_pretrained("user/toy-index")
    assert loaded.ids == index.ids and torch.equal(loaded.embeddings, index.embeddings)
    assert "index.faiss" not in downloads[0] and "index.faiss" in downloads[-1]  # the config first


def test_config_rejects_bad_values_and_round_trips(tmp_path):
    from transformers import AutoConfig

    from hf_knnlm.open_qa import RealmConfig

    with pytest.raises(ValueError, match="retriever_pooling"):
        RealmConfig(retriever_pooling="max")
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        RealmConfig(max_reader_length=1000)
    config = RealmConfig(
        top_k=7, retriever_proj_size=None, encoder_config={"model_type": "bert", "hidden_size": 64}
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RealmConfig)
    assert loaded.top_k == 7 and loaded.retriever_proj_size is None and loaded.retriever_dim == 64
