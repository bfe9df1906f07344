"""Tuning: the cached sweep equals direct evaluation, the model runs once, JSON + PNG are written."""

from __future__ import annotations

import copy
import json
import weakref

import numpy as np
import pytest

from hf_knnlm import Datastore, evaluate_perplexity
from hf_knnlm.commands import main
from hf_knnlm.datastore.config import CONFIG_NAME
from hf_knnlm.knnlm import tuning
from hf_knnlm.knnlm.scored import collect_queries, iter_scored_batches
from hf_knnlm.knnlm.tuning import (
    CACHE_BYTES,
    PLOT_NAME,
    RESULTS_NAME,
    base_perplexity,
    build_tuning_cache,
    median_nn_distance,
    sweep,
    sweep_result,
    temperature_grid,
    tune,
)
from hf_knnlm.knnlm.tuning_grid import TuningGrid
from hf_knnlm.lm.windows import count_windows

WINDOWS = {"max_length": 64, "stride": 32, "batch_size": 4, "disable_progress": True}


@pytest.fixture(scope="module")
def cache(model, tokenizer, other_text, store_dir):
    return build_tuning_cache(
        model, tokenizer, [other_text], Datastore.from_pretrained(store_dir), k=32, **WINDOWS
    )


@pytest.mark.parametrize(
    "k,lmbda,temperature", [(32, 0.25, 1.0), (8, 0.6, 20.0), (1, 0.1, 3.0), (32, 1.0, 50.0)]
)
def test_sweep_equals_direct_evaluation(model, tokenizer, other_text, store, cache, k, lmbda, temperature):
    (point,) = sweep(cache, [lmbda], [temperature], [k])
    direct = evaluate_perplexity(
        model, tokenizer, [other_text], store, k=k, lmbda=lmbda, temperature=temperature, **WINDOWS
    )
    assert point["knn_ppl"] == pytest.approx(direct["knn_ppl"], rel=1e-6)
    assert len(cache.targets) == direct["num_tokens"]


def test_cache_from_collected_queries_equals_cache(model, tokenizer, other_text, store, cache):
    queries = collect_queries(model, tokenizer, [other_text], store, **WINDOWS)
    again = queries.search(store, 32)
    grid = ([0.2, 0.5], [2.0, 40.0], [4, 32])
    got, expected = sweep(again, *grid), sweep(cache, *grid)
    assert [{k: v for k, v in p.items() if k != "knn_ppl"} for p in got] == [
        {k: v for k, v in p.items() if k != "knn_ppl"} for p in expected
    ]
    assert [p["knn_ppl"] for p in got] == pytest.approx([p["knn_ppl"] for p in expected])


