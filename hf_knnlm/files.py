"""Files every saveable object writes and checks: atomic writes and sha256 integrity.

A reader never sees a half-written file: everything is written to a temporary sibling and
``os.replace``-d onto its name once complete (:func:`atomic_path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A file of a saved object is missing, truncated or was modified after it was written."""


def temporary_path(path: str | os.PathLike) -> Path:
    """A hidden sibling name of ``path``, unique to this process, to write to before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block completes.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Sorted, indented JSON written with :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in sorted(names)}


def verify_files(
    folder: str | os.PathLike,
    expected: dict[str, str],
    what: str = "datastore",
    required: Iterable[str] = (),
) -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing or whose sha256 differs.

    A config that records no hashes, or none for a file in ``required`` (the files the loader is
    about to read), is refused too: it would load unchecked. Loaders offer ``verify=False`` for that.
    """
    folder = Path(folder)
    unhashed = [name for name in required if name not in expected]
    if not expected or unhashed:
        which = f"no sha256 for {unhashed[0]!r}" if expected else "no file hashes"
        raise IntegrityError(
            f"the {what} config in {folder} records {which}, so its files cannot be checked. Re-save "
            f"the {what} with this version of hf_knnlm, or pass verify=False to load it unchecked."
        )
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise IntegrityError(
                f"{what} file '{name}' is missing from {folder}. Re-download or re-save the {what}."
            )
        actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(
                f"{what} file '{name}' in {folder} has sha256 {actual[:16]}..., expected {digest[:16]}... "
                f"as recorded at save time: the file is truncated or was modified. Re-download it "
                f"(force_download=True) or rebuild the {what}."
            )
