"""Smaller stores: a no-op compress is exact; PCA halves the keys; pruning merges same-value neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_knnlm import Datastore, evaluate_perplexity
from hf_knnlm.commands import main
from hf_knnlm.datastore.compress import compress_datastore
from hf_knnlm.knnlm.retomaton import RetoMaton

SETTINGS = dict(
    k=8, lmbda=0.4, temperature=5.0, max_length=64, stride=32, batch_size=4, disable_progress=True
)


def test_noop_compress_keeps_results_identical(model, tokenizer, store, other_text, tmp_path):
    copy = compress_datastore(store, tmp_path / "copy")
    np.testing.assert_array_equal(copy.keys.to_numpy(), store.keys.to_numpy())
    assert np.array_equal(copy.values.to_numpy(), store.values.to_numpy())
    np.testing.assert_array_equal(
        copy.provenance.entry_positions(np.arange(len(copy))), np.arange(len(store)) + 1
    )
    a = evaluate_perplexity(model, tokenizer, [other_text], store, **SETTINGS)
    b = evaluate_perplexity(model, tokenizer, [other_text], copy, **SETTINGS)
    assert {**a.to_dict(), "search": None} == {**b.to_dict(), "search": None}  # all but the folder


def test_pca_to_half_the_dimensions(model, tokenizer, store, other_text, tmp_path):
    small = compress_datastore(store, tmp_path / "pca", pca_dim=16)
    small = Datastore.from_pretrained(small.folder)  # every file, the transform too, is verified
    assert small.key_dim == 16 and small.hidden_size == store.hidden_size == 32
    assert "key_transform.faiss" in small.config.files and small.config.compression["pca_dim"] == 16
    # A stored key is still its own nearest neighbour after projection.
    keys = torch.from_numpy(store.keys.take(np.arange(0, 200, 20)).astype(np.float32))
    _, ids = small.search_ids(keys, 1)
    assert (ids[:, 0] == np.arange(0, 200, 20)).mean() > 0.8
    full = evaluate_perplexity(model, tokenizer, [other_text], store, **SETTINGS)
    half = evaluate_perplexity(model, tokenizer, [other_text], small, **SETTINGS)
    assert half["base_ppl"] == full["base_ppl"] and half["knn_ppl"] < full["base_ppl"]


def test_pruning_merges_same_value_neighbours_with_counts(store, tmp_path):
    small = compress_datastore(store, tmp_path / "pruned", prune_to=0.5, merge_k=16)
    prov = small.provenance
    assert len(small) == round(len(store) * 0.5)
    assert int(prov.counts.sum()) == len(store)  # every source entry is in exactly one merged entry
    positions = prov.entry_positions(np.arange(len(small)))
    # Kept entries keep their values, and their documents still point at the same text.
    np.testing.assert_array_equal(small.values.to_numpy(), store.values.to_numpy()[positions - 1])
    for entry in (0, len(small) // 2, len(small) - 1):
        assert (
            small.provenance.source(entry).span_text
            == store.provenance.source(int(positions[entry] - 1)).span_text
        )
    # Pointers lead to the merged entry holding the next corpus position.
    nxt = prov.next_ids
    assert nxt.min() >= -1 and nxt.max() < len(small) and (nxt >= 0).mean() > 0.99
    # Weights enter p_kNN: a neighbour merged from c entries counts c times.
    found = small.search(torch.from_numpy(small.keys.take(np.arange(5)).astype(np.float32)), 4)
    torch.testing.assert_close(
        found.log_counts, torch.from_numpy(np.log(prov.counts[found.ids.numpy()])).float()
    )
    automaton = RetoMaton(small, 1, 4)
    assert automaton.pointers(np.array([0]), int(small.values[0])).tolist() in ([int(nxt[0])], [])


def test_pruned_store_weighted_pknn_is_close(model, tokenizer, store, other_text, tmp_path):
    small = compress_datastore(store, tmp_path / "pruned", prune_to=0.5, merge_k=16)
    full = evaluate_perplexity(model, tokenizer, [other_text], store, **SETTINGS)
    half = evaluate_perplexity(model, tokenizer, [other_text], small, **SETTINGS)
    assert half["knn_ppl"] < full["base_ppl"] and abs(half["knn_ppl"] / full["knn_ppl"] - 1) < 0.1


def test_compress_cli_reports_sizes(store_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compress", "--datastore", str(store_dir), "--output", str(out), "--pca-dim", "16"]) == 0
    report = capsys.readouterr().out
    assert '"key_dim": [\n    32,\n    16\n  ]' in report and '"size_ratio"' in report
    assert main(["compress", "--datastore", str(store_dir), "--output", str(out), "--pca-dim", "16"]) == 2
    assert "already holds a datastore" in capsys.readouterr().err
    assert (
        main(["compress", "--datastore", str(store_dir), "--output", str(tmp_path / "x"), "--pca-dim", "64"])
        == 2
    )
    assert "pca_dim=64 must be in [1, 32]" in capsys.readouterr().err


def test_index_type_follows_the_dimensions():
    from hf_knnlm.datastore.compress import factory_for_dim

    assert factory_for_dim("IVF1024,PQ64", 576, 288) == "IVF1024,PQ32"
    assert factory_for_dim("IVF64,PQ64", 576, 100) == "IVF64,PQ10"
    assert factory_for_dim("Flat", 32, 16) == "Flat"


def test_pca_of_an_ivfpq_store_gets_a_matching_pq(store, tmp_path):
    ivfpq = store.rebuild_index("IVF16,PQ8", tmp_path / "ivfpq", train_size=4096)
    small = compress_datastore(ivfpq, tmp_path / "pca", pca_dim=12, train_size=4096)
    assert small.config.index_factory == "IVF16,PQ3" and small.key_dim == 12


def test_bad_prune_fraction(store, tmp_path):
    with pytest.raises(ValueError, match="prune_to=0"):
        compress_datastore(store, tmp_path / "bad", prune_to=0)


def _brute_force_pairs(keys: np.ndarray, values: np.ndarray, merge_k: int) -> set[tuple[int, int]]:
    pairs = set()
    for a in range(len(values)):
        same = np.flatnonzero((values == values[a]) & (np.arange(len(values)) != a))
        d = ((keys[same] - keys[a]) ** 2).sum(1)
        pairs |= {(a, int(b)) for b in same[np.argsort(d, kind="stable")[:merge_k]]}
    return pairs


@pytest.mark.parametrize("exact_group", [8192, pytest.param(48, marks=pytest.mark.slow)])
def test_merge_candidates_are_the_nearest_same_value_entries(store, monkeypatch, exact_group):
    from hf_knnlm.datastore import compress

    # exact_group=48: the values with more entries go through the IVF-Flat path.
    monkeypatch.setattr(compress, "_EXACT_GROUP", exact_group)
    keys, values = store.keys.to_numpy().astype(np.float32), store.values.to_numpy()
    a, b, d = compress.same_value_pairs(store.keys, values, 3)
    assert (values[a] == values[b]).all() and (a != b).all()
    np.testing.assert_allclose(d, ((keys[a] - keys[b]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    found, expected = set(zip(a.tolist(), b.tolist(), strict=True)), _brute_force_pairs(keys, values, 3)
    recall = len(found & expected) / len(expected)
    assert recall == 1.0 if exact_group == 8192 else recall > 0.9


def test_merges_are_stars_of_nearest_same_value_entries(store):
    from hf_knnlm.datastore.compress import merge_plan

    keys, values = store.keys.to_numpy().astype(np.float32), store.values.to_numpy()
    reps, counts = merge_plan(store.keys, values, 4, 0.5)
    assert (reps != np.arange(len(reps))).sum() == len(reps) - round(len(reps) * 0.5)
    assert (reps[reps] == reps).all()  # a representative is never merged into another entry
    assert (values[reps] == values).all() and counts.sum() == len(reps)
    candidates = _brute_force_pairs(keys, values, 4)
    merged = np.flatnonzero(reps != np.arange(len(reps)))
    assert all((int(reps[i]), int(i)) in candidates for i in merged)


def test_pruning_says_where_it_stopped(store, tmp_path, caplog):
    values = store.values.to_numpy()
    once = int((np.bincount(values) == 1).sum())
    small = compress_datastore(store, tmp_path / "pruned", prune_to=0.001, merge_k=1)
    assert once <= len(small) < len(store) and "pruning stopped at" in caplog.text
    assert int(small.provenance.counts.sum()) == len(store)
