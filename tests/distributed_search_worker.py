"""One rank of tests/test_distributed_search.py, started by torchrun: a sharded store at work.

``python -m torch.distributed.run --nproc_per_node N tests/distributed_search_worker.py MODE STORE OUT
[MODEL DATA ...]`` (MODE: build, search, hub, retomaton, evaluate, trainer, generate) writes this rank's
results to ``OUT/rank-R.safetensors`` (tensors) or ``OUT/rank-R.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_knnlm import Datastore

PROMPTS = ["The cat", "A dog sat on", "The bird", "My friend likes the"]  # rank 0: 3 prompts, rank 1: 1
NEW_TOKENS = [6, 3, 9, 4]  # and uneven lengths
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def search(store: Datastore, out: Path) -> None:
    rank, world = store.sharded.rank, store.sharded.world
    queries = load_file(str(out / "queries.safetensors"))["queries"]
    # Uneven query counts: rank 0 takes 5, the others share the rest; then a round where rank 0 has none.
    split = [5, *[len(queries) - 5]] if world == 2 else [len(queries) // world] * world
    first = sum(split[:rank])
    mine = queries[first : first + split[rank]]
    results = {}
    for k in (8, 64):
        found = store.search(mine, k)
        results[f"ids_{k}"], results[f"distances_{k}"] = found.ids, found.distances
        results[f"values_{k}"] = found.token_ids
    found = store.search(mine, 8, recompute_dists=True)
    results["ids_recompute"], results["distances_recompute"] = found.ids, found.distances
    found = store.search(mine if rank else mine[:0], 4)
    results["ids_second"] = found.ids
    results["queries"] = mine.contiguous()
    save_file({k: v.contiguous() for k, v in results.items()}, str(out / f"rank-{rank}.safetensors"))


def tune_variants(num_tokens: int) -> dict[str, dict]:
    """tune's grids on a text of ``num_tokens`` targets (k=8): the whole text within the scale sample (the
    default), a sample inside rank 0's share, one that spans both shares, and explicit temperatures."""
    return {
        "in_rank_0": {"max_cache_bytes": 40 * 8 * 8},
        "spanning": {"max_cache_bytes": (num_tokens * 3 // 4) * 8 * 8},
        "explicit": {"max_cache_bytes": 40 * 8 * 8, "temperatures": [2.0, 30.0]},
    }


def evaluate(store: Datastore, out: Path, model_dir: str, data: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_knnlm import evaluate_perplexity, tune

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = Path(data).read_text(encoding="utf-8")
    result = evaluate_perplexity(model, tokenizer, [text], store, k=8, lmbda=0.5, batch_size=2)
    rank = store.sharded.rank
    tuned = tune(model, tokenizer, [text], store, out / f"tune-{rank}", k=8, lmbdas=[0.25, 0.5])
    variants = {
        name: tune(
            model, tokenizer, [text], store, out / f"tune-{name}-{rank}", k=8, lmbdas=[0.25, 0.5], **grid
        )
        for name, grid in tune_variants(tuned.num_tokens).items()
    }
    summary = {
        "tune_variants": {
            name: {
                "points": [p.knn_ppl for p in v.points],
                "tokens": v.num_tokens,
                "scale": v.median_nn_distance,
            }
            for name, v in variants.items()
        },
        "base_ppl": result.base_ppl,
        "knn_ppl": result.knn_ppl,
        "num_tokens": result.num_tokens,
        "searches": result.searches,
        "tune_points": [p.knn_ppl for p in tuned.points],
        "tune_tokens": tuned.num_tokens,
    }
    (out / f"rank-{store.sharded.rank}.json").write_text(json.dumps(summary), encoding="utf-8")


def train_rows(tokenizer, text: str, rows: int = 4, length: int = 24) -> list[dict[str, torch.Tensor]]:
    """``rows`` equal-length examples (input_ids = labels) cut from ``text``, for ``Trainer``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return [
        {"input_ids": ids[i * length : (i + 1) * length], "labels": ids[i * length : (i + 1) * length]}
        for i in range(rows)
    ]


def trainer_loss(store: Datastore, model_dir: str, data: str, out: Path, retomaton: int | None) -> dict:
    """Losses of ``KNNLMForCausalLM`` on ``train_rows``: ``Trainer.evaluate``'s (rows split over the ranks
    by the Trainer), one ``Trainer.train`` step's at learning rate 0 (the 4 rows are one global batch,
    split over the ranks under DDP; the backward runs) and one forward's on the first two rows (the same
    batch on every rank)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hf_knnlm import KNNLMForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for module in model.modules():  # train mode without dropout: the same loss as eval
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    wrapped = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.5, retomaton=retomaton)
    rows = train_rows(tokenizer, Path(data).read_text(encoding="utf-8"))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_eval_batch_size=1,
        per_device_train_batch_size=len(rows) // world,
        max_steps=1,
        learning_rate=0.0,
        save_strategy="no",
        logging_steps=1,  # a logged step gathers the loss of every rank (train_loss is else the local one)
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        label_names=["labels"],  # forward also takes shift_labels, which Trainer would wait for too
    )
    trainer = Trainer(model=wrapped, args=args, eval_dataset=rows, train_dataset=rows)
    metrics = trainer.evaluate()
    trained = trainer.train()
    batch = {name: torch.stack([r[name] for r in rows[:2]]) for name in ("input_ids", "labels")}
    with torch.no_grad():
        loss = wrapped.eval()(**batch).loss.item()
    return {"eval_loss": metrics["eval_loss"], "train_loss": trained.training_loss, "batch_loss": loss}


