"""In-Context RALM, REPLUG and FLARE on tiny random models, against exact references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from hf_knnlm.knnlm import evaluate_perplexity
from hf_knnlm.rag import (
    InContextRALMProcessor,
    REPLUGProcessor,
    evaluate_retrieval_perplexity,
    flare_generate,
)
from hf_knnlm.retrieval.retriever import document_text

WINDOWS = dict(max_length=48, stride=16, batch_size=4, disable_progress=True)
PASSAGES = [
    "The king sees the bridge. The fool sells a silver crown.",
    "A merchant crosses the northern road!",
]


class FixedRetriever:
    """Returns the same passages (with the given scores) for every query; counts its calls."""

    def __init__(self, doc_ids: list[int], scores: list[float] | None = None, texts=PASSAGES) -> None:
        self.titles, self.texts = [""] * len(texts), list(texts)
        self.doc_ids = doc_ids
        self.scores = scores or [1.0] * len(doc_ids)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries, k):
        self.calls += 1
        ids = np.tile(np.array(self.doc_ids[:k], dtype=np.int64), (len(queries), 1))
        return np.tile(np.array(self.scores[:k], dtype=np.float32), (len(queries), 1)), ids


def test_empty_retriever_ralm_equals_base_model(model, tokenizer, other_text):
    base = evaluate_perplexity(model, tokenizer, [other_text], **WINDOWS)
    result = evaluate_retrieval_perplexity(model, tokenizer, [other_text], FixedRetriever([-1]), **WINDOWS)
    assert result["retrieved_fraction"] == 0.0 and result["forward_tokens"] == 0
    assert result["ppl"] == result["base_ppl"] == base["base_ppl"]
    assert result["num_tokens"] == base["num_tokens"]


def _prefixed_reference(model, tokenizer, text: str, doc: int) -> float:
    """Perplexity with every target scored by one plain forward over passage ⊕ its window context."""
    from hf_knnlm.lm.windows import sliding_windows

    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    passage = tokenizer(document_text("", PASSAGES[doc]), add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in sliding_windows(len(tokens), WINDOWS["max_length"], WINDOWS["stride"]):
            for t in range(w.first_target, w.end):
                ids = torch.tensor([passage + tokens[w.begin : t]])
                nll -= torch.log_softmax(model(ids).logits[0, -1].double(), -1)[tokens[t]].item()
                count += 1
    return math.exp(nll / count)


@pytest.mark.slow
def test_replug_k1_equals_lm_on_document_prefixed_input(model, tokenizer, other_text):
    text = other_text[:300]
    replug = evaluate_retrieval_perplexity(
        model, tokenizer, [text], FixedRetriever([1]), num_documents=1, **WINDOWS
    )
    assert replug["retrieved_fraction"] == 1.0
    assert replug["ppl"] == pytest.approx(_prefixed_reference(model, tokenizer, text, 1), rel=1e-5)
    assert replug["ppl"] != pytest.approx(replug["base_ppl"], rel=1e-3)  # the passage changed something


def test_replug_mixes_in_probability_space(model, tokenizer, other_text):
    text = other_text[:300]
    run = dict(retrieval_stride=None, **WINDOWS)
    p0 = evaluate_retrieval_perplexity(model, tokenizer, [text], FixedRetriever([0]), **run)["ppl"]
    both = FixedRetriever([0, 1], scores=[5.0, 5.0])
    mixed = evaluate_retrieval_perplexity(model, tokenizer, [text], both, num_documents=2, **run)["ppl"]
    p1 = evaluate_retrieval_perplexity(model, tokenizer, [text], FixedRetriever([1]), **run)["ppl"]
    assert mixed != p0 and mixed != p1
    # Jensen: the mixture's log-likelihood is at least the mean of the two log-likelihoods.
    assert math.log(mixed) <= (math.log(p0) + math.log(p1)) / 2 + 1e-9


def test_knn_ralm_with_lambda_zero_is_ralm(model, tokenizer, other_text, store):
    retriever = FixedRetriever([0])
    result = evaluate_retrieval_perplexity(
        model, tokenizer, [other_text[:300]], retriever, datastore=store, k=8, lmbda=0.0, **WINDOWS
    )
    assert result["knn_ralm_ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    assert result["knn_ppl"] == pytest.approx(result["base_ppl"], rel=1e-6)
    with pytest.raises(ValueError, match="num_documents=1"):
        evaluate_retrieval_perplexity(
            model, tokenizer, ["a b c"], retriever, num_documents=2, datastore=store
        )


def _prompt(tokenizer, text="The king sees"):
    return tokenizer(text, return_tensors="pt")


def test_replug_processor_k1_is_the_lm_reading_the_passage(model, tokenizer):
    inputs = _prompt(tokenizer)
    replug = REPLUGProcessor(model, tokenizer, FixedRetriever([0]), k=1)
    out = model.generate(
        **inputs, max_new_tokens=6, do_sample=False, logits_processor=LogitsProcessorList([replug])
    )
    passage = tokenizer(document_text("", PASSAGES[0]), add_special_tokens=False)["input_ids"]
    prefixed = torch.tensor([passage + inputs["input_ids"][0].tolist()])
    reference = model.generate(
        input_ids=prefixed, attention_mask=torch.ones_like(prefixed), max_new_tokens=6, do_sample=False
    )
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == reference[0, prefixed.shape[1] :].tolist()

    first = REPLUGProcessor(model, tokenizer, FixedRetriever([0]), k=1)
    scores = first(inputs["input_ids"], torch.zeros(1, len(tokenizer)))
    expected = torch.log_softmax(model(prefixed).logits[0, -1], -1)
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-5)


def test_replug_processor_ensemble_and_banned_tokens(model, tokenizer):
    inputs = _prompt(tokenizer)
    replug = REPLUGProcessor(
        model, tokenizer, FixedRetriever([0, 1], scores=[2.0, 1.0]), k=2, temperature=0.5
    )
    incoming = torch.zeros(1, len(tokenizer))
    incoming[0, 5] = -math.inf
    scores = replug(inputs["input_ids"], incoming)
    weights = torch.log_softmax(torch.tensor([4.0, 2.0]), 0)
    per_doc = []
    for doc in (0, 1):
        passage = tokenizer(document_text("", PASSAGES[doc]), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([passage + inputs["input_ids"][0].tolist()])
        per_doc.append(torch.log_softmax(model(ids).logits[0, -1], -1))
    expected = torch.logsumexp(weights[:, None] + torch.stack(per_doc), 0)
    expected[5] = -math.inf
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-5)


def test_ralm_processor_retrieves_every_stride_and_empty_is_base(model, tokenizer):
    inputs = _prompt(tokenizer)
    spy = FixedRetriever([-1])
    ralm = InContextRALMProcessor(model, tokenizer, spy, retrieval_stride=3)
    out = model.generate(
        **inputs, max_new_tokens=7, do_sample=False, logits_processor=LogitsProcessorList([ralm])
    )
    base = model.generate(**inputs, max_new_tokens=7, do_sample=False)
    assert out.tolist() == base.tolist()
    assert spy.calls == ralm.num_retrievals == 3  # at the prompt, after 3 and after 6 new tokens


def test_processors_handle_left_padded_batches(model, tokenizer):
    texts = ["The king sees", "A merchant crosses the northern"]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    together = model.generate(
        **batch,
        max_new_tokens=5,
        do_sample=False,
        logits_processor=LogitsProcessorList(
            [REPLUGProcessor(model, tokenizer, FixedRetriever([1, 0]), k=2)]
        ),
    )
    for row, text in enumerate(texts):
        alone = model.generate(
            **_prompt(tokenizer, text),
            max_new_tokens=5,
            do_sample=False,
            logits_processor=LogitsProcessorList(
                [REPLUGProcessor(model, tokenizer, FixedRetriever([1, 0]), k=2)]
            ),
        )
        assert together[row, -5:].tolist() == alone[0, -5:].tolist()


def test_flare_threshold_zero_never_retrieves(model, tokenizer):
    spy = FixedRetriever([0])
    out = flare_generate(
        model, tokenizer, spy, "The king sees", threshold=0.0, max_new_tokens=12, max_sentence_tokens=4
    )
    assert spy.calls == 0 and out.num_retrievals == 0 and len(out.steps) >= 3
    base = model.generate(**_prompt(tokenizer), max_new_tokens=12, do_sample=False)
    assert out.sequences.tolist() == base.tolist()


def test_flare_threshold_one_retrieves_every_sentence(model, tokenizer):
    spy = FixedRetriever([1])
    out = flare_generate(
        model, tokenizer, spy, "The king sees", threshold=1.0, max_new_tokens=8, max_sentence_tokens=4
    )
    assert spy.calls == out.num_retrievals == len(out.steps) >= 2
    assert all(step.doc_ids == [1] and step.query for step in out.steps)
    with pytest.raises(ValueError, match="threshold"):
        flare_generate(model, tokenizer, spy, "x", threshold=1.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_documents": 0}, "num_documents"),
        ({"retrieval_stride": 0}, "retrieval_stride"),
        ({"document_temperature": 0.0}, "document_temperature"),
        ({"temperature": 0.0}, "temperature"),
        ({"max_length": 256}, "positions"),
    ],
)
def test_bad_settings_are_named(model, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_retrieval_perplexity(
            model, tokenizer, ["a b c d"], FixedRetriever([0]), **{**WINDOWS, **kwargs}
        )


RAG_MODULES = [
    "retrieval.chunking",
    "retrieval.bm25",
    "retrieval.dense",
    "rag.logits_process",
    "rag.flare",
    "rag.qa",
]


@pytest.mark.parametrize("name", RAG_MODULES)
def test_docstring_examples_run(name, monkeypatch):
    """The Examples blocks run as written; "gpt2" is served from the shared GPT-2 tokenizer files."""
    import doctest
    import importlib

    from transformers import AutoTokenizer

    try:
        from tests.conftest import SHARED_DATA, require
        from tests.test_docstrings import FencedDocTestParser
    except ImportError:  # tests/ on sys.path rather than importable as a package
        from conftest import SHARED_DATA, require
        from test_docstrings import FencedDocTestParser

    local = SHARED_DATA / "gpt2-tokenizer"
    require(local.is_dir(), f"{local} is missing (the shared data folder holds the GPT-2 tokenizer)")
    load = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(
        AutoTokenizer,
        "from_pretrained",
        classmethod(lambda cls, name, *a, **kw: load(cls, local if name == "gpt2" else name, *a, **kw)),
    )
    module = importlib.import_module(f"hf_knnlm.{name}")
    finder = doctest.DocTestFinder(parser=FencedDocTestParser(), exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    assert tests, f"{module.__name__} has no docstring examples"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {module.__name__} failed"


def test_ralm_answers_equal_the_processor(model, tokenizer):
    """answer_questions reads the top passage from a prefixed prompt; the processor gives the same answers."""
    from hf_knnlm.rag import answer_questions
    from hf_knnlm.rag.qa import PROMPT

    questions = ["Who sees the bridge?", "What does the merchant cross?"]
    answers = answer_questions(
        model, tokenizer, questions, method="ralm", retriever=FixedRetriever([1]), show_progress=False
    )
    for question, answer in zip(questions, answers, strict=True):
        prompt = tokenizer(PROMPT.format(question=question), return_tensors="pt")
        ralm = InContextRALMProcessor(model, tokenizer, FixedRetriever([1]), retrieval_stride=None)
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False, logits_processor=[ralm])
        text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == text.split("\n")[0].strip()


@pytest.mark.parametrize("method", ["closed_book", "replug"])
def test_answers_come_back_in_the_questions_order(model, tokenizer, method):
    """Batches are formed longest first; answers map back to their questions whatever the input order."""
    from hf_knnlm.rag import answer_questions

    questions = ["Who?", "Who sees the bridge and the silver crown?", "What does the merchant cross?", "Why?"]
    common = dict(method=method, retriever=FixedRetriever([1, 0]), k=2, batch_size=2, show_progress=False)
    forward = answer_questions(model, tokenizer, questions, **common)
    backward = answer_questions(model, tokenizer, questions[::-1], **common)
    assert backward == forward[::-1]  # the same batches either way (rows sorted by length), mapped back
