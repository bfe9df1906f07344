"""Attribution: which stored contexts made the kNN-LM predict a token, and where they came from.

For each generated (or scored) token w, the neighbours of its step with their weight in p_kNN
(softmax over -d / T, times merge counts), their value, and the source document and character span
of that value (recorded at build time). The weights of the neighbours whose value is w sum to
p_kNN(w); ``knn_share`` = lmbda p_kNN(w) / p(w) is how much of the final probability the datastore
contributed. The HTML view that shades a text by that share is
[`render_html`][hf_knnlm.render_html] (``attribution_view.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from ..datastore.neighbours import Neighbours
from .attribution_view import render_html  # noqa: F401 (the HTML view's old home)
from .logits_process import KNNProcessor
from .mixture import neighbour_weights
from .settings import KNNSettings


@dataclass
class NeighbourAttribution:
    entry: int
    token_id: int
    token: str
    weight: float  # share of p_kNN
    distance: float
    matches: bool  # its value is the explained token
    document: str | None = None
    char_start: int = -1
    char_end: int = -1
    context: str = ""
    span_text: str = ""


@dataclass
class TokenAttribution:
    token_id: int
    token: str
    prob: float  # the kNN-LM's probability of the token
    lm_prob: float
    knn_prob: float
    lmbda: float
    knn_share: float  # lmbda p_kNN / p
    neighbours: list[NeighbourAttribution] = field(default_factory=list)
    searched: bool = True


def attribute_step(
    datastore,
    tokenizer,
    neighbours: Neighbours,
    token_id: int,
    lm_log_prob: float,
    settings: KNNSettings,
    lmbda: float | None = None,
    top: int = 5,
) -> TokenAttribution:
    """The attribution of ``token_id`` from one step's neighbours (a single row)."""
    lmbda = settings.lmbda if lmbda is None else lmbda
    weights = neighbour_weights(neighbours, settings.temperature)[0].exp()
    ids, values = neighbours.ids[0], neighbours.token_ids[0]
    valid = ids >= 0
    knn_prob = float(weights[valid & (values == token_id)].sum())
    lm_prob = float(torch.tensor(lm_log_prob).exp())
    prob = lmbda * knn_prob + (1 - lmbda) * lm_prob
    order = torch.argsort(weights.masked_fill(~valid, -1.0), descending=True)[:top]
    rows = []
    for j in order.tolist():
        if not valid[j]:
            continue
        entry = int(ids[j])
        source = datastore.provenance.source(entry)
        rows.append(
            NeighbourAttribution(
                entry=entry,
                token_id=int(values[j]),
                token=tokenizer.decode([int(values[j])]),
                weight=float(weights[j]),
                distance=float(neighbours.distances[0, j]),
                matches=int(values[j]) == token_id,
                **(
                    {}
                    if source is None
                    else dict(
                        document=source.document,
                        char_start=source.char_start,
                        char_end=source.char_end,
                        context=source.context,
                        span_text=source.span_text,
                    )
                ),
            )
        )
    return TokenAttribution(
        token_id=token_id,
        token=tokenizer.decode([token_id]),
        prob=prob,
        lm_prob=lm_prob,
        knn_prob=knn_prob,
        lmbda=lmbda,
        knn_share=lmbda * knn_prob / prob if prob > 0 else 0.0,
        neighbours=rows,
        searched=bool(valid.any()),
    )


class _RecordingProcessor(KNNProcessor):
    """A KNNProcessor that keeps every step's neighbours, gate lmbda and LM log-probs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[Neighbours, torch.Tensor | None, torch.Tensor]] = []

    def neighbours(self, input_ids, queries, lm_log_probs):
        found, lmbda = super().neighbours(input_ids, queries, lm_log_probs)
        self.steps.append((found.to("cpu"), None if lmbda is None else lmbda.cpu(), lm_log_probs.cpu()))
        return found, lmbda


def explain_generation(
    model,
    tokenizer,
    datastore,
    prompt: str,
    *,
    max_new_tokens: int = 20,
    settings: KNNSettings | None = None,
    gate=None,
    top: int = 5,
    **overrides,
) -> tuple[list[TokenAttribution], str]:
    """Greedy kNN-LM generation from ``prompt`` with an attribution for every new token.

    Args:
        model (`PreTrainedModel`): the model that built ``datastore``.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (decodes tokens and neighbours).
        datastore (`Datastore`, `str` or `os.PathLike`): the store, or a folder /
            Hub repo id to load one from.
        prompt (`str`): the text to continue.
        max_new_tokens (`int`, defaults to 20): tokens generated (greedily).
        settings (`KNNSettings`, *optional*): the kNN-LM (``overrides`` such
            as ``k=``, ``lmbda=`` change single fields); ``gate`` as in
            [`KNNProcessor`][hf_knnlm.KNNProcessor].
        top (`int`, defaults to 5): neighbours listed per token.

    Returns:
        `(attributions, generated_text)`: one attribution per new token (its ``prob``, ``lm_prob``,
        ``knn_prob``, ``knn_share`` = lmbda p_kNN / p, and its ``top`` neighbours with their weight in
        p_kNN, value and source ``document`` / span), and the decoded new tokens.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import explain_generation
    >>> corpus = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("store", corpus)
    >>> attributions, text = explain_generation(model, tokenizer, store, "The cat", max_new_tokens=4,
    ...                                         k=4, lmbda=0.5)
    >>> text
    ' sat on the mat'
    >>> [(a.token, round(a.knn_share, 2)) for a in attributions]  # a random LM: the store decides
    [(' sat', 1.0), (' on', 1.0), (' the', 1.0), (' mat', 1.0)]
    >>> nearest = attributions[0].neighbours[0]
    >>> nearest.token, nearest.matches, nearest.document, nearest.span_text  # where ' sat' came from
    (' sat', True, 'texts[0]', ' sat')
    ```
    """
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty; pass the text to continue, e.g. prompt='The history of'.")
    with _RecordingProcessor(
        model, datastore, tokenizer=tokenizer, gate=gate, settings=KNNSettings.merge(settings, **overrides)
    ) as recorder:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([recorder]),
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        result = [
            attribute_step(
                datastore,
                tokenizer,
                found,
                token,
                float(lm[0, token]),
                recorder.settings,
                None if lam is None else float(lam[0]),
                top,
            )
            for token, (found, lam, lm) in zip(new, recorder.steps, strict=False)
        ]
    return result, tokenizer.decode(new)


def format_attribution(a: TokenAttribution) -> str:
    """Plain-text lines for the CLI."""
    head = (
        f"{a.token!r:>16}  p={a.prob:.3f}  LM={a.lm_prob:.3f}  kNN={a.knn_prob:.3f}  "
        f"kNN share={a.knn_share:.0%}" + ("" if a.searched else "  (no search)")
    )
    lines = [head]
    for n in a.neighbours:
        where = f"{n.document}[{n.char_start}:{n.char_end}]" if n.document else f"entry {n.entry}"
        mark = "*" if n.matches else " "
        context = (n.context[-50:] + "[" + n.span_text + "]").replace("\n", " ")
        lines.append(f"    {mark} {n.weight:.3f}  {n.token!r:<12} {where:<32} …{context}")
    return "\n".join(lines)