def trainer(store: Datastore, out: Path, model_dir: str, data: str, retomaton: str = "") -> None:
    result = trainer_loss(store, model_dir, data, out, int(retomaton) if retomaton else None)
    (out / f"rank-{store.sharded.rank}.json").write_text(json.dumps(result), encoding="utf-8")


def generate(store: Datastore, out: Path, model_dir: str, retomaton: str = "") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from hf_knnlm import KNNProcessor

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    knn = KNNProcessor(model, store, k=8, lmbda=0.5, retomaton=int(retomaton) if retomaton else None)
    rank = store.sharded.rank
    mine = range(3) if rank == 0 else range(3, len(PROMPTS))
    texts = []
    with store.serving():  # rank 1 finishes first and serves rank 0's searches
        for i in mine:
            inputs = tokenizer(PROMPTS[i], return_tensors="pt")
            ids = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS[i],
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                logits_processor=LogitsProcessorList([knn]),
            )
            texts.append(ids[0].tolist())
    (out / f"rank-{rank}.json").write_text(json.dumps(texts), encoding="utf-8")


def build(store_dir: str, out: Path, model_dir: str, data: str, factory: str, fail: str = "") -> None:
    """Build ``store_dir`` with ``shard_per_rank``; ``fail="1"``: rank 1 dies once its files are written.

    Writes how many shard files this rank wrote (a resumed rank writes none) to ``OUT/build-R.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_knnlm.datastore import rank_build

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rank = int(os.environ["RANK"])
    written, original = [], rank_build.write_sharded

    def write_sharded(*args, **kwargs):
        written.extend(original(*args, **kwargs))

    rank_build.write_sharded = write_sharded
    if fail and rank == 1:

        def die(*args, **kwargs):
            raise SystemExit("rank 1 killed after writing its files")

        rank_build.rank_temperature = die
    text = Path(data).read_text(encoding="utf-8")
    kwargs = {"max_length": 64, "stride": 32, "batch_size": 4, "max_shard_size": 300 * 32 * 2}
    store = Datastore.build(
        model, tokenizer, [text], store_dir, index_factory=factory, shard_per_rank=True, **kwargs
    )
    part = store.config.rank_shards[rank]  # Datastore.build returns each process its own part
    assert (store.sharded.shard.start, store.sharded.shard.end) == (part["start"], part["end"])
    (out / f"build-{rank}.json").write_text(json.dumps(written), encoding="utf-8")


def reto_streams(num_entries: int, world: int) -> list[range]:
    """The corpus positions each rank walks with RetoMaton: uneven lengths, far apart in the store."""
    starts = [(r * num_entries) // world + 40 for r in range(world)]
    return [range(s, s + 60 - 25 * (r % 2)) for r, s in enumerate(starts)]


def reto_walk(store: Datastore, positions: range, threshold: int) -> dict[str, torch.Tensor]:
    """RetoMaton down the stored keys of ``positions`` (a little off, as unseen text would be)."""
    from hf_knnlm.knnlm.retomaton import RetoMaton, stream_neighbours

    # A sharded step ranks pointer candidates by exact distance: the one-process walk it must equal.
    automaton = RetoMaton(store, threshold=threshold, k=8, pool=24, pointer_step="exact")
    keys = torch.from_numpy(store_keys(store, positions)).float()
    queries = keys + 0.01 * torch.sin(torch.arange(keys.numel(), dtype=torch.float32)).view_as(keys)
    tokens = [None, *store_values(store, positions)[:-1]]
    with store.serving():
        found = stream_neighbours(automaton, queries, tokens)
    stats = torch.tensor([automaton.steps, automaton.searches])
    return {"ids": found.ids, "distances": found.distances, "values": found.token_ids, "stats": stats}


def store_keys(store: Datastore, positions: range):
    """Keys of ``positions`` from the files in the store's folder (a rank holds only its own in memory)."""
    return Datastore.from_pretrained(store.folder).keys.take(list(positions))