def test_tune_runs_the_model_once_per_batch(model, tokenizer, other_text, store, tmp_path):
    model = copy.deepcopy(model)  # not yet scored: its LM head path is checked once (2 one-window passes)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        result = tune(
            model,
            tokenizer,
            [other_text],
            store,
            tmp_path,
            k=16,
            ks=[4, 16],
            lmbdas=[0.1, 0.3, 0.5],
            temperature_multiples=[0.5, 1.0, 2.0],
            **WINDOWS,
        )
    finally:
        handle.remove()
    n = len(tokenizer(other_text)["input_ids"])
    assert len(calls) == -(-count_windows(n, 64, 32) // 4) + 2  # one forward per batch, none per setting
    assert len(result["points"]) == 2 * 5 * 3  # 3 multiples + the plain 1 and 10


def test_tune_writes_json_and_png(model, tokenizer, other_text, store, tmp_path):
    result = tune(
        model,
        tokenizer,
        [other_text],
        store,
        tmp_path,
        k=16,
        ks=[4, 16],
        lmbdas=[0.0, 0.2, 0.5],
        temperatures=[1.0, 10.0],
        **WINDOWS,
    )
    saved = json.loads((tmp_path / RESULTS_NAME).read_text())
    assert len(saved["points"]) == 2 * 2 * 3
    assert saved["best"] == min(saved["points"], key=lambda p: p["knn_ppl"])
    assert saved["best"] == result.best.to_dict()
    at_zero = [p["knn_ppl"] for p in saved["points"] if p["lmbda"] == 0.0]
    assert at_zero == pytest.approx([saved["base_ppl"]] * len(at_zero), rel=1e-6)  # lmbda=0 is the LM
    png = (tmp_path / PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000


def test_temperature_grid_follows_distance_scale(cache):
    scale = median_nn_distance(cache)
    assert scale == pytest.approx(float(np.median(cache.neighbours.distances[:, 0].numpy())), rel=1e-6)
    grid = temperature_grid(cache, multiples=[0.5, 2.0], plain=[1.0])
    assert grid == pytest.approx(sorted([0.5 * scale, 2.0 * scale, 1.0]), rel=1e-5)


def test_cache_is_capped_and_tune_is_not(model, tokenizer, other_text, store, tmp_path):
    k = 16
    assert CACHE_BYTES == 512 << 20 and TuningGrid().max_cache_bytes == 64 << 20
    capped = build_tuning_cache(
        model, tokenizer, [other_text], store, k=k, max_cache_bytes=100 * k * 8, **WINDOWS
    )
    assert len(capped.targets) == 100
    assert capped.neighbours.distances.shape == (100, k) and capped.neighbours.token_ids.dtype.itemsize == 4
    # for tune, max_cache_bytes is the scale sample: the whole text is still scored
    result = tune(
        model, tokenizer, [other_text], store, tmp_path, k=k, max_cache_bytes=100 * k * 8, **WINDOWS
    )
    assert result.num_tokens == len(tokenizer(other_text)["input_ids"]) - 1 > 100
    for call in (
        lambda: build_tuning_cache(model, tokenizer, [other_text], store, k=k, max_cache_bytes=8, **WINDOWS),
        lambda: tune(model, tokenizer, [other_text], store, tmp_path, k=k, max_cache_bytes=8, **WINDOWS),
    ):
        with pytest.raises(ValueError, match=r"max_cache_bytes=8 cannot hold one token's 16 neighbours"):
            call()


STREAM = {**WINDOWS, "batch_size": 1}  # many batches of 32 targets (the first 64)
SAMPLE = 40  # tokens in the scale sample: the first batch and part of the second


def _streamed(model, tokenizer, text, store, tmp_path, **grid):
    k = 16
    return tune(
        model, tokenizer, [text], store, tmp_path, k=k, max_cache_bytes=SAMPLE * k * 8, **grid, **STREAM
    )


def _full_cache(model, tokenizer, text, store):
    return build_tuning_cache(model, tokenizer, [text], store, k=16, **STREAM)


def test_streamed_sweep_equals_the_sweep_of_the_whole_cache(model, tokenizer, other_text, store, tmp_path):
    grid = {"lmbdas": [0.0, 0.3, 0.9], "temperatures": [0.5, 4.0, 30.0], "ks": [1, 5, 16]}
    result = _streamed(model, tokenizer, other_text, store, tmp_path, **grid)
    cache = _full_cache(model, tokenizer, other_text, store)
    assert len(cache) > 10 * SAMPLE and result.num_tokens == len(cache)
    expected = sweep(cache, grid["lmbdas"], grid["temperatures"], grid["ks"])
    assert [(p.k, p.temperature, p.lmbda) for p in result.points] == [
        (p.k, p.temperature, p.lmbda) for p in expected
    ]
    assert [p.knn_ppl for p in result.points] == pytest.approx([p.knn_ppl for p in expected], rel=1e-9)
    assert result.base_ppl == pytest.approx(base_perplexity(cache), rel=1e-9)
    first = cache.neighbours.distances[:SAMPLE, 0].numpy()
    assert result.median_nn_distance == float(np.median(first))


def test_default_temperatures_come_from_the_first_tokens(model, tokenizer, other_text, store, tmp_path):
    multiples = [0.5, 1.0, 3.0]
    result = _streamed(model, tokenizer, other_text, store, tmp_path, temperature_multiples=multiples)
    cache = _full_cache(model, tokenizer, other_text, store)
    scale = float(np.median(cache.neighbours.distances[:SAMPLE, 0].numpy()))
    assert result.median_nn_distance == scale != median_nn_distance(cache)  # not the whole text's
    temperatures = sorted({float(f"{m * scale:.6g}") for m in multiples} | {1.0, 10.0})
    assert sorted({p.temperature for p in result.points}) == temperatures
    expected = sweep(cache, TuningGrid().lmbdas, temperatures, [8, 16])
    assert [p.knn_ppl for p in result.points] == pytest.approx([p.knn_ppl for p in expected], rel=1e-9)


def test_a_text_within_the_sample_gives_the_cache_sweep_exactly(
    model, tokenizer, other_text, store, tmp_path
):
    result = tune(model, tokenizer, [other_text], store, tmp_path, k=16, **STREAM)  # 64 MiB: all of it
    expected = sweep_result(_full_cache(model, tokenizer, other_text, store))
    assert result.points == expected.points and result.best == expected.best
    assert (result.median_nn_distance, result.base_ppl) == (expected.median_nn_distance, expected.base_ppl)


@pytest.mark.parametrize("temperatures", [None, [2.0, 20.0]])
def test_tune_holds_no_more_than_the_sample_and_one_batch(
    model, tokenizer, other_text, store, tmp_path, monkeypatch, temperatures
):
    alive: list[tuple[weakref.ref, int]] = []
    most = []

    def spied(*args, **kwargs):
        for batch in iter_scored_batches(*args, **kwargs):
            most.append(sum(rows for ref, rows in alive if ref() is not None) + len(batch))
            alive.append((weakref.ref(batch.neighbours.distances), len(batch)))
            yield batch

    monkeypatch.setattr(tuning, "iter_scored_batches", spied)
    result = _streamed(model, tokenizer, other_text, store, tmp_path, temperatures=temperatures)
    biggest = max(rows for _, rows in alive)
    assert len(most) > 10 and result.num_tokens > 10 * SAMPLE
    assert max(most) <= SAMPLE + biggest  # the sample's batches and one batch, not the text


def test_sweep_rejects_k_above_searched(cache):
    with pytest.raises(ValueError, match="k=64"):
        sweep(cache, [0.2], [1.0], [64])
    with pytest.raises(ValueError, match="lmbda"):
        sweep(cache, [1.2], [1.0], [8])


def test_rebuild_index_copies_store(store, tmp_path):
    new = store.rebuild_index("IVF4,PQ4", tmp_path / "ivf")
    assert new.config.index_factory == "IVF4,PQ4" and store.config.index_factory == "Flat"
    assert len(new) == len(store) and new.index.ntotal == len(store)
    assert np.array_equal(new.keys.to_numpy(), store.keys.to_numpy())
    assert np.array_equal(new.values.to_numpy(), store.values.to_numpy())
    inodes = {p.stat().st_ino for p in store.folder.iterdir()}
    shards = {s[part] for s in store.config.shards for part in ("keys", "values")}
    # the keys and values are hard links (the index and the config are the new store's own), no symlinks
    assert {p.name for p in new.folder.iterdir() if p.stat().st_ino in inodes} == shards
    assert not any(p.is_symlink() for p in new.folder.iterdir())
    Datastore.from_pretrained(new.folder, verify=True)  # hashes recorded
    with pytest.raises(FileExistsError):
        store.rebuild_index("Flat", tmp_path / "ivf")
    with pytest.raises(ValueError, match="store itself"):
        store.rebuild_index("Flat", store.folder)
    with pytest.raises(ValueError, match="index_factory"):
        store.rebuild_index("NotAFactory", tmp_path / "bad")


def test_cli_tune_and_reindex(model, tokenizer, other_text, store_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "valid.txt"
    text.write_text(other_text, encoding="utf-8")
    assert (
        main(
            [
                "reindex",
                "--datastore",
                str(store_dir),
                "--output",
                str(tmp_path / "ivf"),
                "--index-factory",
                "IVF4,Flat",
            ]
        )
        == 0
    )
    assert (tmp_path / "ivf" / CONFIG_NAME).is_file()
    out = tmp_path / "tune"
    assert (
        main(
            [
                "tune",
                "--model",
                str(model_dir),
                "--data",
                str(text),
                "--datastore",
                str(tmp_path / "ivf"),
                "--nprobe",
                "4",
                "--max-length",
                "64",
                "--stride",
                "32",
                "--batch-size",
                "4",
                "--k",
                "16",
                "--ks",
                "4,16",
                "--lmbdas",
                "0.1,0.4",
                "--temperature-multiples",
                "1,2",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    assert "best: --k" in capsys.readouterr().out
    saved = json.loads((out / RESULTS_NAME).read_text())
    assert len(saved["points"]) == 2 * 4 * 2 and (out / PLOT_NAME).is_file()
    assert (
        main(
            [
                "tune",
                "--model",
                str(model_dir),
                "--data",
                str(text),
                "--datastore",
                str(tmp_path / "ivf"),
                "--k",
                "16",
                "--ks",
                "32",
                "--output-dir",
                str(out),
            ]
        )
        == 2
    )  # before any forward pass
    assert "k=32 must be an integer in [1, 16]" in capsys.readouterr().err
