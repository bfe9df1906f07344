"""The Hub side of every saveable object (datastores, document indexes).

Local path first, then the Hub (``snapshot_download``); pushes are a save into a temporary folder
plus one ``upload_folder`` commit. Integrity checks live in ``hf_knnlm.utils.files``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def resolve_folder(
    repo_id_or_path: str | os.PathLike,
    *,
    config_name: str,
    allow_patterns: list[str] | Callable[[Path], list[str]] | None = None,
    subfolder: str | None = None,
    **download_kwargs: Any,
) -> Path:
    """Return a local folder holding a saved object: the path itself, or a Hub snapshot.

    A Hub repository is fetched with one ``snapshot_download`` restricted to ``allow_patterns`` so
    that files that must sit side by side (the faiss index and its side files) share one folder.
    ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the cache are honoured by huggingface_hub itself.
    ``subfolder`` names the object's folder inside the repository (or local folder), as in transformers;
    ``download_kwargs`` (``revision``, ``cache_dir``, ``token``, ...) go to ``snapshot_download``.
    ``allow_patterns`` may be a function of the downloaded config file's path: the config is fetched
    first, then the files it names, at the commit the config came from (a process of a sharded job
    downloads only its own shards).
    """
    sub = Path(subfolder.strip("/")) if subfolder else None
    if sub is not None and (sub.is_absolute() or ".." in sub.parts):
        raise ValueError(f"subfolder={subfolder!r} must be a relative path inside the repository.")
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        path = path / sub if sub is not None else path
        if not (path / config_name).is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no {config_name}; is it a saved {config_name}?"
            )
        return path
    if path.exists() or str(repo_id_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id_or_path} is not a folder with a {config_name}.")
    if callable(allow_patterns):
        folder = _download(repo_id_or_path, [config_name], sub, download_kwargs)
        if (folder / config_name).is_file():
            commit = _snapshot_commit(folder, sub) or download_kwargs.get("revision")
            patterns = [config_name, *allow_patterns(folder / config_name)]
            folder = _download(repo_id_or_path, patterns, sub, {**download_kwargs, "revision": commit})
    else:
        folder = _download(repo_id_or_path, allow_patterns, sub, download_kwargs)
    if not (folder / config_name).is_file():
        where = f"{sub.as_posix()}/{config_name}" if sub is not None else config_name
        raise FileNotFoundError(
            f"Hub repository {repo_id_or_path} has no {where} at revision "
            f"{download_kwargs.get('revision') or 'main'}."
        )
    return folder


def _download(repo_id: str | os.PathLike, patterns: list[str] | None, sub: Path | None, kwargs: dict) -> Path:
    """One ``snapshot_download`` of ``patterns`` (relative to ``sub``); the object's folder in it."""
    from huggingface_hub import snapshot_download

    if sub is not None and patterns is not None:
        patterns = [f"{sub.as_posix()}/{pattern}" for pattern in patterns]
    folder = Path(snapshot_download(repo_id=str(repo_id), allow_patterns=patterns, **kwargs))
    return folder / sub if sub is not None else folder


def _snapshot_commit(folder: Path, sub: Path | None) -> str | None:
    """The commit of a Hub cache snapshot folder (``.../snapshots/<commit>[/sub]``), if it is one."""
    snapshot = folder.parents[len(sub.parts) - 1] if sub is not None else folder
    return snapshot.name if snapshot.parent.name == "snapshots" else None


# The keyword arguments of push_folder that a push_to_hub passes through (the rest go to its save).
PUSH_OPTIONS = ("revision", "private", "token", "create_pr")


def push_folder(
    save: Callable[[Path], Any],
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
