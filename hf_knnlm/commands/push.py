"""``hf-knnlm push DIR REPO_ID``: upload a saved datastore to the Hugging Face Hub in one commit."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import size


def run(args: argparse.Namespace) -> int:
    try:
        return _push(args)
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise ConnectionError(
            f"could not reach the Hugging Face Hub to push {args.repo_id} ({' '.join(str(err).split())}); "
            f"check the network, HF_ENDPOINT and HF_HUB_OFFLINE, then retry (nothing was uploaded)."
        ) from err


def _push(args: argparse.Namespace) -> int:
    from ..datastore import Datastore

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"{args.dir} is not a folder; `hf-knnlm push` uploads a datastore folder.")
    store = Datastore.from_pretrained(args.dir)  # checks every file before anything is uploaded
    commit = store.push_to_hub(
        args.repo_id,
        revision=args.revision,
        private=args.private,
        commit_message=args.commit_message,
        token=args.token,
        max_shard_size=args.max_shard_size,
        create_pr=args.create_pr,
    )
    print(getattr(commit, "commit_url", None) or commit)
    return 0


def _is_network_error(err: Exception) -> bool:
    """No connection at all (offline mode, refused, DNS, TLS): the HTTP client's transport errors."""
    return any(cls.__name__ in ("TransportError", "ConnectionError") for cls in type(err).__mro__)


def register(subparsers) -> None:
    """Add the ``push`` subcommand to the ``hf-knnlm`` parser."""
    p = subparsers.add_parser("push", help="Upload a datastore folder to the Hugging Face Hub (one commit).")
    p.add_argument("dir", help="Datastore folder (written by `hf-knnlm build` or save_pretrained).")
    p.add_argument("repo_id", help="Hub model repository, e.g. org/wikitext-gpt2-knn (created if missing).")
    p.add_argument("--revision", default=None, help="Branch to commit to (created if missing).")
    p.add_argument("--private", action="store_true", default=None, help="Create the repository as private.")
    p.add_argument("--commit-message", default=None, help="Default: Upload kNN-LM datastore.")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN).")
    p.add_argument("--max-shard-size", type=size, default="5GB", help="Largest keys shard (default 5GB).")
    p.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    p.set_defaults(func=run)
