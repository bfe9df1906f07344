"""REALM pre-training end to end on tiny models: pretrain_realm writes a checkpoint that feeds the open-QA
path (from_retriever_and_reader, train_realm, answer), and a stopped run resumes to the same result."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoModel

from hf_knnlm.open_qa import DocumentIndex, RealmForOpenQA, normalize_answers, train_realm
from hf_knnlm.open_qa.pretraining import RealmPretrainingSettings, open_qa_from_pretraining, pretrain_realm
from hf_knnlm.open_qa.pretraining.training import INDEX_CHECKPOINT

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import DOCUMENTS, QUESTIONS, KillAfter, Killed, make_tokenizer
    from tests.pretraining_utils import make_mlm_model
except ImportError:
    from open_qa_utils import DOCUMENTS, QUESTIONS, KillAfter, Killed, make_tokenizer
    from pretraining_utils import make_mlm_model

NO_REFRESH = RealmPretrainingSettings(refresh_index_every=0)
QA_SETTINGS = dict(top_k=3, max_reader_length=48, span_hidden_size=16, max_span_width=4)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _pretrain(tokenizer, output, refresh_every=0, **kwargs):
    model = make_mlm_model(tokenizer, top_k=2).train()
    settings = RealmPretrainingSettings(refresh_index_every=refresh_every, min_sentence_words=3)
    options = dict(max_steps=4, batch_size=2, learning_rate=1e-3, logging_steps=1, save_steps=2)
    trainer = pretrain_realm(
        model, tokenizer, DOCUMENTS, output_dir=output, settings=settings, disable_tqdm=True, use_cpu=True,
        **{**options, **kwargs},
    )  # fmt: skip
    return trainer


def test_pretrained_checkpoint_feeds_open_qa(tokenizer, tmp_path):
    trainer = _pretrain(tokenizer, tmp_path / "pretrained", refresh_every=2)
    pretrained = trainer.model.eval()
    assert trainer.state.global_step == 4
    assert type(AutoModel.from_pretrained(tmp_path / "pretrained")).__name__ == "RealmForMaskedLM"
    qa = open_qa_from_pretraining(tmp_path / "pretrained", **QA_SETTINGS)
    for side in ("query_embedder", "doc_embedder"):
        expected = getattr(pretrained, side).state_dict()
        assert all(torch.equal(t, expected[n]) for n, t in getattr(qa, side).state_dict().items()), side
    index = DocumentIndex.build(DOCUMENTS, qa, tokenizer, show_progress=False)
    reference = DocumentIndex.build(DOCUMENTS, pretrained, tokenizer, show_progress=False)
    assert torch.equal(index.embeddings, reference.embeddings)  # the open-QA retriever is the pre-trained one
    plain = RealmForOpenQA.from_retriever_and_reader(
        tmp_path / "pretrained" / "retriever", tmp_path / "pretrained" / "reader", max_doc_embed_length=32,
        max_question_length=24, **QA_SETTINGS,
    )  # fmt: skip
    reader = pretrained.encoder.base_model.state_dict()
    assert all(torch.equal(t, reader[n]) for n, t in plain.reader.state_dict().items() if n in reader)
    rows = datasets.Dataset.from_list(
        [{"question": q["question"], "answers": normalize_answers(q["answers"])} for q in QUESTIONS]
    )
    fine_tuned = train_realm(qa, tokenizer, index, rows, output_dir=tmp_path / "qa", max_steps=2,
                             disable_tqdm=True, use_cpu=True)  # fmt: skip
    assert fine_tuned.state.global_step == 2
    result = qa.answer(["what is the capital of france"], index, tokenizer)[0]
    text = {d["id"]: d["text"] for d in DOCUMENTS}[result["doc_id"]]
    assert text[result["start"] : result["end"]] == result["answer"] and result["answer"]


def test_a_stopped_pretraining_resumes_to_the_same_result(tokenizer, tmp_path):
    straight = _pretrain(tokenizer, tmp_path / "straight", learning_rate=1e-4)
    with pytest.raises(Killed):
        _pretrain(tokenizer, tmp_path / "run", callbacks=[KillAfter(3)], learning_rate=1e-4)
    scratch = tmp_path / ".run.trainer"
    assert [c.name for c in scratch.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (scratch / "checkpoint-2" / INDEX_CHECKPOINT).is_file()
    with pytest.raises(
        ValueError, match="unfinished REALM pre-training.*learning_rate: 0.0001 then, 0.002 now"
    ):
        _pretrain(tokenizer, tmp_path / "run", learning_rate=2e-3)
    resumed = _pretrain(tokenizer, tmp_path / "run", learning_rate=1e-4)
    logged = [(e["loss"], e["index_staleness"]) for e in resumed.state.log_history if "loss" in e]
    expected = [(e["loss"], e["index_staleness"]) for e in straight.state.log_history if "loss" in e]
    assert len(logged) == 4  # 1-2 from the checkpoint's state, 3 and 4 trained again on its index
    assert [s for _, s in logged] == [s for _, s in expected] == [1, 2, 3, 4]  # never refreshed
    assert [loss for loss, _ in logged] == [loss for loss, _ in expected]
    a = AutoModel.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModel.from_pretrained(tmp_path / "run").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not scratch.exists()


def test_pretraining_on_given_examples_only(tokenizer, tmp_path):
    from hf_knnlm.open_qa.pretraining import masked_examples

    model = make_mlm_model(tokenizer, top_k=2).train()
    rows = masked_examples(
        DOCUMENTS, tokenizer, RealmPretrainingSettings(min_sentence_words=3), max_length=24
    )
    trainer = pretrain_realm(
        model, tokenizer, DOCUMENTS, output_dir=tmp_path / "out", examples=rows[:2], max_steps=1,
        batch_size=2, disable_tqdm=True, use_cpu=True, settings=NO_REFRESH,
    )  # fmt: skip
    summary = json.loads((tmp_path / "out" / "pretraining.json").read_text())
    assert summary["masked_sentences"] == 2 and trainer.state.global_step == 1
    with pytest.raises(ValueError, match="no sentence"):
        pretrain_realm(model, tokenizer, DOCUMENTS, output_dir=tmp_path / "none", examples=[], max_steps=1)


def test_retriever_learning_rate_zero_keeps_the_retriever(tokenizer, tmp_path):
    trainer = _pretrain(tokenizer, tmp_path / "out", retriever_learning_rate=0.0, save_steps=None)
    model = trainer.model
    start = make_mlm_model(tokenizer, top_k=2)  # the same seeded weights _pretrain started from
    for name in ("query_embedder", "doc_embedder", "encoder"):
        now, then = getattr(model, name).state_dict(), getattr(start, name).state_dict()
        same = all(torch.equal(now[key], then[key]) for key in now)
        assert same == (name != "encoder"), name  # the encoder trains at learning_rate
    lrs = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert lrs[0] == 0.0
    with pytest.raises(ValueError, match="retriever_learning_rate=-1.0 must be a finite number >= 0"):
        _pretrain(tokenizer, tmp_path / "bad", retriever_learning_rate=-1.0)
