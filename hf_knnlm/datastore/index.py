"""faiss specifics: index-factory strings, training on a sample, chunked adds, safe file IO.

faiss is imported when a function here first needs it (``hf_knnlm.utils.faiss_support.import_faiss``),
so that importing this module does not require it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..utils.faiss_support import import_faiss
from ..utils.files import atomic_path

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

INDEX_NAME = "index.faiss"
DEFAULT_NPROBE = 32
DEFAULT_INDEX_FACTORY = "Flat"  # exact search; "IVF4096,PQ64" for large stores
DEFAULT_TRAIN_SIZE = 1_000_000  # keys sampled to train an index (and a PCA)
# Exact search: no index file is written; the index is rebuilt from the stored fp16 keys when a store
# is opened, so the keys are kept once (an fp32 faiss copy would be twice the size of the keys).
EXACT_FACTORY = "Flat"


def new_index(factory: str, dim: int, metric: int | None = None) -> faiss.Index:
    """An empty index of type ``factory`` (squared L2 unless ``metric`` is given)."""
    faiss = import_faiss("building a faiss index")
    metric = faiss.METRIC_L2 if metric is None else metric
    try:
        index = faiss.index_factory(dim, factory, metric)
    except RuntimeError as err:
        raise ValueError(
            f"index_factory={factory!r} is not a valid faiss index-factory string for dimension {dim} "
            f"(e.g. 'Flat', 'IVF4096,PQ64', 'IVF1024,Flat'): {err}"
        ) from err
    skip_polysemous_training(index)
    return index


def skip_polysemous_training(index: faiss.Index) -> None:
    """faiss trains PQ codes for polysemous search by default (an annealing of the code order, ~1 s
    per sub-quantizer: most of the training time of an ``IVF...,PQ64``); searches here never use
    it (``polysemous_ht`` stays 0) and the centroids are the same without it."""
    faiss = import_faiss()
    for part in (faiss.try_extract_index_ivf(index), index):
        if part is not None:
            part = faiss.downcast_index(part)
            if hasattr(part, "do_polysemous_training"):
                part.do_polysemous_training = False


def check_index_factory(factory: str, dim: int, num_keys: int, train_size: int) -> None:
    """Refuse, before any work, a factory string faiss rejects or an IVF with more lists than keys."""
    index = new_index(factory, dim)
    ivf = import_faiss().try_extract_index_ivf(index)
    usable = min(num_keys, train_size)
    if ivf is not None and ivf.nlist > usable:
        raise ValueError(
            f"index_factory={factory!r} has {ivf.nlist} IVF lists but only {usable} keys to train them on "
            f"(faiss needs one per list, ~39 per list to train well); use fewer lists, e.g. "
            f"'IVF{max(1, usable // 39)},Flat', or 'Flat'."
        )


def train_sample(keys, num_rows: int, sample_size: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of rows (sorted, so memory-mapped reads stay sequential) as float32."""
    rng = np.random.default_rng(seed)
    if num_rows <= sample_size:
        rows = np.arange(num_rows)
    else:
        rows = np.sort(rng.choice(num_rows, size=sample_size, replace=False))
    return np.ascontiguousarray(keys.take(rows), dtype=np.float32)


def build_index(
    factory: str,
    dim: int,
    keys,
    chunks: Iterable[np.ndarray],
    *,
    train_size: int = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
    metric: int | None = None,
) -> faiss.Index:
    """Create, train (on a sample of ``keys``) and fill an index from float16/float32 row chunks."""
    index = trained_index(factory, dim, keys, train_size=train_size, seed=seed, metric=metric)
    for chunk in chunks:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    return index


def trained_index(
    factory: str,
    dim: int,
    keys,
    *,
    train_size: int = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
    metric: int | None = None,
) -> faiss.Index:
    """An empty index of type ``factory`` trained on a sample of ``keys`` (the ``train_sample`` of
    ``build_index``: the same keys give the same quantizer, whichever process trains it)."""
    index = new_index(factory, dim, metric)
    if not index.is_trained:
        sample = train_sample(keys, len(keys), train_size, seed)
        if len(sample) < 1:
            raise ValueError("cannot train a faiss index on an empty datastore.")
        try:
            index.train(sample)
        except RuntimeError as err:  # e.g. fewer training points than PQ / IVF centroids
            raise ValueError(
                f"index_factory={factory!r} could not be trained on {len(sample)} keys "
                f"({str(err).splitlines()[-1][:200]}); use a smaller index (fewer lists or codes) or 'Flat'."
            ) from err
    return index


