"""REALM pre-training: the marginal masked-LM loss, its gradients and the candidate set (tiny BERTs)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel

from hf_knnlm.open_qa.pretraining import RealmForMaskedLM, RealmMaskedLMConfig, RealmPretrainingCollator
from hf_knnlm.open_qa.pretraining.head_warmup import (
    head_parameters,
    head_warm_start,
    masked_lm_loss,
    null_document_batch,
)
from hf_knnlm.open_qa.pretraining.ict import ict_loss, ict_pairs, ict_warm_start

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import DOCUMENTS, make_tokenizer
    from tests.pretraining_utils import make_mlm_index, make_mlm_model, masked_row
except ImportError:
    from open_qa_utils import DOCUMENTS, make_tokenizer
    from pretraining_utils import make_mlm_index, make_mlm_model, masked_row


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


ROWS = [
    ("paris is the capital of france", ["paris"], 0),
    ("rome is the capital of italy and has the tiber river", ["rome", "tiber"], 2),
]


def _rows(tokenizer, source=True):
    return [masked_row(tokenizer, text, words, s if source else -1) for text, words, s in ROWS]


def _masked_ll(model, ids, labels, text_tokens=None):
    """Summed log-probabilities of the labelled tokens, from the plain masked LM on one input whose first
    ``text_tokens`` tokens are the masked text (token type 0) and the rest a document (type 1)."""
    types = [0] * (text_tokens or len(ids)) + [1] * (len(ids) - (text_tokens or len(ids)))
    logits = model.encoder(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(log_probs[i, t]) for i, t in enumerate(labels) if t != -100)


def test_gradient_reaches_query_and_document_encoders(tokenizer):
    model = make_mlm_model(tokenizer).train()
    index = make_mlm_index(model, tokenizer)
    batch = RealmPretrainingCollator(model, tokenizer, index)(_rows(tokenizer))
    model(**batch).loss.backward()
    for name in ("query_embedder", "doc_embedder", "encoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name + ".encoder.")] or [
            p.grad for n, p in model.named_parameters() if n.startswith(name + ".")
        ]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_one_document_loss_is_its_mlm_loss(tokenizer):
    model = make_mlm_model(tokenizer, top_k=1, null_document=False)
    index = make_mlm_index(model, tokenizer)
    rows = _rows(tokenizer)
    batch = RealmPretrainingCollator(model, tokenizer, index)(rows)
    with torch.no_grad():
        out = model(**batch)
        expected = []
        for b in range(len(rows)):
            ids = batch["joined_input_ids"][b, 0][batch["joined_attention_mask"][b, 0].bool()].tolist()
            labels = batch["labels"][b, 0][: len(ids)].tolist()
            reference = model.encoder(
                input_ids=torch.tensor([ids]),
                token_type_ids=batch["joined_token_type_ids"][b, 0, : len(ids)][None],
                labels=torch.tensor([labels]),
            )
            expected.append(float(reference.loss) * sum(t != -100 for t in labels))  # mean CE -> sum
    assert out.retriever_logits.shape == (2, 1)  # one candidate: p(z|x) = 1, log p(z|x) = 0
    assert float(out.loss) == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_null_document_alone_is_plain_mlm(tokenizer):
    model = make_mlm_model(tokenizer)
    row = _rows(tokenizer)[0]
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        out = model(
            input_ids=ids, joined_input_ids=ids[:, None], labels=torch.tensor([row["labels"]])[:, None]
        )
        plain = model.encoder(input_ids=ids, labels=torch.tensor([row["labels"]])).loss
    assert out.retriever_logits.tolist() == [[0.0]]
    assert float(out.loss) == pytest.approx(float(plain) * 1, abs=1e-5)  # one masked token


def test_marginal_equals_hand_computed_logsumexp(tokenizer):
    model = make_mlm_model(tokenizer)
    index = make_mlm_index(model, tokenizer)
    rows = _rows(tokenizer)
    collator = RealmPretrainingCollator(model, tokenizer, index)
    positions = collator.retrieve(rows)
    batch = collator(rows)
    with torch.no_grad():
        out = model(**batch)
        losses = []
        for row, hits in zip(rows, positions, strict=True):
            query = model.query_embedder(torch.tensor([row["input_ids"]]))[0]
            scores, lls = [], []
            for p in [*hits.tolist(), None]:
                if p is None:  # the null document: score 0, the masked text alone
                    scores.append(0.0)
                    lls.append(_masked_ll(model, row["input_ids"], row["labels"]))
                    continue
                doc = tokenizer(DOCUMENTS[p]["title"], DOCUMENTS[p]["text"])["input_ids"]
                doc_vec = model.doc_embedder(torch.tensor([doc]))[0]
                scores.append(2.0 * float(query @ doc_vec))
                joined = row["input_ids"] + doc[1:]
                labels = row["labels"] + [-100] * (len(doc) - 1)
                lls.append(_masked_ll(model, joined, labels, len(row["input_ids"])))
            norm = math.log(sum(math.exp(s) for s in scores))
            losses.append(-math.log(sum(math.exp(s - norm + ll) for s, ll in zip(scores, lls, strict=True))))
    assert out.retriever_logits.shape == (2, 4)  # top-3 + null
    assert float(out.loss) == pytest.approx(sum(losses) / len(losses), abs=1e-4)


def test_saved_model_loads_with_auto_model(tokenizer, tmp_path):
    model = make_mlm_model(tokenizer)
    index = make_mlm_index(model, tokenizer)
    batch = RealmPretrainingCollator(model, tokenizer, index)(_rows(tokenizer))
    model.save_pretrained(tmp_path / "mlm")
    loaded = AutoModel.from_pretrained(tmp_path / "mlm").eval()
    assert type(loaded) is RealmForMaskedLM
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)


def test_config_rejects_bad_switch():
    with pytest.raises(ValueError, match="null_document must be True or False"):
        RealmMaskedLMConfig(null_document="yes")


ICT_DOCS = [
    {"title": "France", "text": "Paris is the capital of France. Paris sits on the Seine river."},
    {"title": "Italy", "text": "Rome is the capital of Italy. Rome has the Tiber river."},
    {"title": "Austria", "text": "Vienna is the capital of Austria. Vienna is on the Danube river."},
]


def test_ict_loss_is_the_in_batch_cross_entropy(tokenizer):
    model = make_mlm_model(tokenizer)
    pairs = ict_pairs(ICT_DOCS, min_sentence_words=3, remove_probability=1.0)
    for pair, doc in zip(pairs, ICT_DOCS, strict=True):
        assert pair["query"] in doc["text"] and pair["query"] not in pair["text"]
    kept = ict_pairs(ICT_DOCS, min_sentence_words=3, remove_probability=0.0)
    assert [pair["text"] for pair in kept] == [doc["text"] for doc in ICT_DOCS]
    with torch.no_grad():
        loss = ict_loss(model, tokenizer, pairs)
        queries = [model.query_embedder(torch.tensor([tokenizer(p["query"])["input_ids"]]))[0] for p in pairs]
        docs = [
            model.doc_embedder(torch.tensor([tokenizer(p["title"], p["text"])["input_ids"]]))[0]
            for p in pairs
        ]
    expected = 0.0
    for i, query in enumerate(queries):
        scores = [2.0 * float(query @ doc) for doc in docs]
        expected -= scores[i] - math.log(sum(math.exp(s) for s in scores))
    assert float(loss) == pytest.approx(expected / 3, abs=1e-5)


def test_ict_warm_start_trains_the_retriever_only(tokenizer):
    model = make_mlm_model(tokenizer)
    encoder_before = {n: p.clone() for n, p in model.encoder.named_parameters()}
    query_before = model.query_embedder.projection.weight.clone()
    losses = ict_warm_start(model, tokenizer, ICT_DOCS, steps=30, batch_size=3, learning_rate=1e-2,
                            min_sentence_words=3)  # fmt: skip
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert not torch.equal(query_before, model.query_embedder.projection.weight)
    assert all(torch.equal(p, encoder_before[n]) for n, p in model.encoder.named_parameters())
    with pytest.raises(ValueError, match="at least 2 documents"):
        ict_warm_start(model, tokenizer, ICT_DOCS[:1], steps=1)


def test_masked_predictions_take_the_argmax_of_the_marginal(tokenizer):
    model = make_mlm_model(tokenizer)
    index = make_mlm_index(model, tokenizer)
    rows = _rows(tokenizer)
    batch = RealmPretrainingCollator(model, tokenizer, index)(rows)
    with torch.no_grad():
        predicted = model.masked_predictions(**batch)
        p_doc = torch.softmax(model(**batch).retriever_logits, dim=-1)
        for b, row in enumerate(rows):
            mixture = 0
            for z in range(batch["joined_input_ids"].shape[1]):
                keep = batch["joined_attention_mask"][b, z].bool()
                logits = model.encoder(
                    input_ids=batch["joined_input_ids"][b, z][keep][None],
                    token_type_ids=batch["joined_token_type_ids"][b, z][keep][None],
                ).logits[0, : len(row["input_ids"])]
                mixture = mixture + p_doc[b, z] * torch.softmax(logits, dim=-1)
            masked = [i for i, label in enumerate(row["labels"]) if label != -100]
            assert predicted[b, masked].tolist() == mixture[masked].argmax(-1).tolist()
            assert (predicted[b] != -100).sum() == len(masked)


def test_masked_predictions_return_forward_s_log_marginal_from_the_same_pass(tokenizer):
    model = make_mlm_model(tokenizer).eval()
    index = make_mlm_index(model, tokenizer)
    batch = RealmPretrainingCollator(model, tokenizer, index)(_rows(tokenizer))
    with torch.no_grad():
        predicted, log_marginal = model.masked_predictions(**batch, return_log_marginal=True)
        assert torch.equal(predicted, model.masked_predictions(**batch))
        assert torch.equal(log_marginal, model(**batch).log_marginal)


def test_head_warm_start_loss_is_the_plain_masked_lm_loss(tokenizer):
    model = make_mlm_model(tokenizer)
    rows = _rows(tokenizer)
    batch = null_document_batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        got = masked_lm_loss(model, batch)
        plain = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"][:, 0]).loss  # fmt: skip
    assert float(got) == pytest.approx(float(plain), abs=1e-6)  # both: mean CE over the masked tokens


def test_head_warm_start_trains_the_encoder_with_the_head_faster(tokenizer):
    model = make_mlm_model(tokenizer)
    head, rest = head_parameters(model.encoder)
    embeddings = model.encoder.get_input_embeddings().weight
    assert head and all(p is not embeddings for p in head) and any(p is embeddings for p in rest)
    retriever_before = [p.clone() for p in model.query_embedder.parameters()]
    head_before, rest_before = [p.clone() for p in head], [p.clone() for p in rest]
    losses = head_warm_start(model, tokenizer, _rows(tokenizer), steps=20, batch_size=2,
                             learning_rate=1e-5, head_learning_rate=1e-2)  # fmt: skip
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    retriever = zip(retriever_before, model.query_embedder.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in retriever)

    def largest_change(now, then):
        return max(float((p - q).detach().abs().max()) for p, q in zip(now, then, strict=True))

    # an AdamW step moves a weight by about its learning rate: 1e-2 for the head, 1e-5 for the rest
    assert largest_change(head, head_before) > 10 * largest_change(rest, rest_before) > 0
    with pytest.raises(ValueError, match="rows is empty"):
        head_warm_start(model, tokenizer, [], steps=1)
