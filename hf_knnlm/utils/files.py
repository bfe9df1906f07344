"""Files every saveable object writes and checks: atomic writes, whole-folder swaps, locks, sha256.

A reader never sees a half-written file: everything is written to a temporary sibling and
``os.replace``-d onto its name once complete (``atomic_path``). A whole store is written to a
temporary sibling folder and swapped in only when complete (``atomic_folder``), so a failed
or interrupted save leaves the old store as it was; one writer at a time holds a folder
(``folder_lock``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None

_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A file of a saved object is missing, truncated or was modified after it was written.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import Datastore, IntegrityError
    >>> model, tokenizer, store = tiny_datastore("my-store")
    >>> with open("my-store/values.safetensors", "r+b") as f:  # a file changed after it was written
    ...     _ = f.seek(-1, 2), f.write(b"x")
    >>> try:
    ...     Datastore.from_pretrained("my-store")
    ... except IntegrityError as err:
    ...     print("values.safetensors" in str(err))
    True
    ```
    """


def temporary_path(path: str | os.PathLike) -> Path:
    """A hidden sibling name of ``path``, unique to this process, to write to before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block completes.

    On an exception the temporary file is removed and ``path`` is left as it was. The file gets the
    mode an ordinary ``open()`` gives (``0o666`` less the umask, 0644 typically) whatever wrote the
    temporary file (writers that go through ``mkstemp`` leave 0600).
    """
    tmp = temporary_path(path)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FolderInUseError(RuntimeError):
    """Another writer (a build or a save, in this process or another) holds the folder's lock.

    Examples:

    ```python
    >>> from hf_knnlm import FolderInUseError
    >>> from hf_knnlm.utils.files import folder_lock
    >>> with folder_lock("my-store"):  # what every build and save holds while it writes
    ...     try:
    ...         with folder_lock("my-store"):  # a second writer, in this process or another
    ...             pass
    ...     except FolderInUseError as err:
    ...         print(str(err).split(" (")[0])
    /.../my-store is being written by another writer
    ```
    """


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, tag: str = "") -> Iterator[None]:
    """Hold the exclusive write lock of ``folder`` for the duration of the block.

    The lock is an ``flock`` on a hidden sibling file (``.<name><tag>.lock``), taken without
    waiting: a second writer fails at once with [`FolderInUseError`][hf_knnlm.FolderInUseError] naming
    the folder. The kernel drops the lock when its holder exits, ``kill -9`` included, so a lock file
    left behind never blocks the next build (which resumes).
    """
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(f".{folder.name}{tag}.lock")
    if fcntl is None:
        yield
        return
    fd = _acquire(path, folder)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: see _acquire
        os.close(fd)


def _acquire(path: Path, folder: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FolderInUseError(
                f"{folder} is being written by another writer (process {holder or '?'}, lock {path.name}); "
                f"wait for it to finish, or write to another folder."
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)  # its last holder removed the file after we opened it: lock the new one


def not_matching(patterns: Iterable[str]) -> Callable[[str], bool]:
    """``keep`` for ``atomic_folder``: names that match none of ``patterns`` (glob)."""
    patterns = tuple(patterns)
    return lambda name: not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


@contextlib.contextmanager
def atomic_folder(
    folder: str | os.PathLike, keep: Callable[[str], bool] = lambda name: False
) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder``; it replaces ``folder`` only if the block completes.

    On an exception the temporary folder is removed and ``folder`` is left as it was. The files the
    block wrote get the mode an ordinary ``open()`` gives (see ``atomic_path``). Entries of
    the old folder that the new one lacks and ``keep(name)`` accepts (files a user put beside a
    store) are carried over, hard-linked, before the swap.
    """
    folder = Path(folder).absolute()
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):  # model.save_pretrained and safetensors leave 0600 files
            if path.is_file() and not path.is_symlink() and path.stat().st_nlink == 1:  # not a linked one
                os.chmod(path, 0o666 & ~_umask())
        if folder.is_dir():
            for entry in folder.iterdir():
                if keep(entry.name) and not (tmp / entry.name).exists():
                    _link_tree(entry, tmp / entry.name)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def write_folder(
    folder: str | os.PathLike, keep: Callable[[str], bool] = lambda name: False
) -> Iterator[Path]:
    """``atomic_folder`` under the folder's lock: the one path every save of a whole folder takes.

    A second writer fails at once ([`FolderInUseError`][hf_knnlm.FolderInUseError]); a save that fails
    midway leaves the folder that was there as it was; ``keep`` as in ``atomic_folder``.
    """
    with folder_lock(folder), atomic_folder(folder, keep=keep) as tmp:
        yield tmp


@contextlib.contextmanager
def updated_folder(folder: str | os.PathLike, *, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of the finished folder ``folder`` to write new or changed files into.

    Once the block completes, the files of ``folder`` the block did not write join the sibling
    (hard-linked) and it replaces ``folder`` whole, the same swap as a build's; on an exception
    (a full disk while writing the config) ``folder`` is left exactly as it was. ``lock=False`` is
    for a caller that already holds the folder's lock.
    """
    with folder_lock(folder) if lock else contextlib.nullcontext():
        with atomic_folder(folder, keep=lambda name: True) as tmp:
            yield tmp


def save_pretrained_atomically(folder: str | os.PathLike, *objects: Any) -> Path:
    """``obj.save_pretrained`` of every object (a model, its tokenizer) into ``folder`` as one swap under
    its lock: a save that fails midway (a full disk) leaves the folder that was there as it was."""
    folder = Path(folder)
    with write_folder(folder) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
    return folder


def replace_folder(new: Path, folder: Path) -> None:
    """Put the folder ``new`` in the place of ``folder`` and delete the old one.

    Linux exchanges the two in one step (``renameat2(RENAME_EXCHANGE)``), so a reader sees the old
    or the new folder, never neither; elsewhere the old folder is renamed aside first.
    """
    if not folder.exists():
        os.rename(new, folder)
    elif _exchange(new, folder):
        shutil.rmtree(new)
    else:
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
        os.rename(new, folder)
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the renames durable
        fd = os.open(folder.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Hard-link ``source`` as ``target`` (a copy where a link cannot be made, e.g. across file systems).

    Safe for the files of a saved object because none is ever written in place: every write
    replaces a name with a new file, so the other name keeps the old content.
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(src, dst)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Sorted, indented JSON written with ``atomic_write_bytes``."""
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
    """Raise [`IntegrityError`][hf_knnlm.IntegrityError] naming the first file that is missing or whose sha256
    differs.

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