def is_exact(factory: str) -> bool:
    """Whether ``factory`` is the exact index, which a store keeps no file for."""
    return factory.replace(" ", "") == EXACT_FACTORY


def exact_index(keys: Iterable[np.ndarray], dim: int) -> faiss.Index:
    """An exact (squared L2) index over fp16 key chunks, held as float32 in RAM (4 bytes per value)."""
    index = import_faiss("Opening a kNN-LM datastore").IndexFlatL2(dim)
    for chunk in keys:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    return index


def has_mapped_lists(index: faiss.Index) -> bool:
    """Whether ``index`` has IVF lists memory-mapped from its file (``read_index(..., mmap=True)``)."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(
        faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists
    )


def write_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write through Python's file object: faiss's own writer ignores a failed final flush (a full
    disk leaves a silently truncated file), Python's raises."""
    faiss = import_faiss("writing a faiss index")
    if has_mapped_lists(index):  # faiss would write a reference to a file name it keeps empty
        raise ValueError(
            f"cannot write {path}: the index's IVF lists are memory-mapped from its file; read it with "
            f"mmap=False (read_index(path, mmap=False)) and write that copy."
        )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        f.flush()
        os.fsync(f.fileno())


# IVF indexes with plain array inverted lists (fourcc at the start of the file): IO_FLAG_MMAP maps
# their lists, codes and ids alike. Every other type (Flat, PQ, HNSW, fast-scan IVF) keeps its codes
# in a flat-codes storage that only IO_FLAG_MMAP_IFC maps (IO_FLAG_MMAP would read it into RAM).
_IVF_ARRAY_FOURCCS = (b"IwFl", b"IwPQ", b"IwSq")


def _mmap_flag(path: Path) -> int:
    faiss = import_faiss()
    with open(path, "rb") as f:
        fourcc = f.read(4)
    if fourcc in _IVF_ARRAY_FOURCCS or not hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        return faiss.IO_FLAG_MMAP
    return faiss.IO_FLAG_MMAP_IFC


def read_index(path: str | os.PathLike, mmap: bool = True) -> faiss.Index:
    """Open an index, memory-mapped when its type allows it (IVF lists, flat codes)."""
    faiss = import_faiss("opening a faiss index")
    path = Path(path)
    if mmap:
        try:
            return faiss.read_index(str(path), _mmap_flag(path) | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            logger.debug("index type of %s cannot be memory-mapped; reading it into RAM", path)
    return faiss.read_index(str(path))


def search_parameters(index: faiss.Index, nprobe: int) -> faiss.SearchParameters | None:
    """Per-search ``nprobe`` for a CPU index, or None when it has no IVF part.

    Passing ``nprobe`` with each search (rather than setting ``index.nprobe``) means a change from
    another thread never reaches a search already running: faiss reads ``nprobe`` more than once
    per search, and a change in between indexes past its arrays.
    """
    faiss = import_faiss()
    if faiss.try_extract_index_ivf(index) is None:
        return None
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=params)
    if isinstance(top, faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(base_index_params=params)
    return params


def set_nprobe(index: faiss.Index, nprobe: int, on_gpu: bool = False) -> None:
    faiss = import_faiss()
    if on_gpu:
        # GPU indexes (and their shard/replica wrappers) are reached through the parameter space.
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(nprobe, GPU_MAX_K))
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


# ----------------------------------------------------------------- threads
FAISS_THREADS_ENV = "HF_KNNLM_FAISS_THREADS"
_explicit_faiss_threads: int | None = None


