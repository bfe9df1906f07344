"""The resumable part of a build: the model pass over the windows, checkpointed to disk in chunks.

Each process writes its keys and next tokens to ``chunk-*.safetensors`` every ``checkpoint_every``
entries, together with a ``progress.json`` (the windows done, the chunks holding them, and a fingerprint of
the corpus and settings); a killed build started again with the same corpus and settings resumes at the
next window, one with other settings starts over. After a barrier the main process checks every process's
progress and reads all chunks, memory-mapped, in window order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from ..lm.forward import iter_window_batches
from ..utils.files import atomic_path, atomic_write_json
from .config import DatastoreConfig
from .distributed import place_model, rank_fingerprint, rank_folder, window_range
from .storage import ShardedArray, open_memmap

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"


def build_fingerprint(tokens: np.ndarray, config: DatastoreConfig) -> str:
    """The corpus and every recorded setting (not what the build itself fills in): a change starts over."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("files", "shards", "num_entries")}
    digest = hashlib.sha256(tokens.tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


class Progress:
    """The resumable state of a build: which windows are done and which chunks hold them."""

    def __init__(self, folder: Path, fingerprint: str, load_only: bool = False):
        self.folder = folder
        self.path = folder / PROGRESS_NAME
        self.fingerprint = fingerprint
        if load_only:  # another process owns this folder; read it with reload() once it is done
            self.state = {"fingerprint": fingerprint, "windows_done": 0, "chunks": []}
            return
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if state.get("fingerprint") != fingerprint:
            if state:
                logger.warning(
                    "%s belongs to a different build (corpus or settings changed); starting over.", folder
                )
            shutil.rmtree(folder, ignore_errors=True)
            state = {"fingerprint": fingerprint, "windows_done": 0, "chunks": []}
        folder.mkdir(parents=True, exist_ok=True)
        self.state = state

    def reload(self) -> None:
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if state.get("fingerprint") != self.fingerprint:
            raise RuntimeError(f"{self.path} is missing or from another build; a process did not finish.")
        self.state = state

    @property
    def windows_done(self) -> int:
        return self.state["windows_done"]

    def add_chunk(self, keys: np.ndarray, values: np.ndarray, windows_done: int) -> None:
        name = f"chunk-{len(self.state['chunks']):06d}.safetensors"
        with atomic_path(self.folder / name) as tmp:
            save_file({"keys": keys, "values": values}, str(tmp))
        self.state["chunks"].append({"file": name, "rows": len(values)})
        self.state["windows_done"] = windows_done
        atomic_write_json(self.path, self.state)

    def arrays(self) -> tuple[ShardedArray, ShardedArray]:
        files = [self.folder / c["file"] for c in self.state["chunks"]]
        return (
            ShardedArray([open_memmap(f, "keys") for f in files]),
            ShardedArray([open_memmap(f, "values") for f in files]),
        )


class ChunkBuffer:
    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.rows = 0

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys.append(keys.to(torch.float16).cpu().numpy())
        self.values.append(values.to(torch.int32).cpu().numpy())
        self.rows += len(values)

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        out = np.concatenate(self.keys), np.concatenate(self.values)
        self.__init__()
        return out


def rank_progresses(partial: Path, fingerprint: str, num_windows: int, state) -> list[Progress]:
    """The progress of every process; a single process keeps its chunks directly in ``partial``.

    Each process opens (and, if stale, resets) only its own folder; the main process reads the
    others' after the barrier.
    """
    if state.num_processes == 1:
        return [Progress(partial, fingerprint)]
    return [
        Progress(
            rank_folder(partial, rank),
            rank_fingerprint(fingerprint, rank, state.num_processes, num_windows),
            load_only=rank != state.process_index,
        )
        for rank in range(state.num_processes)
    ]


def embed_windows(
    model: torch.nn.Module,
    tokens: np.ndarray,
    windows: list[tuple[int, int]],
    progresses: list[Progress],
    state,
    output_dir: Path,
    *,
    batch_size: int,
    hook_module: str,
    checkpoint_every: int,
    disable_progress: bool | None,
    expected_width: int | None,
) -> None:
    """This process's share of the model pass, from the window its progress stopped at; keys go to disk
    every ``checkpoint_every`` entries, so a killed build loses at most that much."""
    first, last = window_range(len(windows), state.process_index, state.num_processes)
    progress = progresses[state.process_index]
    if progress.windows_done:
        logger.info(
            "Resuming the build of %s at window %d/%d", output_dir, first + progress.windows_done, last
        )
    buffer = ChunkBuffer()
    place_model(model, state).eval()
    for batch in iter_window_batches(
        model,
        tokens,
        windows[first:last],
        batch_size=batch_size,
        hook_module=hook_module,
        start_window=progress.windows_done,
        desc="building datastore",
        disable_progress=disable_progress or not state.is_local_main_process,
        expected_width=expected_width,
    ):
        buffer.add(batch.hidden, batch.targets)
        done = batch.first_window + batch.num_windows
        if buffer.rows >= checkpoint_every or done == last - first:
            progress.add_chunk(*buffer.drain(), windows_done=done)


def check_ranks_done(progresses: list[Progress], num_windows: int, num_processes: int) -> None:
    """Reread every process's progress after the barrier: a store is never written with windows missing."""
    for rank, p in enumerate(progresses):
        p.reload()
        todo = window_range(num_windows, rank, num_processes)
        if p.windows_done != todo[1] - todo[0]:
            raise RuntimeError(f"process {rank} did {p.windows_done} of its {todo[1] - todo[0]} windows.")


def merged_arrays(progresses: list[Progress]) -> tuple[ShardedArray, ShardedArray]:
    """Every rank's chunks as one (keys, values) pair, in window order (ranks hold contiguous ranges)."""
    arrays = [p.arrays() for p in progresses if p.state["chunks"]]
    return (
        ShardedArray([s for keys, _ in arrays for s in keys.shards]),
        ShardedArray([s for _, values in arrays for s in values.shards]),
    )
