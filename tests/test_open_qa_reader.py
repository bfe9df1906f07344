"""Reader warm-start, QA checkpoints as REALM readers, reading in windows, workers (offline, tiny BERTs)."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertTokenizerFast, TrainerCallback

from hf_knnlm.open_qa import (
    DocumentIndex,
    RealmDataCollator,
    RealmForOpenQA,
    RealmTokenizerPair,
    build_features,
    precompute_retrieval,
    prepare_reader_features,
    train_reader,
    train_realm,
)
from hf_knnlm.open_qa.heads import mask_spans

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests import open_qa_utils as utils
except ImportError:
    import open_qa_utils as utils

DOCUMENTS, QUESTIONS = utils.DOCUMENTS, utils.QUESTIONS
make_tokenizer, pipeline_best_span = utils.make_tokenizer, utils.pipeline_best_span
save_encoder, save_qa_checkpoint = utils.save_encoder, utils.save_qa_checkpoint
KillAfter, Killed = utils.KillAfter, utils.Killed

SMALL = dict(
    retriever_proj_size=16,
    top_k=3,
    max_span_width=4,
    max_question_length=16,
    max_reader_length=48,
    max_doc_embed_length=32,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = make_tokenizer(root / "tokenizer")
    return {
        "tokenizer": tokenizer,
        "encoder": save_encoder(tokenizer, root / "encoder"),
        "qa": save_qa_checkpoint(tokenizer, root / "qa"),
    }


def _qa_model(folders, **kwargs) -> RealmForOpenQA:
    settings = {**SMALL, **kwargs}
    return RealmForOpenQA.from_retriever_and_reader(folders["encoder"], folders["qa"], **settings).eval()


def test_qa_checkpoint_reader_picks_the_pipeline_span_on_the_gold_paragraph(folders):
    tokenizer = folders["tokenizer"]
    model = _qa_model(folders)
    assert model.config.reader_head == "start_end"
    reference = AutoModelForQuestionAnswering.from_pretrained(folders["qa"]).eval()
    index = DocumentIndex.build(DOCUMENTS, model, tokenizer, show_progress=False)
    compared = 0
    for question in (q["question"] for q in QUESTIONS):
        for position, document in enumerate(DOCUMENTS):
            features, meta = build_features(model, tokenizer, index, [question], [[position]])
            assert features["window_doc"].shape[1] == 1  # the paragraph fits in one window
            got = model.decode(features, meta)[0]
            start, end = pipeline_best_span(
                reference, tokenizer, question, document["text"], max_answer_len=4
            )
            assert (got["start"], got["end"]) == (start, end), (question, document["id"])
            assert got["answer"] == document["text"][start:end] and got["doc_id"] == document["id"]
            compared += 1
    assert compared == len(QUESTIONS) * len(DOCUMENTS)


def test_long_documents_are_read_in_windows_and_answers_aggregated(folders, monkeypatch):
    tokenizer = folders["tokenizer"]
    # 16-token windows: the question takes 8 and a document of 12 words needs several windows.
    model = _qa_model(folders, max_reader_length=16, max_question_length=8, top_k=6)
    index = DocumentIndex.build(DOCUMENTS, model, tokenizer, show_progress=False)
    question = "what is the capital of france"
    features, meta = build_features(model, tokenizer, index, [question], [[0, 1]])
    windows = features["window_doc"][0]
    assert (windows == 0).sum() >= 2 and (windows == 1).sum() >= 2
    covered = {
        (start, end)
        for w, offsets in enumerate(meta["offsets"][0])
        if int(windows[w]) == 0
        for t, (start, end) in enumerate(offsets)
        if features["doc_mask"][0, w, t]
    }
    words = tokenizer(DOCUMENTS[0]["text"], add_special_tokens=False, return_offsets_mapping=True)
    assert set(map(tuple, words["offset_mapping"])) == covered

    # A reader that only likes the token "seine" (near the end of the paris document, outside its first
    # window): answer() must find it across windows and documents and give its character offsets.
    seine = tokenizer.convert_tokens_to_ids("seine")

    def span_scores(inputs, doc_mask):
        start = (inputs["input_ids"] == seine).float() * 20.0
        scores = start.unsqueeze(-1).expand(-1, -1, model.config.max_span_width).clone()
        scores[..., 1:] = 0.0
        return mask_spans(scores, doc_mask, model.config.max_span_width)

    monkeypatch.setattr(model, "_span_scores", span_scores)
    result = model.answer([question], index, tokenizer, top_k=6)[0]
    text = DOCUMENTS[0]["text"]
    assert result["answer"] == "seine" and result["doc_id"] == "paris"
    assert (result["start"], result["end"]) == (text.index("seine"), text.index("seine") + 5)
    assert sorted(result["doc_ids"]) == sorted(d["id"] for d in DOCUMENTS)


def test_span_probabilities_normalise_over_all_windows_of_a_document(folders):
    tokenizer = folders["tokenizer"]
    model = _qa_model(folders, max_reader_length=16, max_question_length=8)
    index = DocumentIndex.build(DOCUMENTS, model, tokenizer, show_progress=False)
    features, _ = build_features(model, tokenizer, index, [q["question"] for q in QUESTIONS], [[0, 1, 2]] * 4)
    with torch.no_grad():
        out = model(**features)
    log_p_doc = torch.log_softmax(out.retriever_logits, dim=-1)
    window_doc = features["window_doc"]
    for b in range(window_doc.shape[0]):
        for z in range(3):
            rows = (window_doc[b] == z).nonzero().flatten()
            assert rows.numel() >= 1
            log_p_span = out.joint_log_probs[b, rows] - log_p_doc[b, z]
            assert torch.logsumexp(log_p_span.flatten(), 0).item() == pytest.approx(0.0, abs=1e-4)


def test_answer_labels_follow_windows(folders):
    tokenizer = folders["tokenizer"]
    model = _qa_model(folders, max_reader_length=16, max_question_length=8)
    index = DocumentIndex.build(DOCUMENTS, model, tokenizer, show_progress=False)
    features, _ = build_features(
        model, tokenizer, index, ["which river flows through paris"], [[0]], answers=[["seine river"]]
    )
    ids, starts, ends = (
        features["reader_input_ids"][0],
        features["answer_starts"][0],
        features["answer_ends"][0],
    )
    labelled = 0
    for w in range(ids.shape[0]):
        document_part = tokenizer.decode(ids[w][features["doc_mask"][0, w]])
        for start, end in zip(starts[w].tolist(), ends[w].tolist(), strict=True):
            if start >= 0:
                assert tokenizer.decode(ids[w, start : end + 1]) == "seine river"
                labelled += 1
        assert ("seine river" in document_part) == (starts[w, 0] >= 0), document_part
    assert labelled >= 1


def test_prepare_reader_features_windows_and_positions(folders):
    tokenizer = folders["tokenizer"]
    context = DOCUMENTS[0]["text"]
    examples = {
        "question": ["which river flows through paris", "what is the capital of france"],
        "context": [context, context],
        "answers": [{"text": ["seine"], "answer_start": [context.index("seine")]}, ["paris"]],
    }
    features = prepare_reader_features(examples, tokenizer, max_length=16, doc_stride=4)
    assert len(features["input_ids"]) > 2  # overflowing windows
    found = {0: 0, 1: 0}
    for i, ids in enumerate(features["input_ids"]):
        start, end = features["start_positions"][i], features["end_positions"][i]
        sample = (
            features["overflow_to_sample_mapping"][i] if "overflow_to_sample_mapping" in features else None
        )
        if start == 0:
            assert end == 0  # the window does not hold the answer: [CLS]
            continue
        text = tokenizer.decode(ids[start : end + 1])
        assert text in ("seine", "paris"), text
        found[0 if text == "seine" else 1] += 1
        assert sample is None
    assert found[0] >= 1 and found[1] >= 1
    assert features["length"] == [len(ids) for ids in features["input_ids"]]


def _reader_rows():
    rows = []
    for q in QUESTIONS:
        answers = q["answers"]["text"] if isinstance(q["answers"], dict) else q["answers"]
        gold = next(d for d in DOCUMENTS if answers[0] in d["text"])
        rows.append({"question": q["question"], "context": gold["text"], "answers": answers})
    return datasets.Dataset.from_list(rows)


@pytest.mark.slow
def test_train_reader_saves_a_standard_qa_checkpoint_that_learns(folders, tmp_path):
    tokenizer = folders["tokenizer"]
    rows = _reader_rows()
    trainer = train_reader(
        str(folders["encoder"]),
        rows,
        output_dir=tmp_path / "reader",
        max_length=48,
        doc_stride=8,
        max_steps=60,
        batch_size=4,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
    )
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] / 4
    model, info = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "reader", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path / "reader"), BertTokenizerFast)
    right = 0
    for row in rows:
        start, end = pipeline_best_span(model.eval(), tokenizer, row["question"], row["context"], 15)
        right += row["context"][start:end] in row["answers"]
    assert right == len(rows)
    assert not (tmp_path / ".reader.trainer").exists()  # the Trainer's scratch folder is gone


def test_train_reader_callbacks_see_each_epoch_checkpoint(folders, tmp_path):
    seen = []

    class Probe(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            folder = tmp_path / f"reader-epoch-{round(state.epoch)}"
            losses = sum("loss" in e for e in state.log_history)
            seen.append((round(state.epoch), (folder / "model.safetensors").is_file(), losses))

    trainer = train_reader(
        str(folders["encoder"]),
        _reader_rows(),
        output_dir=tmp_path / "reader",
        max_length=48,
        doc_stride=8,
        epochs=2,
        batch_size=4,
        logging_steps=0.5,  # a ratio: one loss per epoch here, where an integer 50 would log none
        save_every_epoch=True,
        callbacks=[Probe()],
        disable_tqdm=True,
        use_cpu=True,
    )
    assert trainer.state.max_steps % 2 == 0 and trainer.state.max_steps < 50
    assert seen == [(1, True, 1), (2, True, 2)]
    assert AutoModelForQuestionAnswering.from_pretrained(tmp_path / "reader-epoch-2") is not None


def _resumable(folders, output, **kwargs):
    settings = dict(max_length=48, doc_stride=8, max_steps=6, batch_size=4, save_steps=2, logging_steps=1)
    return train_reader(
        str(folders["encoder"]), _reader_rows(), output_dir=output, disable_tqdm=True, use_cpu=True,
        **{**settings, **kwargs},
    )  # fmt: skip


def test_a_stopped_reader_training_resumes_from_its_checkpoint(folders, tmp_path):
    straight = _resumable(folders, tmp_path / "straight")
    with pytest.raises(Killed):
        _resumable(folders, tmp_path / "reader", callbacks=[KillAfter(5)])
    scratch = tmp_path / ".reader.trainer"
    assert sorted(c.name for c in scratch.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (tmp_path / "reader").exists()
    with pytest.raises(ValueError, match="learning_rate: 0.0001 then, 0.002 now.*delete"):
        _resumable(folders, tmp_path / "reader", learning_rate=2e-3)
    resumed = _resumable(folders, tmp_path / "reader")
    losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert losses == pytest.approx([e["loss"] for e in straight.state.log_history if "loss" in e])
    a = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "reader").state_dict()
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)
    assert not scratch.exists()


def test_a_second_reader_training_into_the_same_folder_is_refused(folders, tmp_path):
    from hf_knnlm.utils.files import FolderInUseError, folder_lock

    with folder_lock(tmp_path / "reader", ".train"), pytest.raises(FolderInUseError, match="another writer"):
        _resumable(folders, tmp_path / "reader")
    with pytest.raises(ValueError, match="save_steps=0"):
        _resumable(folders, tmp_path / "reader", save_steps=0)


def test_train_reader_rejects_bad_input(folders, tmp_path):
    with pytest.raises(ValueError, match="missing \\['context'\\]"):
        train_reader(
            str(folders["encoder"]),
            datasets.Dataset.from_list([{"question": "q", "answers": ["a"]}]),
            output_dir=tmp_path / "r",
        )
    with pytest.raises(ValueError, match="doc_stride=400"):
        train_reader(str(folders["encoder"]), _reader_rows(), output_dir=tmp_path / "r", doc_stride=400)


def test_save_reader_exports_the_qa_checkpoint(folders, tmp_path):
    model = _qa_model(folders)
    model.save_reader(tmp_path / "exported", folders["tokenizer"])
    loaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "exported")
    original = AutoModelForQuestionAnswering.from_pretrained(folders["qa"])
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    mlp = RealmForOpenQA.from_retriever_and_reader(folders["encoder"], folders["encoder"], **SMALL)
    assert mlp.config.reader_head == "mlp"
    with pytest.raises(ValueError, match="reader_head='start_end'"):
        mlp.save_reader(tmp_path / "mlp")


def test_round_trip_keeps_the_qa_reader(folders, tmp_path):
    model = _qa_model(folders)
    model.save_pretrained(tmp_path / "realm")
    loaded = RealmForOpenQA.from_pretrained(tmp_path / "realm").eval()
    assert loaded.config.reader_head == "start_end"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_separate_retriever_and_reader_tokenizers(folders, tmp_path):
    # A retriever tokenizer whose ids differ from the reader's: features must use each where it belongs.
    reader_tok = folders["tokenizer"]
    vocab = sorted(reader_tok.get_vocab(), key=lambda t: (t not in reader_tok.all_special_tokens, t[::-1]))
    retriever_tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    pair = RealmTokenizerPair(retriever_tok, reader_tok)
    pair.save_pretrained(tmp_path / "pair")
    loaded = RealmTokenizerPair.from_pretrained(tmp_path / "pair")
    assert loaded.retriever.get_vocab() == retriever_tok.get_vocab()
    assert loaded.reader.get_vocab() == reader_tok.get_vocab()
    assert isinstance(RealmTokenizerPair.from_pretrained(folders["qa"]), BertTokenizerFast)

    model = _qa_model(folders)
    index = DocumentIndex.build(DOCUMENTS, model, pair, show_progress=False)
    question = QUESTIONS[0]["question"]
    features, _ = build_features(model, pair, index, [question], [[0]])
    assert features["question_input_ids"][0].tolist() == retriever_tok(question)["input_ids"]
    assert reader_tok.decode(features["reader_input_ids"][0, 0], skip_special_tokens=True).startswith(
        question
    )
    assert model.answer([question], index, pair)[0]["doc_id"] in [d["id"] for d in DOCUMENTS]


def _train_rows():
    return datasets.Dataset.from_list(
        [
            {"question": q["question"], "answers": q["answers"]}
            for q in QUESTIONS
            if isinstance(q["answers"], dict)
        ]
    )


@pytest.mark.slow
def test_live_retrieval_is_refused_in_dataloader_workers(folders, tmp_path):
    tokenizer = folders["tokenizer"]
    model = _qa_model(folders)
    index = DocumentIndex.build(DOCUMENTS, model, tokenizer, show_progress=False)
    rows = _train_rows()
    collator = RealmDataCollator(model, tokenizer, index)
    loader = torch.utils.data.DataLoader(list(rows), batch_size=2, num_workers=1, collate_fn=collator)
    with pytest.raises(RuntimeError, match="stale weights"):
        next(iter(loader))
    with pytest.raises(ValueError, match="precompute_retrieval"):
        train_realm(
            model, tokenizer, index, rows, output_dir=tmp_path / "t", max_steps=1, dataloader_num_workers=1
        )
    # With the top-k precomputed, workers only build features: training runs.
    precomputed = precompute_retrieval(rows, model, tokenizer, index)
    trainer = train_realm(
        model,
        tokenizer,
        index,
        precomputed,
        output_dir=tmp_path / "t",
        max_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=1,
        use_cpu=True,
    )
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_retriever_frozen_steps_keep_the_query_encoder_fixed(folders, tmp_path):
    tokenizer = folders["tokenizer"]
    rows = _train_rows()

    def query_weights_after(frozen_steps):
        model = _qa_model(folders)
        index = DocumentIndex.build(DOCUMENTS, model, tokenizer, show_progress=False)
        before = [p.detach().clone() for p in model.query_embedder.parameters()]
        train_realm(
            model,
            tokenizer,
            index,
            rows,
            output_dir=tmp_path / "t",
            max_steps=3,
            retriever_frozen_steps=frozen_steps,
            disable_tqdm=True,
            use_cpu=True,
        )
        return all(torch.equal(a, b) for a, b in zip(before, model.query_embedder.parameters(), strict=True))

    assert query_weights_after(3)
    assert not query_weights_after(0)
