"""Attribution: neighbour weights add up to p_kNN, and spans point at the right text."""

from __future__ import annotations

import numpy as np
import torch

from hf_knnlm import Datastore, KNNSettings
from hf_knnlm.commands import main
from hf_knnlm.datastore.provenance import attach_documents, tokenize_documents
from hf_knnlm.knnlm.attribution import attribute_step, explain_generation, render_html
from hf_knnlm.knnlm.mixture import knn_log_probs


def test_documents_give_every_entry_its_text(tokenizer, model, tmp_path):
    docs = ["The king sees the bridge.", "A merchant sells a silver crown!", "Our town fears the river."]
    store = Datastore.build(
        model,
        tokenizer,
        docs,
        tmp_path / "s",
        max_length=16,
        stride=8,
        disable_progress=True,
        document_names=["one", "two", "three"],
    )
    tokens, _ = tokenize_documents(tokenizer, docs)
    for entry in range(len(store)):
        src = store.provenance.source(entry)
        token = tokenizer.decode([int(store.values[entry])])
        doc = docs[["one", "two", "three"].index(src.document)]
        if src.char_start < 0:  # the separator between documents has no span
            assert token.strip() == ""
            continue
        assert doc[src.char_start : src.char_end] == src.span_text
        assert src.span_text.strip() == token.strip()
        assert doc[: src.char_start].endswith(src.context)
    assert store.provenance.source(len(store) - 1).span_text == "."
    assert len(tokens) == len(store) + 1


def test_weights_sum_to_pknn_mass(store, tokenizer):
    settings = KNNSettings(k=16, lmbda=0.3, temperature=3.0)
    query = torch.from_numpy(store.keys.take(np.array([123])).astype(np.float32))
    found = store.search(query, 16)
    pknn = knn_log_probs(found, store.vocab_size, 3.0).exp()[0]
    for token in set(found.token_ids[0].tolist()):
        a = attribute_step(store, tokenizer, found, token, -2.0, settings, top=16)
        assert abs(sum(n.weight for n in a.neighbours if n.matches) - float(pknn[token])) < 1e-5
        assert abs(a.knn_prob - float(pknn[token])) < 1e-6
        expected_share = 0.3 * a.knn_prob / (0.3 * a.knn_prob + 0.7 * np.exp(-2.0))
        assert abs(a.knn_share - expected_share) < 1e-6
    assert abs(sum(n.weight for n in a.neighbours) - 1.0) < 1e-5
    # The stored key itself is the nearest neighbour, and its span is that entry's text.
    top = attribute_step(store, tokenizer, found, int(store.values[123]), -2.0, settings, top=1).neighbours[0]
    assert top.entry == 123 and top.distance == 0.0 and top.span_text.strip() == top.token.strip()


def test_explain_generation_and_html(model, tokenizer, store):
    attributions, text = explain_generation(model, tokenizer, store, "The king", max_new_tokens=5, k=8, top=3)
    assert len(attributions) == 5 and text == "".join(a.token for a in attributions)
    assert all(len(a.neighbours) == 3 and a.neighbours[0].document == "texts[0]" for a in attributions)
    page = render_html("The king", attributions)
    assert page.count("<span title=") == 5 and "kNN share" not in page


def test_old_store_gets_documents_attached(store_dir, tmp_path, tokenizer, corpus_text):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(store_dir, old)
    config = json.loads((old / "datastore_config.json").read_text())
    config["files"].pop("documents.safetensors")
    (old / "documents.safetensors").unlink()
    (old / "datastore_config.json").write_text(json.dumps(config))
    store = Datastore.from_pretrained(old)
    assert store.provenance.source(5) is None
    attach_documents(store, tokenizer, [corpus_text], names=["corpus"])
    again = Datastore.from_pretrained(old)  # the new file is hashed in the config
    assert again.provenance.source(5).document == "corpus"
    try:
        attach_documents(again, tokenizer, [corpus_text[:-40]])
    except ValueError as err:
        assert "do not match" in str(err)
    else:
        raise AssertionError("a different corpus must be refused")


def test_explain_cli(store_dir, tmp_path, model, tokenizer, capsys):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    html_path = tmp_path / "view.html"
    argv = ["explain", "--model", str(model_dir), "--datastore", str(store_dir), "--prompt", "The king"]
    argv += ["--max-new-tokens", "3", "--k", "8", "--top", "2", "--html", str(html_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("kNN share=") == 3 and "texts[0][" in out and html_path.is_file()
