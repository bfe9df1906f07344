"""Multi-process build under accelerate: 2 CPU processes give the single-process store entry for entry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import PartialState

from hf_knnlm import Datastore
from hf_knnlm.datastore.config import CONFIG_NAME, DatastoreConfig
from hf_knnlm.datastore.distributed import window_range

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import require
except ImportError:
    from conftest import require

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("num_windows,num_processes", [(10, 2), (11, 2), (7, 3), (1, 2), (0, 4)])
def test_window_range_is_accelerate_split(num_windows, num_processes):
    ranges = [window_range(num_windows, r, num_processes) for r in range(num_processes)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_windows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, in rank order
    # the same split as accelerate's split_between_processes, rank by rank
    for rank, (first, last) in enumerate(ranges):
        state = type("S", (), {"num_processes": num_processes, "process_index": rank})()
        split = PartialState.split_between_processes.__wrapped__(state, list(range(num_windows)))
        assert list(next(split)) == list(range(first, last))


def test_window_range_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank=2"):
        window_range(10, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("shard_per_rank", [False, True])
def test_two_process_build_equals_single_process(tmp_path, model, tokenizer, corpus_text, shard_per_rank):
    # The launcher of the active environment (an activated virtual environment puts it on PATH).
    launcher = shutil.which("accelerate")
    require(
        launcher is not None,
        "the `accelerate` launcher is not on PATH (activate the environment that has the accelerate "
        "package, e.g. `. .venv/bin/activate`)",
    )
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    build_args = {"max_length": 64, "stride": 32, "batch_size": 4}

    single = Datastore.build(
        model, tokenizer, corpus, tmp_path / "single", disable_progress=True, **build_args
    )

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    # --multi_gpu makes accelerate start the processes with torchrun; without CUDA they use gloo on CPU.
    cmd = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "hf_knnlm",
        "build",
        "--model",
        str(model_dir),
        "--data",
        str(corpus),
        "--output",
        str(tmp_path / "multi"),
        "--max-length",
        "64",
        "--stride",
        "32",
        "--batch-size",
        "4",
        *(["--shard-per-rank"] if shard_per_rank else []),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("Datastore(") == 2  # both processes returned the finished store

    multi = Datastore.from_pretrained(tmp_path / "multi")
    assert not (tmp_path / "multi" / ".partial").exists()
    assert len(multi) == len(single)
    if shard_per_rank:  # one keys and one values shard per process, each process's own entries
        parts = multi.config.rank_shards
        assert [(s["start"], s["end"]) for s in multi.config.shards] == [
            (p["start"], p["end"]) for p in parts
        ]
        assert len(parts) == 2 and 0 < parts[0]["end"] < len(single)
        assert multi.config.format_version == 2  # a Flat per-rank store has no index file to announce
    else:
        assert multi.config.shards == single.config.shards
    np.testing.assert_array_equal(multi.values.to_numpy(), single.values.to_numpy())
    # Same model, same windows: the keys are bitwise equal in fp16 (not merely close).
    np.testing.assert_array_equal(multi.keys.to_numpy(), single.keys.to_numpy())
    assert multi.index.ntotal == single.index.ntotal
    q = single.keys.take(np.arange(0, len(single), 97)).astype(np.float32)
    np.testing.assert_array_equal(multi.search_ids(q, 8)[1], single.search_ids(q, 8)[1])


@pytest.mark.skipif(sys.platform != "linux", reason="fork-free check of the rank folder layout only")
def test_rank_progresses_single_process_layout(tmp_path):
    from hf_knnlm.datastore.progress import rank_progresses

    state = type("S", (), {"num_processes": 1, "process_index": 0})()
    (progress,) = rank_progresses(tmp_path / ".partial", "fp", 5, state)
    assert progress.folder == tmp_path / ".partial"
    state = type("S", (), {"num_processes": 2, "process_index": 1})()
    progresses = rank_progresses(tmp_path / ".partial2", "fp", 5, state)
    assert [p.folder.name for p in progresses] == ["rank-00000", "rank-00001"]
    assert not progresses[0].folder.exists() and progresses[1].folder.exists()  # only its own folder


def test_shard_per_rank_is_checked_before_the_model_runs(tmp_path, model, tokenizer):
    with pytest.raises(ValueError, match=r"shard_per_rank=.*yes"):
        Datastore.build(
            model, tokenizer, ["a b c"], tmp_path / "a", max_length=16, stride=8, shard_per_rank="yes"
        )
    with pytest.raises(ValueError, match=r"index_factory='HNSW8' is not an IVF index.*'Flat'"):
        Datastore.build(
            model,
            tokenizer,
            ["a b c"],
            tmp_path / "b",
            max_length=16,
            stride=8,
            index_factory="HNSW8",
            shard_per_rank=True,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_one_process_shard_per_rank_build_equals_default(tmp_path, model, tokenizer, corpus_text):
    """One process is one rank: its files, an index-00001-of-00001.faiss, the default build's answers."""
    kwargs = {
        "max_length": 64,
        "stride": 32,
        "batch_size": 4,
        "index_factory": "IVF4,Flat",
        "disable_progress": True,
    }
    single = Datastore.build(model, tokenizer, [corpus_text], tmp_path / "single", **kwargs)
    ranked = Datastore.build(
        model, tokenizer, [corpus_text], tmp_path / "ranked", shard_per_rank=True, **kwargs
    )
    assert ranked.config.rank_shards == [
        {"start": 0, "end": len(single), "index": "index-00001-of-00001.faiss"}
    ]
    assert ranked.config.temperature == single.config.temperature
    # Its index files are ones a reader of format 2 does not know: only this store says 3.
    assert (ranked.config.format_version, single.config.format_version) == (3, 2)
    q = single.keys.take(np.arange(0, len(single), 31)).astype(np.float32) + 0.05
    single.nprobe = ranked.nprobe = 1
    np.testing.assert_array_equal(ranked.search_ids(q, 16)[1], single.search_ids(q, 16)[1])
    resaved = Datastore.from_pretrained(ranked.save_pretrained(tmp_path / "resaved"), nprobe=1)
    assert resaved.config.rank_shards is None and (tmp_path / "resaved" / "index.faiss").is_file()
    np.testing.assert_array_equal(resaved.search_ids(q, 16)[1], single.search_ids(q, 16)[1])


def test_an_older_reader_refuses_a_per_rank_store_by_its_version(tmp_path, model, tokenizer, monkeypatch):
    """A reader of format 2 names the version and the upgrade, not a missing index.faiss hash."""
    kwargs = {"max_length": 16, "stride": 8, "index_factory": "IVF2,Flat", "disable_progress": True}
    text = ["a b c d e f g h i j k l m n o p q r s t u v w x y z " * 4]
    Datastore.build(model, tokenizer, text, tmp_path / "ranked", shard_per_rank=True, **kwargs)
    Datastore.build(model, tokenizer, text, tmp_path / "single", **kwargs)
    saved = json.loads((tmp_path / "ranked" / CONFIG_NAME).read_text())
    assert saved["format_version"] == 3 and "index.faiss" not in saved["files"]
    monkeypatch.setattr(DatastoreConfig, "FORMAT_VERSION", 2)  # the release before per-rank builds
    assert len(Datastore.from_pretrained(tmp_path / "single")) > 0
    with pytest.raises(
        ValueError, match=r"format_version 3 in datastore_config.json, newer than the 2 .*pip install -U"
    ):
        Datastore.from_pretrained(tmp_path / "ranked")