def store_values(store: Datastore, positions: range) -> list[int]:
    return Datastore.from_pretrained(store.folder).values.take(list(positions)).tolist()


def retomaton(store: Datastore, out: Path, threshold: str) -> None:
    rank, world = store.sharded.rank, store.sharded.world
    found = reto_walk(store, reto_streams(len(store), world)[rank], int(threshold))
    save_file({k: v.contiguous() for k, v in found.items()}, str(out / f"rank-{rank}.safetensors"))


def from_hub(remote: str, out: Path) -> Datastore:
    """The store in the folder ``remote`` opened as the Hub repository ``user/store``: a stand-in for
    ``snapshot_download`` copies the files the patterns match into this rank's own cache snapshot."""
    import fnmatch
    import shutil

    import huggingface_hub

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ["RANK"])
    snapshot = out / f"cache-{rank}" / "snapshots" / COMMIT

    def snapshot_download(repo_id, allow_patterns=None, revision=None, **kwargs):
        assert repo_id == "user/store" and revision in (None, COMMIT), (repo_id, revision)
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in Path(remote).iterdir():
            if any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, snapshot / path.name)
        return str(snapshot)

    huggingface_hub.snapshot_download = snapshot_download
    store = Datastore.from_pretrained("user/store", distributed="shard")
    files = sorted(p.name for p in snapshot.iterdir())
    (out / f"files-{rank}.json").write_text(json.dumps(files), encoding="utf-8")
    return store


def main() -> None:
    mode, store_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.manual_seed(0)
    if mode == "build":
        build(store_dir, out, *sys.argv[4:])
    elif mode == "hub":
        search(from_hub(store_dir, out), out)
    elif mode == "search":
        search(Datastore.from_pretrained(store_dir, distributed="shard"), out)
    elif mode == "retomaton":
        retomaton(Datastore.from_pretrained(store_dir, distributed="shard"), out, sys.argv[4])
    elif mode == "evaluate":
        evaluate(Datastore.from_pretrained(store_dir, distributed="shard"), out, sys.argv[4], sys.argv[5])
    elif mode == "trainer":
        trainer(Datastore.from_pretrained(store_dir, distributed="shard"), out, *sys.argv[4:])
    else:
        generate(Datastore.from_pretrained(store_dir, distributed="shard"), out, *sys.argv[4:])
    if torch.distributed.is_initialized():  # gloo's threads must stop before the interpreter exits
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # After Trainer under DDP the interpreter's teardown aborted now and then ("terminate called without an
    # active exception" from a C++ thread left by the run); the results are written, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
