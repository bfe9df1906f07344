"""RetoMaton: pointers follow the corpus; a threshold above k is plain kNN-LM exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from hf_knnlm import Datastore, KNNLMForCausalLM, KNNProcessor, evaluate_perplexity
from hf_knnlm.datastore.kmeans_clusters import add_clusters
from hf_knnlm.knnlm.pointer_distances import flat_distances_by_id, nearest_columns
from hf_knnlm.knnlm.retomaton import RetoMaton, stream_neighbours

WINDOWS = dict(max_length=64, stride=32, batch_size=4, disable_progress=True)


def test_pointers_are_the_next_corpus_entry(store):
    automaton = RetoMaton(store, threshold=1, k=8)
    values = store.values.to_numpy()
    ids = np.array([0, 10, len(store) - 1])
    # Every entry predicted its own value; its successor is the entry built at that token.
    for i in ids:
        expected = [] if i == len(store) - 1 else [i + 1]
        assert automaton.pointers(np.array([i]), int(values[i])).tolist() == expected
        assert automaton.pointers(np.array([i]), int(values[i]) + 1).tolist() == []


def test_threshold_above_k_is_plain_knnlm_exactly(model, tokenizer, store, other_text):
    settings = dict(k=8, lmbda=0.3, temperature=5.0, **WINDOWS)
    plain = evaluate_perplexity(model, tokenizer, [other_text], store, **settings)
    reto = evaluate_perplexity(model, tokenizer, [other_text], store, retomaton=9, **settings)
    assert reto["knn_ppl"] == plain["knn_ppl"]
    assert reto["searches"] == reto["steps"] == plain["num_tokens"] and reto["searches_saved"] == 0.0


def test_on_its_own_corpus_pointers_replace_most_searches(model, tokenizer, store, corpus_text):
    settings = dict(k=8, lmbda=0.5, temperature=1.0, max_tokens=400, **WINDOWS)
    plain = evaluate_perplexity(model, tokenizer, [corpus_text], store, **settings)
    reto = evaluate_perplexity(model, tokenizer, [corpus_text], store, retomaton=1, **settings)
    # The text is the store: the nearest entry is the position itself and its pointer is never wrong.
    assert reto["searches_saved"] > 0.9
    # ...and following the text itself is at least as good as searching for it.
    assert reto["knn_ppl"] <= plain["knn_ppl"] < plain["base_ppl"]


def test_precomputed_search_gives_the_online_result(store):
    torch.manual_seed(0)
    queries = torch.from_numpy(store.keys.take(np.arange(40, 70)).astype(np.float32))
    prev = [None] + store.values[39:69].tolist()
    online = stream_neighbours(RetoMaton(store, 2, 8), queries, prev)
    cached = store.search(queries, 8)
    offline = stream_neighbours(RetoMaton(store, 2, 8), queries, prev, precomputed=cached)
    assert torch.equal(online.ids, offline.ids) and torch.equal(online.distances, offline.distances)


def test_processor_with_threshold_above_k_generates_like_plain(model, tokenizer, store):
    inputs = tokenizer("The king sees", return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    outs = []
    for extra in ({}, {"retomaton": 9}):
        with KNNProcessor(model, store, k=8, lmbda=0.5, temperature=5.0, **extra) as knn:
            outs.append(model.generate(**inputs, logits_processor=LogitsProcessorList([knn]), **kwargs))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores, strict=True):
        assert torch.equal(a, b)


def test_processor_follows_pointers_in_beam_search(model, tokenizer, store, corpus_text):
    prompt = corpus_text[:60]
    inputs = tokenizer(prompt, return_tensors="pt")
    with KNNProcessor(model, store, k=8, lmbda=0.9, temperature=1.0, retomaton=1) as knn:
        model.generate(
            **inputs,
            max_new_tokens=10,
            num_beams=3,
            do_sample=False,
            logits_processor=LogitsProcessorList([knn]),
        )
        stats = knn.retrieval_stats.to_dict()
    assert stats["steps"] == 30 and 0 < stats["searches"] < stats["steps"]


def test_wrapper_threshold_above_k_equals_plain(model, tokenizer, store):
    ids = tokenizer(["the old queen fears the market"], return_tensors="pt")
    plain = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.4, temperature=5.0)
    reto = KNNLMForCausalLM.from_pretrained(
        model, datastore=store, k=8, lmbda=0.4, temperature=5.0, retomaton=9
    )
    a = plain(**ids, labels=ids["input_ids"])
    b = reto(**ids, labels=ids["input_ids"])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert reto.retrieval_stats.searches_saved == 0.0


def test_bad_threshold_is_refused(store):
    with pytest.raises(ValueError, match="retomaton=0"):
        RetoMaton(store, threshold=0, k=8)


def test_old_store_without_entries_file_still_follows_pointers(store_dir, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(store_dir, old)
    config = json.loads((old / "datastore_config.json").read_text())
    for name in ("entries.safetensors", "documents.safetensors"):
        config["files"].pop(name)
        (old / name).unlink()
    (old / "datastore_config.json").write_text(json.dumps(config))
    store = Datastore.from_pretrained(old)
    assert store.provenance.positions is None and store.provenance.documents is None
    assert RetoMaton(store, 1, 4).pointers(np.array([3]), int(store.values[3])).tolist() == [4]


@pytest.fixture(scope="module")
def ivf_store(store_dir, tmp_path_factory):
    return Datastore.from_pretrained(store_dir).rebuild_index(
        "IVF8,Flat", tmp_path_factory.mktemp("reto") / "ivf", train_size=4096
    )


def test_ivf_lists_are_the_clusters(store, ivf_store):
    import faiss

    clusters = ivf_store.clusters
    assert store.clusters is None  # Flat: no lists, pointers alone
    keys = ivf_store.keys.take(np.arange(len(ivf_store))).astype(np.float32)
    _, nearest = faiss.extract_index_ivf(ivf_store.index).quantizer.search(keys, 1)
    assert clusters.num_clusters == 8 and np.array_equal(clusters.assignment, nearest[:, 0])
    assert sorted(clusters.members(np.arange(8)).tolist()) == list(range(len(ivf_store)))


def test_clusters_top_pointers_up_with_their_lists_most_shared_first(ivf_store):
    clusters = ivf_store.clusters
    sizes = np.bincount(clusters.assignment, minlength=8)
    big, small = np.argsort(-sizes)[:2]
    ids = np.concatenate([clusters.members([small])[:1], clusters.members([big])[:2]])
    # room for exactly the rest of the list holding two of the pointers: it comes first
    out = clusters.extend(ids, limit=1 + int(sizes[big]))
    assert out[:3].tolist() == ids.tolist() and len(np.unique(out)) == len(out)
    assert set(out.tolist()) == set(clusters.members([big]).tolist()) | {int(ids[0])}
    assert clusters.extend(ids, limit=2).tolist() == ids[:2].tolist()


@pytest.mark.parametrize("lookup", ["table", "sort"])
def test_extend_equals_the_sorting_formulation(ivf_store, lookup, monkeypatch):
    if lookup == "sort":  # the path of a store with more clusters or entries than the lookup tables cover
        monkeypatch.setattr("hf_knnlm.datastore.clusters.BINCOUNT_CLUSTERS", 0)
        monkeypatch.setattr("hf_knnlm.datastore.clusters.TABLE_RANGE", 0)
    clusters, rng = ivf_store.clusters, np.random.default_rng(0)
    for size, limit in [(1, 5), (3, 40), (10, 17), (25, 200)]:
        ids = np.sort(rng.choice(len(ivf_store), size, replace=False))
        found, counts = np.unique(clusters.assignment[ids], return_counts=True)
        order = found[np.argsort(-counts, kind="stable")]
        members = clusters.members(order)
        expected = np.concatenate([ids, members[~np.isin(members, ids, kind="sort")]])[:limit]
        assert clusters.extend(ids, limit).tolist() == expected.tolist()


def test_nearest_columns_equal_a_stable_argsort():
    rng = np.random.default_rng(0)
    for rows, width, k in [(3, 50, 7), (4, 300, 128), (2, 16, 16), (5, 40, 64), (0, 10, 3)]:
        dist = rng.integers(0, 12, size=(rows, width)).astype(np.float32)  # many ties at the k-th value
        dist[dist > 9] = np.inf  # padding
        expected = np.argsort(dist, axis=1, kind="stable")[:, :k]
        assert np.array_equal(nearest_columns(dist, k), expected)


def test_clusters_give_pointer_steps_k_neighbours(ivf_store):
    queries = torch.from_numpy(ivf_store.keys.take(np.arange(40, 70)).astype(np.float32))
    prev = [None] + ivf_store.values[40:69].tolist()  # the token at each query's own position
    alone = stream_neighbours(RetoMaton(ivf_store, 1, 8, clusters=False), queries, prev)
    grouped = stream_neighbours(RetoMaton(ivf_store, 1, 8, pointer_step="exact"), queries, prev)
    assert ((alone.ids >= 0).sum(1) < 8).any()  # a few surviving pointers: a few candidates
    assert ((grouped.ids >= 0).sum(1) == 8).all()  # topped up from their lists to k
    # each query is a stored key, reached by its predecessor's pointer: itself at distance 0
    assert torch.equal(grouped.ids[:, 0], torch.arange(40, 70)) and (grouped.distances[:, 0] == 0).all()


def test_clusters_keep_threshold_above_k_plain(model, tokenizer, ivf_store, other_text):
    settings = dict(k=8, lmbda=0.3, temperature=5.0, **WINDOWS)
    plain = evaluate_perplexity(model, tokenizer, [other_text], ivf_store, **settings)
    reto = evaluate_perplexity(model, tokenizer, [other_text], ivf_store, retomaton=9, **settings)
    assert reto["knn_ppl"] == plain["knn_ppl"] and reto["searches_saved"] == 0.0


def test_pointer_steps_keep_the_k_nearest_of_the_pool(ivf_store):
    automaton = RetoMaton(ivf_store, 1, 4, pool=16, pointer_step="exact")
    ids = ivf_store.clusters.members([0])[:2]
    query = ivf_store.keys.take(np.array([5])).astype(np.float32)[0]
    distances, kept = (a[0] for a in automaton._follow(query[None], ids[None], np.array([len(ids)])))
    pool = ivf_store.clusters.extend(ids, 16)
    exact = ((ivf_store.keys.take(pool).astype(np.float32) - query) ** 2).sum(1)
    assert len(pool) == 16 and kept.tolist() == pool[np.argsort(exact, kind="stable")[:4]].tolist()
    np.testing.assert_allclose(distances, np.sort(exact)[:4], rtol=1e-5)


def _reference_walk(store, threshold, k, queries, prev, searched, pointer_step):
    """The one-query-at-a-time RetoMaton, written out: pointers of the right entries, their lists'
    members up to 4k candidates, the k nearest by exact distance (or the index's search of the lists
    chosen by ``Clusters.pointed``); else the searched row."""
    keys, values, last, rows = store.keys, store.values.to_numpy(), None, []
    for i, q in enumerate(queries.numpy()):
        ptrs = np.zeros(0, np.int64)
        if last is not None and prev[i] is not None:
            nxt = store.provenance.successors(last[values[last] == prev[i]])
            ptrs = np.unique(nxt[nxt >= 0])
        if len(ptrs) >= threshold and pointer_step == "index" and store.clusters is not None:
            lists = store.clusters.pointed(ptrs, 4 * k)[None]
            d, ids = (a[0] for a in store.clusters.search(q[None], lists, k))
        elif len(ptrs) >= threshold:
            cands = store.clusters.extend(ptrs, 4 * k) if store.clusters else ptrs
            diff = keys.take(cands).astype(np.float32) - q
            d = np.einsum("ij,ij->i", diff, diff)
            order = np.argsort(d, kind="stable")[:k]
            d, ids = np.pad(d[order], (0, k - len(order)), constant_values=np.inf), cands[order]
            ids = np.pad(ids, (0, k - len(order)), constant_values=-1)
        else:
            d, ids = searched.distances[i].numpy(), searched.ids[i].numpy()
        rows.append((d, ids))
        last = ids[ids >= 0]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


@pytest.fixture()
def clustered_store(store, tmp_path):
    """The Flat store with k-means clusters of its own (add_clusters)."""
    copy = Datastore.from_pretrained(store.save_pretrained(tmp_path / "clustered"))
    add_clusters(copy, num_clusters=32)
    return copy


def test_add_clusters_keeps_each_entry_in_its_nearest_centroids_cluster(clustered_store):
    from safetensors.numpy import load_file

    reloaded = Datastore.from_pretrained(clustered_store.folder)
    saved = load_file(str(reloaded.folder / "clusters.safetensors"))
    keys = reloaded.keys.take(np.arange(len(reloaded))).astype(np.float32)
    nearest = ((keys[:, None] - saved["centroids"][None]) ** 2).sum(-1).argmin(1)
    assert reloaded.clusters.num_clusters == 32 and "clusters.safetensors" in reloaded.config.files
    assert (reloaded.clusters.assignment == nearest).mean() > 0.99  # argmin ties and float sums aside


def test_add_clusters_refuses_a_store_with_lists(ivf_store):
    with pytest.raises(ValueError, match="IVF lists are its clusters already"):
        add_clusters(ivf_store)


def test_a_clustered_flat_store_tops_pointers_up(clustered_store):
    automaton = RetoMaton(clustered_store, 2, 8)
    ptrs = np.array([[5, 6, -1]])
    cands = automaton._candidates(ptrs, np.array([2]))[0]
    assert cands[:2].tolist() == [5, 6] and len(cands) == min(32, len(clustered_store))


@pytest.mark.parametrize("which", ["flat", "flat clusters", "ivf exact", "ivf index"])
@pytest.mark.parametrize("segments", [1, 3, 7])
def test_lockstep_walk_equals_walking_each_segment_alone(request, store, ivf_store, which, segments):
    ds = request.getfixturevalue("clustered_store") if which == "flat clusters" else store
    ds = ivf_store if which.startswith("ivf") else ds
    pointer_step = which.split()[-1] if which.startswith("ivf") else "exact"
    ids = np.arange(20, 120)
    queries = torch.from_numpy(ds.keys.take(ids).astype(np.float32))
    queries[::5] += 0.5  # some queries off the corpus: a few pointers die and those rows search
    prev = [None] + ds.values[20:119].tolist()  # the token at each query's own position
    searched = ds.search(queries, 8)
    automaton = RetoMaton(ds, 2, 8, pointer_step=pointer_step)
    walked = stream_neighbours(automaton, queries, prev, searched, segments=segments)
    assert 0.3 < automaton.searches_saved < 1  # both kinds of steps happen
    bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(len(ids)), segments)])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        d, i = _reference_walk(ds, 2, 8, queries[a:b], prev[a:b], searched[a:b], pointer_step)
        assert np.array_equal(walked.ids[a:b].numpy(), i)
        if which.startswith("flat"):  # pointer steps sum in faiss (SIMD), the reference in numpy
            np.testing.assert_allclose(walked.distances[a:b].numpy(), d, rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(walked.distances[a:b].numpy(), d)


def test_flat_pointer_steps_read_the_index_vectors(store):
    automaton = RetoMaton(store, 2, 8)
    vectors = automaton._distances.flat_vectors()
    assert vectors is not None  # a Flat store: distances from the index's own float32 keys
    queries = store.keys.take(np.array([3, 50])).astype(np.float32) + 0.25
    ids = np.array([[3, 4, -1], [50, -1, 7]])
    got = flat_distances_by_id(vectors, queries, ids)
    keys = store.keys.take(np.where(ids >= 0, ids, 0)).astype(np.float32)
    expected = np.where(ids >= 0, ((keys - queries[:, None]) ** 2).sum(-1), np.inf)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_lockstep_walk_searches_each_step_in_one_call(store, monkeypatch):
    queries = torch.from_numpy(store.keys.take(np.arange(0, 64)).astype(np.float32)) + 0.3
    calls = []
    search = store.search_ids
    monkeypatch.setattr(store, "search_ids", lambda q, *a, **kw: calls.append(len(q)) or search(q, *a, **kw))
    automaton = RetoMaton(store, 2, 8)
    stream_neighbours(automaton, queries, [None] * 64, segments=8)  # no tokens: every row searches
    assert calls == [8] * 8 and automaton.searches == 64


def test_index_pointer_steps_scan_the_pointed_lists(ivf_store):
    automaton = RetoMaton(ivf_store, 1, 4, pool=16, pointer_step="index")
    clusters = ivf_store.clusters
    ptrs = np.stack([clusters.members([0])[:2], clusters.members([3])[:2]])
    query = ivf_store.keys.take(np.array([5, 9])).astype(np.float32)
    distances, kept = automaton._follow(query, ptrs, np.array([2, 2]))
    for row in range(2):  # IVF-Flat: the index's distances are exact ones over the pointed lists' members
        members = clusters.members(clusters.pointed(ptrs[row], 16))
        exact = ((ivf_store.keys.take(members).astype(np.float32) - query[row]) ** 2).sum(1)
        assert kept[row].tolist() == members[np.argsort(exact, kind="stable")[:4]].tolist()
        np.testing.assert_allclose(distances[row], np.sort(exact)[:4], rtol=1e-4, atol=1e-4)


def test_index_pointer_steps_fall_back_to_exact_without_lists(store):
    queries = torch.from_numpy(store.keys.take(np.arange(40, 70)).astype(np.float32))
    prev = [None] + store.values[40:69].tolist()
    exact = stream_neighbours(RetoMaton(store, 1, 8), queries, prev)
    index = stream_neighbours(RetoMaton(store, 1, 8, pointer_step="index"), queries, prev)
    assert torch.equal(exact.ids, index.ids) and torch.equal(exact.distances, index.distances)


def test_bad_pointer_step_is_refused(store):
    with pytest.raises(ValueError, match="pointer_step='pq'"):
        RetoMaton(store, 2, 8, pointer_step="pq")
