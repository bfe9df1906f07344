"""Short answers from a causal LM: closed-book, In-Context RALM or REPLUG, greedy.

The question fills a prompt template; with retrieval, the bare question is the query (retrieved once) and
the passages are prepended to the prompt by the processor. The answer is the generated text up to the
first line break.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import BatchEncoding, LogitsProcessorList

from ..retrieval.retriever import Retriever, check_num_documents
from ..utils.checks import check_positive_int, check_text
from .logits_process import REPLUGProcessor
from .prefix import DocumentTokens, pad_token_id, tokens_containing

PROMPT = "Answer the question with a few words.\nQuestion: {question}\nAnswer:"
METHODS = ("closed_book", "ralm", "replug")


def _processor(method, model, tokenizer, retriever, questions, k, temperature, max_document_tokens):
    """REPLUG needs the processor (k copies per question); closed-book and In-Context RALM (one passage,
    retrieved once) are plain generation, the latter from passage-prefixed prompts (see ``_prefixes``)."""
    if method != "replug":
        return []
    common = dict(retrieval_stride=None, queries=questions, max_document_tokens=max_document_tokens)
    return [REPLUGProcessor(model, tokenizer, retriever, k=k, temperature=temperature, **common)]


def _prefixes(method, retriever, questions, doc_tokens) -> list[list[int]]:
    """The top passage's tokens before each prompt (In-Context RALM retrieving once: the same input the
    processor would build, without running the model twice per step)."""
    if method != "ralm":
        return [[] for _ in questions]
    _, doc_ids = retriever.search(questions, 1)
    return [doc_tokens(int(doc)) for doc in doc_ids[:, 0]]


@torch.no_grad()
def answer_questions(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    method: str = "closed_book",
    retriever: Retriever | None = None,
    k: int = 4,
    temperature: float = 1.0,
    prompt: str = PROMPT,
    max_new_tokens: int = 16,
    max_document_tokens: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[str]:
    """Greedy short answers to ``questions``.

    Args:
        method: ``"closed_book"`` (the LM alone), ``"ralm"`` (In-Context RALM: the top passage) or
            ``"replug"`` (REPLUG ensemble of the top ``k`` passages, weights ``softmax(score/temperature)``).
        retriever: ``search(queries, k) -> (scores, doc_ids)``; the bare question is the query.
        prompt: a template with ``{question}``.

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    >>> from hf_knnlm.rag import BM25Retriever, answer_questions
    >>> lm = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2))
    >>> questions = ["Where did the cat sit?", "What do dogs do?"]
    >>> passages = BM25Retriever.build([{"text": "The cat sat on the mat."}, {"text": "Dogs bark."}])
    >>> answers = answer_questions(lm, AutoTokenizer.from_pretrained("gpt2"), questions, method="replug", k=2,
    ...                            retriever=passages, max_new_tokens=4, show_progress=False)
    >>> len(answers)
    2
    ```
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if "{question}" not in prompt:
        raise ValueError(f"prompt={prompt!r} has no '{{question}}' placeholder.")
    if method != "closed_book" and retriever is None:
        raise ValueError(f"method={method!r} reads passages: pass a retriever (or method='closed_book').")
    check_positive_int("batch_size", batch_size, "questions per generate call")
    check_positive_int("max_new_tokens", max_new_tokens, "tokens per answer")
    check_positive_int("max_document_tokens", max_document_tokens, "LM tokens per passage")
    if method == "replug":
        check_num_documents("k", k, retriever)
    questions = list(questions)
    for position, question in enumerate(questions):
        check_text(f"questions[{position}]", question, "Who wrote Hamlet?")
    doc_tokens = DocumentTokens(tokenizer, retriever, max_document_tokens) if retriever is not None else None
    pad = pad_token_id(tokenizer)
    stop = [t for t in [tokenizer.eos_token_id] if t is not None] + tokens_containing(tokenizer, ("\n",))
    device = next(model.parameters()).device
    prompts = tokenizer([prompt.format(question=q) for q in questions])["input_ids"]
    prefixes = _prefixes(method, retriever, questions, doc_tokens)
    rows = [prefix + row for prefix, row in zip(prefixes, prompts, strict=True)]
    # Batches of rows of about one length (longest first): left padding is computed like real tokens, in
    # the prompt pass and in every generated step's attention. Answers come back in the questions' order.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    answers: list[str] = [""] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc=method, disable=not show_progress):
        batch = order[start : start + batch_size]
        encoded = _encode([rows[i] for i in batch], pad).to(device)
        processors = _processor(
            method,
            model,
            tokenizer,
            retriever,
            [questions[i] for i in batch],
            k,
            temperature,
            max_document_tokens,
        )
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList(processors),
            eos_token_id=stop,
            pad_token_id=pad,
        )
        for i, row in zip(batch, output[:, encoded["input_ids"].shape[1] :], strict=True):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
    return answers


def _encode(rows: list[list[int]], pad: int) -> BatchEncoding:
    """Left-padded rows (``pad`` also where the tokenizer has no pad token, as GPT-2)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return BatchEncoding({"input_ids": ids, "attention_mask": mask})


__all__ = ["METHODS", "PROMPT", "answer_questions"]