def configure_threads(faiss_threads: int | None = None, torch_threads: int | None = None) -> tuple[int, int]:
    """Set the OpenMP thread counts of faiss and torch so that they don't oversubscribe the cores.

    In kNN-LM the two never run at once (forward pass, then search), so the default gives faiss the
    same count as torch (``torch.get_num_threads()``: ``OMP_NUM_THREADS`` or the core count). Two
    cases exist, and this choice is right in both: when torch is imported before faiss (the usual
    order: transformers first), faiss's ``omp_*`` calls bind to torch's already-loaded libgomp, so
    there is one runtime and one count (setting faiss's would silently change torch's; torch's
    count is therefore set last and wins); otherwise each has its own pool.

    Args:
        faiss_threads (`int`, *optional*): faiss threads; defaults to the ``HF_KNNLM_FAISS_THREADS``
            environment variable, else to the count of an earlier explicit call, else to torch's count.
            [`Datastore`][hf_knnlm.Datastore] calls this (with no arguments) when it opens a store.
        torch_threads (`int`, *optional*): torch threads; defaults to the current count.

    Returns:
        `(faiss_threads, torch_threads)` in effect afterwards, as the libraries report them.
    """
    import torch

    faiss = import_faiss("setting faiss threads")
    for name, value in (("faiss_threads", faiss_threads), ("torch_threads", torch_threads)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be a positive number of threads.")
    global _explicit_faiss_threads
    torch_threads = torch_threads or torch.get_num_threads()
    if faiss_threads is not None:
        _explicit_faiss_threads = faiss_threads  # later default calls (opening a store) keep it
    elif os.environ.get(FAISS_THREADS_ENV):
        faiss_threads = int(os.environ[FAISS_THREADS_ENV])
    else:
        faiss_threads = _explicit_faiss_threads
    faiss.omp_set_num_threads(faiss_threads or torch_threads)
    torch.set_num_threads(torch_threads)
    return faiss.omp_get_max_threads(), torch.get_num_threads()


# ----------------------------------------------------------------- GPU
GPU_MODES = ("auto", "replicate", "shard", "none")
GPU_MAX_K = 2048  # largest k (and nprobe) faiss GPU indexes accept


def num_gpus() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (which has no ``index_cpu_to_all_gpus``) or no CUDA."""
    faiss = import_faiss()
    if not hasattr(faiss, "index_cpu_to_all_gpus") or not hasattr(faiss, "GpuMultipleClonerOptions"):
        return 0
    return int(faiss.get_num_gpus())


def index_to_gpus(
    index: faiss.Index, gpu: str | bool | None = "auto", use_float16: bool = True, device: int | None = None
) -> faiss.Index:
    """Clone ``index`` onto every visible GPU, or return it unchanged when there is none.

    Args:
        index (`faiss.Index`): a CPU index (memory-mapped is fine; its codes are copied).
        gpu (`str`, defaults to `"auto"`): ``"auto"`` / ``"replicate"``: a full copy per GPU, queries
            split across them (fastest when the index fits one GPU); ``"shard"``: entries split
            across GPUs (for indexes larger than one GPU's memory); ``"none"`` (or `False`): stay on CPU.
        use_float16 (`bool`, defaults to `True`): float16 IVFPQ lookup tables / flat storage on the
            GPU, needed for PQ codes of 56+ bytes and halves GPU memory.
        device (`int`, *optional*): clone onto this GPU only (a rank of a sharded store: its own GPU).
    """
    mode = {True: "auto", False: "none", None: "none"}.get(gpu, gpu)
    if mode not in GPU_MODES:
        raise ValueError(f"gpu={gpu!r} must be one of {GPU_MODES} (or True/False).")
    count = num_gpus() if mode != "none" else 0
    if count == 0:
        if mode in ("replicate", "shard"):
            logger.warning("gpu=%r, but faiss sees no GPU (faiss-cpu or no CUDA); staying on CPU.", mode)
        return index
    faiss = import_faiss()
    if device is not None:
        options = faiss.GpuClonerOptions()
        options.useFloat16 = use_float16
        resources = faiss.StandardGpuResources()
        clone = faiss.index_cpu_to_gpu(resources, device, index, options)
        clone.referenced_objects = [resources]  # the clone needs them for its life
        return clone
    options = faiss.GpuMultipleClonerOptions()
    options.shard = mode == "shard"
    options.useFloat16 = use_float16
    logger.info("Cloning the faiss index to %d GPU(s) (shard=%s).", count, options.shard)
    return faiss.index_cpu_to_all_gpus(index, co=options)
