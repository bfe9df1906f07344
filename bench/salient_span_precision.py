"""Precision of the salient-span rule set (hf_knnlm.open_qa.pretraining.spans) on SQuAD v1.1 dev paragraphs.

Draws 52 paragraphs of ``squad/dev-v1.1.reconstructed.json`` with ``random.Random(1)``, one span of each that
has any, and prints them with their hand label: 1 when the span is a named entity (person, organisation,
place, nationality or group, event, work, named law or product), a date or a number *with the right
boundaries*, 0 otherwise. The labels were assigned by reading the printed contexts; rerun after changing
the rules and the spans change (then label the new sample again).

    python bench/salient_span_precision.py
"""

from __future__ import annotations

import json
import random

from _common import shared_path

from hf_knnlm.open_qa.pretraining.spans import salient_spans

# Hand labels of the 50 spans this script prints (in order), for the rules as committed.
LABELS = [1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
LABELS += [1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1]


def sample(seed: int = 1, paragraphs: int = 52) -> list[tuple[str, str]]:
    data = json.loads(shared_path("squad", "dev-v1.1.reconstructed.json").read_text(encoding="utf-8"))
    contexts = [p["context"] for article in data["data"] for p in article["paragraphs"]]
    rng = random.Random(seed)
    spans = []
    for context in rng.sample(contexts, paragraphs):
        found = salient_spans(context)
        if found:
            start, end, kind = rng.choice(found)
            spans.append(
                (
                    f"{context[max(0, start - 40) : start]}[[{context[start:end]}]]{context[end : end + 25]}",
                    kind,
                )
            )
    return spans


def main() -> None:
    spans = sample()
    for (context, kind), label in zip(spans, LABELS, strict=True):
        print(label, f"{kind:7s}", repr(context))
    by_kind: dict[str, list[int]] = {}
    for (_, kind), label in zip(spans, LABELS, strict=True):
        by_kind.setdefault("entity" if kind == "entity" else "date/number", []).append(label)
    print(f"precision: {sum(LABELS)}/{len(LABELS)} = {sum(LABELS) / len(LABELS):.0%}")
    for kind, labels in sorted(by_kind.items()):
        print(f"  {kind}: {sum(labels)}/{len(labels)}")


if __name__ == "__main__":
    main()
