"""Hot-path choices: mmap reads, GPU cloning selection (faked on CPU), threads, batched search."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from hf_knnlm import Datastore, KNNLMForCausalLM, evaluate_perplexity
from hf_knnlm.datastore import index as index_module
from hf_knnlm.datastore import storage as storage_module
from hf_knnlm.datastore.index import configure_threads, exact_index, index_to_gpus, read_index

# ----------------------------------------------------------------- memory-mapped reads
_ANON_RSS_GROWTH = """
import re, sys, types
package = types.ModuleType("hf_knnlm")  # import only hf_knnlm.datastore.index (and .files), not transformers
package.__path__ = [sys.argv[1]]
sys.modules["hf_knnlm"] = package
from hf_knnlm.datastore.index import read_index
import faiss  # imported on first use by read_index; loading the library is not the index's memory
def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
before = anon()
index = read_index(sys.argv[2], mmap=sys.argv[3] == "1")
print(anon() - before)
"""


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_read_index_is_memory_mapped(tmp_path, factory):
    """A 32 MB index opened with mmap costs (almost) no anonymous memory, and searches the same."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128_000, 64), dtype=np.float32)
    index = faiss.index_factory(64, factory)
    index.train(x[:2000])
    index.add(x)
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    package_dir = str(Path(index_module.__file__).parents[1])
    grown = {
        flag: int(
            subprocess.run(
                [sys.executable, "-c", _ANON_RSS_GROWTH, package_dir, str(path), flag],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for flag in ("1", "0")
    }
    size = path.stat().st_size
    assert grown["0"] > 0.5 * size  # read into RAM
    assert grown["1"] < 0.1 * size  # memory-mapped
    q = x[:50] + 0.01
    np.testing.assert_array_equal(read_index(path).search(q, 5)[1], index.search(q, 5)[1])


# ----------------------------------------------------------------- GPU selection (faked: no GPU here)
class _FakeGpuIndex:
    """Stands in for what index_cpu_to_all_gpus returns: records searches, delegates to the CPU index."""

    def __init__(self, cpu_index, options):
        self.cpu_index, self.options, self.searches = cpu_index, options, []
        self.ntotal = cpu_index.ntotal

    def search(self, q, k):
        self.searches.append((q.shape, k))
        return self.cpu_index.search(q, k)


@pytest.fixture()
def fake_gpus(monkeypatch):
    calls = []

    class Options:
        shard = False
        useFloat16 = False

    def to_all_gpus(index, co=None, ngpu=-1):
        clone = _FakeGpuIndex(index, {"shard": co.shard, "useFloat16": co.useFloat16})
        calls.append(clone)
        return clone

    class ParameterSpace:
        def set_index_parameter(self, index, name, value):
            index.params = {**getattr(index, "params", {}), name: value}

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", ParameterSpace, raising=False)
    return calls


def test_no_gpu_leaves_index_on_cpu(store_dir, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda *a, **k: pytest.fail("cloned"), raising=False)
    store = Datastore.from_pretrained(store_dir)
    assert not store.on_gpu and store.search_index is store.index
    index = faiss.IndexFlatL2(4)
    assert index_to_gpus(index, "shard") is index  # asked for, but nothing to clone to


@pytest.mark.parametrize("gpu,shard", [("auto", False), ("replicate", False), ("shard", True), (True, False)])
def test_gpu_clone_options(store_dir, fake_gpus, gpu, shard):
    store = Datastore.from_pretrained(store_dir, gpu=gpu, nprobe=7)
    (clone,) = fake_gpus
    assert store.on_gpu and store.search_index is clone
    assert clone.options == {"shard": shard, "useFloat16": True}
    assert clone.params == {"nprobe": 7}
    store.nprobe = 3
    assert clone.params == {"nprobe": 3}
    queries = torch.from_numpy(store.keys.take(np.arange(5)).astype(np.float32))
    found = store.search(queries, k=4)
    assert clone.searches == [((5, store.hidden_size), 4)]  # one batched search, on the GPU clone
    cpu = Datastore.from_pretrained(store_dir, gpu="none")
    expected = cpu.search(queries, k=4)
    torch.testing.assert_close(found.distances, expected.distances)
    assert torch.equal(found.token_ids, expected.token_ids)
    assert len(store) > 2049
    with pytest.raises(ValueError, match="k=2049"):
        store.search_ids(queries, 2049)


def test_gpu_none_and_new_cpu_index(store_dir, fake_gpus):
    store = Datastore.from_pretrained(store_dir, gpu="none")
    assert not fake_gpus and not store.on_gpu
    store = Datastore.from_pretrained(store_dir)
    assert store.on_gpu
    store.index = exact_index(
        store.keys.iter_rows(4096), store.key_dim
    )  # a rebuilt index replaces the CPU one
    assert not store.on_gpu  # the stale clone is dropped ...
    assert store.search_index is fake_gpus[-1] and len(fake_gpus) == 2  # ... and re-cloned on next use


def test_bad_gpu_mode():
    with pytest.raises(ValueError, match="gpu='cuda'"):
        index_to_gpus(faiss.IndexFlatL2(4), "cuda")


# ----------------------------------------------------------------- threads
def test_configure_threads(monkeypatch):
    before = (faiss.omp_get_max_threads(), torch.get_num_threads())
    try:
        monkeypatch.delenv(index_module.FAISS_THREADS_ENV, raising=False)
        torch.set_num_threads(2)
        assert configure_threads() == (2, 2)
        assert configure_threads(torch_threads=1) == (1, 1)  # faiss follows torch by default
        # An explicit faiss count never changes torch's, even where both share one OpenMP runtime.
        monkeypatch.setenv(index_module.FAISS_THREADS_ENV, "2")
        faiss_threads, torch_threads = configure_threads(torch_threads=1)
        assert torch_threads == 1 and faiss_threads in (1, 2)
        with pytest.raises(ValueError, match="faiss_threads=0"):
            configure_threads(faiss_threads=0)
        with pytest.raises(ValueError, match="torch_threads=-1"):
            configure_threads(torch_threads=-1)
        monkeypatch.delenv(index_module.FAISS_THREADS_ENV)
        monkeypatch.setattr(index_module, "_explicit_faiss_threads", None)
        torch.set_num_threads(2)
        assert configure_threads(faiss_threads=1)[1] == 2
        assert configure_threads()[1] == 2 and index_module._explicit_faiss_threads == 1  # kept
    finally:
        faiss.omp_set_num_threads(before[0])
        torch.set_num_threads(before[1])


# ----------------------------------------------------------------- recompute and batched search
def test_exact_distances_blocked_equal_reference(store, monkeypatch):
    monkeypatch.setattr(storage_module, "_RECOMPUTE_ROWS", 20)  # several blocks of 2 queries
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((9, store.hidden_size)).astype(np.float32)
    ids = rng.integers(0, len(store), size=(9, 10))
    got = storage_module.exact_sq_distances(store.keys, queries, ids)
    keys = store.keys.to_numpy().astype(np.float64)[ids]
    np.testing.assert_allclose(got, ((keys - queries[:, None, :]) ** 2).sum(-1), rtol=1e-5)


class _CountingIndex:
    def __init__(self, index):
        self.index, self.calls = index, []
        self.ntotal = index.ntotal

    def search(self, q, k):
        self.calls.append(len(q))
        return self.index.search(q, k)


def test_one_search_per_forward_pass(store, model, tokenizer, other_text):
    spy = _CountingIndex(store.index)
    store._searcher._gpu = spy  # search_index returns it (as it would a GPU clone)
    wrapped = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8)
    ids = tokenizer([other_text[:200], other_text[200:400]], return_tensors="pt", padding=True)
    wrapped(**ids)
    assert spy.calls == [int(ids["attention_mask"].sum())]  # every scored position, one search
    spy.calls.clear()
    evaluate_perplexity(
        model,
        tokenizer,
        [other_text],
        store,
        max_length=64,
        stride=32,
        batch_size=4,
        k=8,
        disable_progress=True,
    )
    num_batches = len(spy.calls)
    tokens = len(tokenizer(other_text)["input_ids"])
    assert sum(spy.calls) == tokens - 1 and num_batches == -(-(1 + -(-(tokens - 64) // 32)) // 4)


def test_cli_gpu_flag_reaches_the_datastore(store_dir, fake_gpus):
    from hf_knnlm.commands import build_parser
    from hf_knnlm.commands._common import load_datastore

    argv = ["evaluate", "--model", "m", "--data", "x", "--datastore", str(store_dir), "--gpu", "shard"]
    args = build_parser().parse_args(argv)
    store = load_datastore(args)
    assert store.on_gpu and fake_gpus[-1].options["shard"] is True


@pytest.mark.slow
def test_pq_indexes_skip_polysemous_training():
    # Polysemous training only reorders the PQ centroids (for Hamming-filtered search, never used
    # here) and is most of an IVF-PQ's training time: searches return the same distances without it.
    import faiss

    from hf_knnlm.datastore.index import new_index

    rng = np.random.default_rng(0)
    x, q = (
        rng.standard_normal((3000, 16)).astype(np.float32),
        rng.standard_normal((20, 16)).astype(np.float32),
    )
    ours, theirs = new_index("IVF8,PQ4", 16), faiss.index_factory(16, "IVF8,PQ4")
    assert not faiss.downcast_index(faiss.extract_index_ivf(ours)).do_polysemous_training
    assert faiss.downcast_index(faiss.extract_index_ivf(theirs)).do_polysemous_training
    for index in (ours, theirs):
        index.train(x)
        index.add(x)
        index.nprobe = 8
    np.testing.assert_allclose(ours.search(q, 10)[0], theirs.search(q, 10)[0], rtol=1e-5)
