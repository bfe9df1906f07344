"""A store sharded over 2 gloo processes (torchrun, CPU) answers as one process does.

Every rank holds half of the entries; the merged search, the reduced perplexity, the tuning sweep and
generation over uneven prompts must equal the one-process results (tests/distributed_search_worker.py
is one rank).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessorList

from hf_knnlm import Datastore, KNNProcessor, evaluate_perplexity, tune
from hf_knnlm.datastore.clusters import list_assignment
from hf_knnlm.datastore.rank_index import open_ivf_range

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import require
except ImportError:
    from conftest import require

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_search_worker.py")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """Skip (with the reason) where 2 gloo processes cannot start on this machine."""
    folder = tmp_path_factory.mktemp("gloo")
    probe = folder / "probe.py"
    probe.write_text(
        "import torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.ones(1)\n"
        "dist.all_reduce(t)\n"
        "assert t.item() == 2\n"
        "dist.destroy_process_group()\n",  # gloo's threads stop before exit (else an abort, now and then)
        encoding="utf-8",
    )
    result = _torchrun(str(probe), cwd=folder)
    require(
        result.returncode == 0,
        f"torch.distributed gloo cannot start 2 processes here: {result.stderr[:1500]}",
    )


def _run(mode: str, store: Path, out: Path, *extra: str) -> None:
    result = _torchrun(str(WORKER), mode, str(store), str(out), *extra, cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_sharded_search_equals_one_process(gloo, tmp_path, store_dir, factory):
    single = Datastore.from_pretrained(store_dir)
    if factory != "Flat":
        single = single.rebuild_index(factory, tmp_path / "ivf")
        single.nprobe = 8  # every list: the IVF result is exact too, so ids can be compared
    rows, queries = _write_queries(single, tmp_path)
    _run("search", single.folder, tmp_path)
    _assert_ranks_found_as_one(single, rows, queries, tmp_path)


def _write_queries(single: Datastore, folder: Path) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(0)
    rows = rng.choice(len(single), 13, replace=False)
    keys = torch.from_numpy(single.keys.take(rows).astype(np.float32))
    queries = torch.cat([keys, keys[:6] + 0.1 * torch.randn(6, keys.shape[1])])  # stored keys and others
    save_file({"queries": queries.contiguous()}, str(folder / "queries.safetensors"))
    return rows, queries


def _assert_ranks_found_as_one(single: Datastore, rows: np.ndarray, queries: torch.Tensor, tmp_path: Path):
    ranks = [load_file(str(tmp_path / f"rank-{r}.safetensors")) for r in range(2)]
    assert [len(r["queries"]) for r in ranks] == [5, len(queries) - 5]  # uneven query counts
    mine = torch.cat([r["queries"] for r in ranks])
    torch.testing.assert_close(mine, queries)
    for k in (8, 64):
        ref = single.search(queries, k)
        ids = torch.cat([r[f"ids_{k}"] for r in ranks])
        assert torch.equal(ids, ref.ids), k
        torch.testing.assert_close(
            torch.cat([r[f"distances_{k}"] for r in ranks]), ref.distances, atol=1e-5, rtol=1e-5
        )
        assert torch.equal(torch.cat([r[f"values_{k}"] for r in ranks]), ref.token_ids)
    assert torch.equal(ranks[0]["ids_8"][:, 0], torch.from_numpy(rows[:5]))  # a stored key finds itself
    ref = single.search(queries, 8, recompute_dists=True)
    assert torch.equal(torch.cat([r["ids_recompute"] for r in ranks]), ref.ids)
    torch.testing.assert_close(torch.cat([r["distances_recompute"] for r in ranks]), ref.distances)
    assert ranks[0]["ids_second"].shape == (0, 4)  # a rank with no queries still took part
    assert torch.equal(ranks[1]["ids_second"], single.search(queries[5:], 4).ids)


def test_a_rank_downloads_only_its_own_shards_from_the_hub(gloo, tmp_path, store):
    remote = tmp_path / "remote"
    single = Datastore.from_pretrained(store.save_pretrained(remote, max_shard_size=300 * 32 * 2))
    rows, queries = _write_queries(single, tmp_path)
    _run("hub", remote, tmp_path)
    _assert_ranks_found_as_one(single, rows, queries, tmp_path)
    half = len(single) - len(single) // 2
    shards = [(s, {s["keys"], s["values"]}) for s in single.config.shards]
    first = set().union(*(names for s, names in shards if s["start"] < half))
    second = set().union(*(names for s, names in shards if s["end"] > half))
    assert len(shards) > 3 and first - second and second - first
    rank_files = [set(json.loads((tmp_path / f"files-{r}.json").read_text())) for r in range(2)]
    every = {p.name for p in remote.iterdir()}
    for files, own, others in (
        (rank_files[0], first, second - first),
        (rank_files[1], second, first - second),
    ):
        assert own <= files and not files & others  # its own shards, none of the other rank's
        assert every - files == others  # and every other file of the store


def test_sharded_evaluation_and_tuning_equal_one_process(
    gloo, tmp_path, store_dir, saved_model, model, tokenizer, other_text
):
    data = tmp_path / "eval.txt"
    data.write_text(other_text, encoding="utf-8")
    _run("evaluate", store_dir, tmp_path, str(saved_model), str(data))

    single = Datastore.from_pretrained(store_dir)
    ref = evaluate_perplexity(model, tokenizer, [other_text], single, k=8, lmbda=0.5, batch_size=2)
    tuned = tune(model, tokenizer, [other_text], single, tmp_path / "tune-ref", k=8, lmbdas=[0.25, 0.5])
    sys.path.insert(0, str(WORKER.parent))
    from distributed_search_worker import tune_variants

    variants = {
        name: tune(model, tokenizer, [other_text], single, tmp_path / name, k=8, lmbdas=[0.25, 0.5], **grid)
        for name, grid in tune_variants(tuned.num_tokens).items()
    }
    for rank in range(2):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text(encoding="utf-8"))
        assert got["num_tokens"] == ref.num_tokens and got["searches"] == ref.searches
        assert got["base_ppl"] == pytest.approx(ref.base_ppl, rel=1e-5)
        assert got["knn_ppl"] == pytest.approx(ref.knn_ppl, rel=1e-5)
        assert got["tune_tokens"] == tuned.num_tokens
        assert got["tune_points"] == pytest.approx([p.knn_ppl for p in tuned.points], rel=1e-5)
        for name, ref_tuned in variants.items():  # the scale sample streamed, gathered across the ranks
            variant = got["tune_variants"][name]
            assert (
                variant["tokens"] == ref_tuned.num_tokens and variant["scale"] == ref_tuned.median_nn_distance
            )
            assert variant["points"] == pytest.approx([p.knn_ppl for p in ref_tuned.points], rel=1e-5)


@pytest.mark.parametrize("retomaton", [None, 2])
def test_uneven_generation_finishes_and_equals_serial(
    gloo, tmp_path, store_dir, saved_model, model, tokenizer, retomaton
):
    sys.path.insert(0, str(WORKER.parent))
    from distributed_search_worker import NEW_TOKENS, PROMPTS

    _run("generate", store_dir, tmp_path, str(saved_model), *([str(retomaton)] if retomaton else []))

    knn = KNNProcessor(model, Datastore.from_pretrained(store_dir), k=8, lmbda=0.5, retomaton=retomaton)
    serial = []
    for prompt, new in zip(PROMPTS, NEW_TOKENS, strict=True):
        ids = model.generate(
            **tokenizer(prompt, return_tensors="pt"),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([knn]),
        )
        serial.append(ids[0].tolist())
    got = [t for r in range(2) for t in json.loads((tmp_path / f"rank-{r}.json").read_text(encoding="utf-8"))]
    assert got == serial


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_sharded_retomaton_equals_one_process(gloo, tmp_path, store_dir, factory):
    """Pointer steps read keys and values of entries on either rank (and, for IVF, every rank's lists)."""
    sys.path.insert(0, str(WORKER.parent))
    from distributed_search_worker import reto_streams, reto_walk

    single = Datastore.from_pretrained(store_dir)
    if factory != "Flat":
        single = single.rebuild_index(factory, tmp_path / "ivf")
    _run("retomaton", single.folder, tmp_path, "2")
    for rank, positions in enumerate(reto_streams(len(single), 2)):
        got = load_file(str(tmp_path / f"rank-{rank}.safetensors"))
        ref = reto_walk(single, positions, 2)
        steps, searches = ref["stats"].tolist()
        assert got["stats"].tolist() == [steps, searches] and searches < steps / 2  # mostly pointer steps
        assert torch.equal(got["ids"], ref["ids"])
        torch.testing.assert_close(got["distances"], ref["distances"], atol=1e-5, rtol=1e-5)
        found = ref["ids"] >= 0
        assert torch.equal(got["values"][found], ref["values"][found])
        owners = (got["ids"][found] >= len(single) - len(single) // 2).unique().tolist()
        assert owners == [False, True]  # the neighbours came from both ranks' entries


def _build_per_rank(tmp_path: Path, saved_model: Path, text: str, factory: str, *fail: str):
    data = tmp_path / "corpus.txt"
    data.write_text(text, encoding="utf-8")
    args = (
        str(WORKER),
        "build",
        str(tmp_path / "remote"),
        str(tmp_path),
        str(saved_model),
        str(data),
        factory,
    )
    return _torchrun(*args, *fail, cwd=tmp_path)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_per_rank_build_opens_sharded_and_whole_as_a_default_build(
    gloo, tmp_path, saved_model, model, tokenizer, corpus_text, factory
):
    kwargs = {"max_length": 64, "stride": 32, "batch_size": 4, "index_factory": factory}
    single = Datastore.build(
        model, tokenizer, [corpus_text], tmp_path / "single", disable_progress=True, **kwargs
    )
    result = _build_per_rank(tmp_path, saved_model, corpus_text, factory)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    remote = tmp_path / "remote"
    whole = Datastore.from_pretrained(remote)  # one process: every rank's files
    parts = whole.config.rank_shards
    assert [(p["start"], p["end"]) for p in parts] == [(0, parts[0]["end"]), (parts[0]["end"], len(single))]
    assert not (remote / ".partial").exists() and not (remote / "index.faiss").exists()
    np.testing.assert_array_equal(whole.keys.to_numpy(), single.keys.to_numpy())  # bitwise, entry order
    np.testing.assert_array_equal(whole.values.to_numpy(), single.values.to_numpy())
    assert whole.config.temperature == pytest.approx(single.config.temperature, rel=1e-5)
    queries = torch.from_numpy(single.keys.take(np.arange(0, len(single), 23)).astype(np.float32)) + 0.05
    single.nprobe = whole.nprobe = 2  # not every list: the same quantizer probes the same ones
    a, b = single.search(queries, 32), whole.search(queries, 32)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.distances, b.distances, atol=1e-5, rtol=1e-5)

    if factory != "Flat":  # a range across both ranks' files (N = 3 processes would open such ranges)
        mid = parts[0]["end"]
        part = open_ivf_range(remote, whole.config, mid - 100, mid + 100, mmap=True)
        lists = list_assignment(part, mid - 100, mid + 100)
        assert part.ntotal == 200 and (lists == list_assignment(single.index, mid - 100, mid + 100)).all()
    single.nprobe = 8  # every list: exact, so the ranks' merged ids compare one to one
    rows, queries = _write_queries(single, tmp_path)
    _run("hub", remote, tmp_path)  # each rank downloads and reads its own files only
    _assert_ranks_found_as_one(single, rows, queries, tmp_path)
    every = {p.name for p in remote.iterdir()}
    for rank, part in enumerate(parts):
        shards = [s for s in whole.config.shards if part["start"] <= s["start"] < part["end"]]
        own = {s[f] for s in shards for f in ("keys", "values")} | ({part["index"]} - {None})
        others = {n for n in whole.config.files if n.startswith(("keys-", "values-", "index-"))} - own
        files = set(json.loads((tmp_path / f"files-{rank}.json").read_text()))
        assert own and files == every - others, (rank, sorted(files ^ (every - others)))


def test_per_rank_build_resumes_a_killed_rank(gloo, tmp_path, saved_model, store, corpus_text):
    result = _build_per_rank(tmp_path, saved_model, corpus_text, "IVF8,Flat", "1")
    assert result.returncode != 0 and "rank 1 killed" in result.stdout + result.stderr
    stage = tmp_path / "remote" / ".partial" / "store"
    assert not (tmp_path / "remote" / "datastore_config.json").exists()
    assert sorted(p.name for p in stage.glob("rank-*.json")) == ["rank-00000.json", "rank-00001.json"]
    result = _build_per_rank(tmp_path, saved_model, corpus_text, "IVF8,Flat")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):  # neither rank writes its shards again
        assert json.loads((tmp_path / f"build-{rank}.json").read_text()) == []
    whole = Datastore.from_pretrained(tmp_path / "remote")
    np.testing.assert_array_equal(whole.keys.to_numpy(), store.keys.to_numpy())
    assert whole.index.ntotal == len(store)


