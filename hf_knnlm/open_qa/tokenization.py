"""The two tokenizers of a REALM model whose retriever and reader come from different checkpoints.

Like ``RagTokenizer`` in transformers: a retriever tokenizer (questions and documents for the dense
retriever) and a reader tokenizer (``question [SEP] document`` windows), saved in two sub-folders. Every
open-QA function takes either one tokenizer (retriever and reader share it) or a
[`RealmTokenizerPair`][hf_knnlm.open_qa.RealmTokenizerPair].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from ..retrieval.embedder import retriever_tokenizer
from ..utils.files import not_matching, write_folder

RETRIEVER_FOLDER = "retriever_tokenizer"
READER_FOLDER = "reader_tokenizer"


class RealmTokenizerPair:
    """A retriever tokenizer and a reader tokenizer; ``save_pretrained`` writes them to
    ``retriever_tokenizer/`` and ``reader_tokenizer/`` and
    [`from_pretrained`][hf_knnlm.open_qa.RealmTokenizerPair.from_pretrained] reads them back (or one plain
    tokenizer folder, used for both).

    Examples:

    ```python
    >>> from transformers import BertTokenizerFast
    >>> words = "[PAD] [UNK] [CLS] [SEP] [MASK] where does the cat sit sits on mat".split()
    >>> tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    >>> from transformers import AutoTokenizer
    >>> from hf_knnlm.open_qa import RealmTokenizerPair
    >>> pair = RealmTokenizerPair(AutoTokenizer.from_pretrained("gpt2"), tokenizer)  # retriever, reader
    >>> pair.save_pretrained("tokenizers")
    >>> loaded = RealmTokenizerPair.from_pretrained("tokenizers")
    >>> type(loaded).__name__, loaded.reader.tokenize("the cat sits")
    ('RealmTokenizerPair', ['the', 'cat', 'sits'])
    ```
    """

    def __init__(self, retriever: Any, reader: Any):
        for name, tokenizer in (("retriever", retriever), ("reader", reader)):
            if not getattr(tokenizer, "is_fast", False):
                raise ValueError(
                    f"the {name} tokenizer {type(tokenizer).__name__} is a slow tokenizer; open QA needs "
                    "offset mappings. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
                )
        self.retriever, self.reader = retriever, reader

    def __repr__(self) -> str:
        return f"RealmTokenizerPair(retriever={self.retriever!r}, reader={self.reader!r})"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Both tokenizers, written beside ``save_directory`` and swapped in whole under its lock."""
        own = not_matching([RETRIEVER_FOLDER, READER_FOLDER])  # the rest of the folder (a model) stays
        with write_folder(save_directory, keep=own) as folder:
            self.retriever.save_pretrained(folder / RETRIEVER_FOLDER)
            self.reader.save_pretrained(folder / READER_FOLDER)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload both sub-folders as one commit (``kwargs``: revision, private, token, create_pr, ...)."""
        from ..utils.hub import push_folder

        return push_folder(self.save_pretrained, repo_id, commit_message="Upload REALM tokenizers", **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """The pair saved in ``name_or_path``; a folder or Hub id with one tokenizer gives that tokenizer."""
        folder = Path(name_or_path)
        if (folder / READER_FOLDER).is_dir() and (folder / RETRIEVER_FOLDER).is_dir():
            return cls(
                AutoTokenizer.from_pretrained(folder / RETRIEVER_FOLDER, **kwargs),
                AutoTokenizer.from_pretrained(folder / READER_FOLDER, **kwargs),
            )
        if not folder.exists():
            try:
                return cls(
                    AutoTokenizer.from_pretrained(str(name_or_path), subfolder=RETRIEVER_FOLDER, **kwargs),
                    AutoTokenizer.from_pretrained(str(name_or_path), subfolder=READER_FOLDER, **kwargs),
                )
            except OSError:
                pass  # a Hub repository with a single tokenizer at its root
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def reader_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer for the reader of ``tokenizer`` (a pair or one shared tokenizer)."""
    return tokenizer.reader if isinstance(tokenizer, RealmTokenizerPair) else tokenizer


__all__ = ["RealmTokenizerPair", "reader_tokenizer", "retriever_tokenizer"]
