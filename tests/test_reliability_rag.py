"""In-Context RALM, REPLUG, FLARE and retrieval QA: every argument is refused under the name the caller
used, empty prompts and questions are named (not an IndexError), booleans are no sizes."""

from __future__ import annotations

import pytest
import torch

from hf_knnlm import KNNLMForCausalLM
from hf_knnlm.rag import (
    BM25Retriever,
    InContextRALMProcessor,
    REPLUGProcessor,
    RetrievalSettings,
    answer_questions,
    evaluate_retrieval_perplexity,
    flare_generate,
)

DOCS = [{"text": "The king sees the bridge."}, {"text": "A knight follows the road."}, {"text": "A fool."}]


@pytest.fixture(scope="module")
def retriever():
    return BM25Retriever.build(DOCS)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_documents=True), "num_documents=True"),
        (dict(retrieval_stride=2.5), "retrieval_stride=2.5"),
        (dict(query_length=True), "query_length=True"),
        (dict(max_document_tokens=8.0), "max_document_tokens=8.0"),
        (dict(document_temperature=float("nan")), "document_temperature=nan"),
    ],
    ids=str,
)
def test_retrieval_settings_refuse_booleans_and_non_integers(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RetrievalSettings(**kwargs)


@pytest.mark.parametrize("k, name", [(0, "k=0"), (True, "k=True"), (5, "k=5")])
def test_replug_names_its_k_not_num_documents(model, tokenizer, retriever, k, name):
    with pytest.raises(ValueError, match=name) as info:
        REPLUGProcessor(model, tokenizer, retriever, k=k)
    assert "num_documents" not in str(info.value)


def test_more_documents_than_the_collection_holds_are_refused_by_the_callers_name(
    model, tokenizer, retriever, corpus_text
):
    windows = dict(max_length=64, stride=32, disable_progress=True)
    with pytest.raises(ValueError, match=r"num_documents=5 .* 3 documents"):
        evaluate_retrieval_perplexity(
            model, tokenizer, [corpus_text[:400]], retriever, num_documents=5, **windows
        )
    with pytest.raises(ValueError, match=r"num_documents=5 .* 3 documents"):
        flare_generate(model, tokenizer, retriever, "The king", num_documents=5, max_new_tokens=2)


@pytest.mark.parametrize("prompt", ["", torch.zeros(1, 0, dtype=torch.long)], ids=["text", "ids"])
def test_flare_names_an_empty_prompt(model, tokenizer, retriever, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        flare_generate(model, tokenizer, retriever, prompt, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(max_new_tokens=2.5), "max_new_tokens=2.5"), (dict(num_documents=True), "num_documents=True")],
)
def test_flare_refuses_non_integer_sizes(model, tokenizer, retriever, kwargs, name):
    with pytest.raises(ValueError, match=name):
        flare_generate(model, tokenizer, retriever, "The king", **{"max_new_tokens": 2, **kwargs})


def test_empty_prompts_outside_generate_are_named(model, tokenizer, retriever, store):
    """The processors called directly and the wrapper's forward (transformers' generate refuses an empty
    prompt itself)."""
    empty = torch.zeros(1, 0, dtype=torch.long)
    for processor in (
        InContextRALMProcessor(model, tokenizer, retriever),
        REPLUGProcessor(model, tokenizer, retriever, k=2),
    ):
        with pytest.raises(ValueError, match="input_ids has no tokens"):
            processor(empty, torch.zeros(1, len(tokenizer)))
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=4)
    with pytest.raises(ValueError, match="input_ids has no tokens"):
        wrapper(empty)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(questions=[""]), "questions\\[0\\]"),
        (dict(questions=[None]), "questions\\[0\\]"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(batch_size=2.5), "batch_size=2.5"),
        (dict(k=True), "k=True"),
        (dict(k=5), "k=5"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
    ],
    ids=str,
)
def test_answer_questions_refuses_arguments_by_name(model, tokenizer, retriever, kwargs, name):
    call = dict(
        questions=["who sees the bridge?"], method="replug", retriever=retriever, k=2, show_progress=False
    )
    call.update(kwargs)
    with pytest.raises(ValueError, match=name):
        answer_questions(model, tokenizer, call.pop("questions"), **call)


def test_the_knn_ralm_path_scores_a_pruned_store_as_evaluate_perplexity_does(
    model, tokenizer, store, retriever, other_text, tmp_path
):
    """p_kNN weighs each neighbour by its merge count in every method that reads a pruned store."""
    from hf_knnlm import compress_datastore, evaluate_perplexity

    pruned = compress_datastore(store, tmp_path / "pruned", prune_to=0.3)
    assert pruned.provenance.counts is not None and pruned.provenance.counts.max() > 1
    settings = dict(k=8, lmbda=0.5, temperature=1.0, max_length=64, stride=32, disable_progress=True)
    expected = evaluate_perplexity(model, tokenizer, [other_text], pruned, **settings).knn_ppl
    got = evaluate_retrieval_perplexity(
        model, tokenizer, [other_text], retriever, datastore=pruned, **settings
    )
    assert got.knn_ppl == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("row_batch_size", [0, 2.5])
def test_retrieval_perplexity_refuses_a_bad_row_batch_size(
    model, tokenizer, retriever, corpus_text, row_batch_size
):
    with pytest.raises(ValueError, match=f"row_batch_size={row_batch_size}"):
        evaluate_retrieval_perplexity(
            model, tokenizer, [corpus_text[:300]], retriever, row_batch_size=row_batch_size, max_length=64,
            stride=32, disable_progress=True,
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["ralm", "replug"])
def test_a_rag_processor_shared_by_two_threads_keeps_each_generation_apart(model, tokenizer, retriever, kind):
    """Thread A's second step continues A's generation when thread B's first step came in between: no
    extra retrieval, the same scores as A alone (the state of a generation is per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    def make():
        if kind == "ralm":
            return InContextRALMProcessor(model, tokenizer, retriever, retrieval_stride=4)
        return REPLUGProcessor(model, tokenizer, retriever, k=2)

    a = tokenizer("The king sees", return_tensors="pt")["input_ids"]
    a_next = torch.cat([a, a[:, -1:]], 1)
    b = tokenizer("A knight follows the", return_tensors="pt")["input_ids"]
    scores = torch.zeros(1, len(tokenizer))
    alone = make()
    alone(a, scores)
    expected = alone(a_next, scores)
    shared = make()
    with ThreadPoolExecutor(1) as thread_a, ThreadPoolExecutor(1) as thread_b:  # one worker thread each
        thread_a.submit(shared, a, scores).result()
        thread_b.submit(shared, b, scores).result()
        got = thread_a.submit(shared, a_next, scores).result()
    assert shared.num_retrievals == alone.num_retrievals + 1  # B's own retrieval, none again for A
    torch.testing.assert_close(got, expected)
