"""FLARE (Jiang et al., 2023): retrieve only when the LM is about to say something it is unsure of.

Generation goes one sentence at a time. The LM first writes a look-ahead sentence from the context alone;
if every token of it has probability at least ``threshold`` it is kept. Otherwise the sentence, with its
low-confidence tokens masked out (those below ``mask_threshold``), is the query: the top passages are
prepended to the context and the sentence is generated again, and the new one is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..retrieval.retriever import Retriever
from .prefix import DocumentTokens, max_positions, pad_token_id, tokens_containing

SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass
class FLAREStep:
    """One sentence: its look-ahead probabilities and, if it triggered retrieval, the query and passages."""

    look_ahead: list[int]
    min_probability: float
    retrieved: bool
    query: str | None = None
    doc_ids: list[int] | None = None
    sentence: list[int] = field(default_factory=list)


@dataclass
class FLAREOutput:
    """``sequences``: prompt + generated token ids ``[1, L]``; ``text``: the generated part;
    ``steps``: one ``FLAREStep`` per sentence.

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> model, tokenizer = tiny_causal_lm()  # a random 2-layer GPT-2, GPT-2's tokenizer
    >>> from hf_knnlm.rag import BM25Retriever, flare_generate
    >>> bm25 = BM25Retriever.build([{"text": "The cat sat on the mat."}, {"text": "Dogs bark."}])
    >>> out = flare_generate(model, tokenizer, bm25, "The cat", threshold=0.0, max_new_tokens=8)
    >>> out.sequences.shape[0], len(out.text) > 0, [step.retrieved for step in out.steps][:1]
    (1, True, [False])
    ```
    """

    sequences: torch.LongTensor
    text: str
    steps: list[FLAREStep]

    @property
    def num_retrievals(self) -> int:
        return sum(step.retrieved for step in self.steps)


@torch.no_grad()
def _sentence(model, tokenizer, context: list[int], max_tokens: int, stop_strings, generate_kwargs):
    """Generate up to one sentence after ``context``; its tokens and each token's probability."""
    ids = torch.tensor([context], device=next(model.parameters()).device)
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        eos_token_id=[t for t in [tokenizer.eos_token_id] if t is not None]
        + tokens_containing(tokenizer, tuple(stop_strings)),
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=pad_token_id(tokenizer),
        **generate_kwargs,
    )
    tokens = output.sequences[0, ids.shape[1] :]
    probs = torch.stack(
        [torch.softmax(s[0].float(), -1)[t] for s, t in zip(output.scores, tokens, strict=False)]
    )
    return tokens.tolist(), probs.cpu()


def flare_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    retriever: Retriever,
    prompt: str | torch.Tensor,
    *,
    threshold: float = 0.4,
    mask_threshold: float | None = None,
    num_documents: int = 1,
    max_new_tokens: int = 64,
    max_sentence_tokens: int = 32,
    max_document_tokens: int = 256,
    stop_strings: tuple[str, ...] = SENTENCE_ENDS,
    **generate_kwargs: Any,
) -> FLAREOutput:
    """FLARE-direct generation for one prompt.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        retriever: ``search(queries, k) -> (scores, doc_ids)``.
        prompt: text, or token ids ``[1, L]``.
        threshold (`float`, defaults to 0.4): retrieve when a look-ahead token's probability is below it;
            0 never retrieves (plain generation), 1 always does.
        mask_threshold (`float`, *optional*): look-ahead tokens below it are left out of the query
            (defaults to ``threshold``); if nothing is left, the whole sentence is the query.
        num_documents: passages prepended (best last, next to the context).
        max_new_tokens, max_sentence_tokens: total and per-sentence budgets.
        stop_strings: a sentence ends with a token containing one of these (or the end-of-text token).
        generate_kwargs: passed to ``model.generate`` for every sentence (greedy by default).

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> from hf_knnlm.rag import BM25Retriever, flare_generate
    >>> model, tokenizer = tiny_causal_lm()  # a random 2-layer GPT-2, GPT-2's tokenizer
    >>> bm25 = BM25Retriever.build([{"text": "The cat sat on the mat."}, {"text": "Dogs bark."}])
    >>> out = flare_generate(model, tokenizer, bm25, "The cat", threshold=0.0, max_new_tokens=8)
    >>> out.num_retrievals  # threshold 0: the LM is never unsure enough
    0
    ```
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be a probability in [0, 1] (e.g. 0.4).")
    mask_threshold = threshold if mask_threshold is None else mask_threshold
    if max_new_tokens < 1 or max_sentence_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} and max_sentence_tokens={max_sentence_tokens} must be >= 1."
        )
    generate_kwargs.setdefault("do_sample", False)
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
    else:
        prompt_ids = torch.as_tensor(prompt).reshape(-1).tolist()
    doc_tokens = DocumentTokens(tokenizer, retriever, max_document_tokens)
    limit = max_positions(model)
    generated: list[int] = []
    steps: list[FLAREStep] = []
    while len(generated) < max_new_tokens:
        budget = min(max_sentence_tokens, max_new_tokens - len(generated))
        context = (prompt_ids + generated)[-limit:]
        look_ahead, probs = _sentence(model, tokenizer, context, budget, stop_strings, generate_kwargs)
        if not look_ahead:
            break
        step = FLAREStep(look_ahead, float(probs.min()), bool((probs < threshold).any()))
        step.sentence = look_ahead
        if step.retrieved:
            confident = [t for t, p in zip(look_ahead, probs.tolist(), strict=True) if p >= mask_threshold]
            step.query = tokenizer.decode(confident or look_ahead, skip_special_tokens=True)
            _, doc_ids = retriever.search([step.query], num_documents)
            step.doc_ids = [d for d in doc_ids[0].tolist() if d >= 0]
            passages = [t for d in reversed(step.doc_ids) for t in doc_tokens(d)]
            step.sentence, _ = _sentence(
                model, tokenizer, (passages + context)[-limit:], budget, stop_strings, generate_kwargs
            )
        steps.append(step)
        generated += step.sentence
        if not step.sentence or step.sentence[-1] == tokenizer.eos_token_id:
            break
    sequences = torch.tensor([prompt_ids + generated])
    return FLAREOutput(sequences, tokenizer.decode(generated, skip_special_tokens=True), steps)


__all__ = ["FLAREOutput", "FLAREStep", "flare_generate"]
