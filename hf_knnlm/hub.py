"""Hub and filesystem plumbing shared by every saveable object (datastores, document indexes).

Local path first, then the Hub (``snapshot_download``); pushes are a save into a temporary folder
plus one ``upload_folder`` commit; every file is checked against the sha256 recorded at save time
before faiss or safetensors touch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A file of a saved object is missing, truncated or was modified after it was written."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def temporary_path(path: str | os.PathLike) -> Path:
    """A sibling name to write to before ``os.replace``-ing onto ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def file_hashes(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in sorted(names)}


def verify_files(folder: str | os.PathLike, expected: dict[str, str], what: str = "datastore") -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing or whose sha256 differs."""
    folder = Path(folder)
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


def resolve_folder(
    repo_id_or_path: str | os.PathLike,
    *,
    config_name: str,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """Return a local folder holding a saved object: the path itself, or a Hub snapshot.

    A Hub repository is fetched with one ``snapshot_download`` restricted to ``allow_patterns`` so
    that files that must sit side by side (the faiss index and its side files) share one folder.
    ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the cache are honoured by huggingface_hub itself.
    """
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        if not (path / config_name).is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no {config_name}; is it a saved {config_name}?"
            )
        return path
    if path.exists() or str(repo_id_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id_or_path} is not a folder with a {config_name}.")

    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id=str(repo_id_or_path),
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        allow_patterns=allow_patterns,
        force_download=force_download,
    )
    folder = Path(folder)
    if not (folder / config_name).is_file():
        raise FileNotFoundError(
            f"Hub repository {repo_id_or_path} has no {config_name} at revision {revision or 'main'}."
        )
    return folder


def push_folder(
    save: Callable[[Path], None],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    keep_remote_readme: bool = True,
    delete_patterns: list[str] | None = None,
) -> Any:
    """Save into a temporary folder with ``save(folder)`` and upload it as one commit.

    A README.md the repository already has is kept (users edit their cards on the Hub). A missing
    ``revision`` branch is created first, as transformers' ``push_to_hub`` does; remote files
    matching ``delete_patterns`` that this upload does not rewrite are deleted in the same commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo_url.repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save(folder)
        if keep_remote_readme and (folder / "README.md").exists():
            if api.file_exists(repo_id, "README.md", revision=revision):
                (folder / "README.md").unlink()
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or "Upload with hf_knnlm",
            create_pr=create_pr,
            delete_patterns=delete_patterns,
        )