@pytest.mark.parametrize("retomaton", [None, 2])
def test_wrapper_loss_under_trainer_equals_one_process(
    gloo, tmp_path, store_dir, saved_model, other_text, retomaton
):
    sys.path.insert(0, str(WORKER.parent))
    from distributed_search_worker import trainer_loss

    data = tmp_path / "eval.txt"
    data.write_text(other_text, encoding="utf-8")
    _run(
        "trainer", store_dir, tmp_path, str(saved_model), str(data), *([str(retomaton)] if retomaton else [])
    )
    ref = trainer_loss(Datastore.from_pretrained(store_dir), str(saved_model), str(data), tmp_path, retomaton)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text(encoding="utf-8"))
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
        assert got["batch_loss"] == pytest.approx(ref["batch_loss"], rel=1e-5)
        assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    if retomaton:  # pointer steps changed the loss: the comparison sees RetoMaton, not plain kNN-LM
        plain = trainer_loss(
            Datastore.from_pretrained(store_dir), str(saved_model), str(data), tmp_path, None
        )
        assert ref["batch_loss"] != pytest.approx(plain["batch_loss"], rel=1e-6)


def test_bad_distributed_value_is_refused(store_dir):
    with pytest.raises(ValueError, match=r"distributed='shards'.*distributed='shard'"):
        Datastore.from_pretrained(store_dir, distributed="shards")


def test_one_process_shard_mode_equals_plain(store_dir):
    """Outside torchrun a sharded store is one rank holding every entry: same answers, no collectives."""
    plain = Datastore.from_pretrained(store_dir)
    sharded = Datastore.from_pretrained(store_dir, distributed="shard")
    assert sharded.sharded.world == 1 and len(sharded) == len(plain)
    queries = torch.from_numpy(plain.keys.take(np.arange(0, len(plain), 37)).astype(np.float32))
    a, b = plain.search(queries, 16), sharded.search(queries, 16)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.distances, b.distances)
    with sharded.serving():
        pass
