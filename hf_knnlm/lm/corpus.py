"""Corpus input: a list of strings, a text file or a ``datasets.Dataset``, tokenized to one stream."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_FILE_PIECE_CHARS = 1 << 20
_TOKENIZE_BATCH = 256

CorpusLike = Sequence[str] | str | os.PathLike | Any


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ValueError:
    return ValueError(
        f"{path} is not UTF-8 text ({err.reason}: {err.object[err.start : err.end]!r}); convert it "
        f"first, e.g. `iconv -f latin1 -t utf-8 {path.name}`."
    )


def read_text_file(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file; a file in another encoding is refused naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _file_pieces(path: Path) -> Iterator[str]:
    """~1 MB pieces cut at blank lines, so the pieces concatenate back to the file."""
    piece: list[str] = []
    size = 0
    with open(path, encoding="utf-8") as f:
        try:
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= _FILE_PIECE_CHARS and not line.strip():
                    yield "".join(piece)
                    piece, size = [], 0
        except UnicodeDecodeError as err:
            raise _not_utf8(path, err) from err
    if piece:
        yield "".join(piece)


def _dataset_rows(data: Any, text_column: str) -> Iterator[str]:
    for position, row in enumerate(data[text_column]):
        if not isinstance(row, str):
            raise ValueError(
                f"row {position} of column {text_column!r} is {row!r}, not text; drop or fill such rows "
                f"first, e.g. dataset.filter(lambda r: isinstance(r[{text_column!r}], str))."
            )
        yield row


def _is_file(data: str | os.PathLike) -> bool:
    """Whether ``data`` names a file; a text passed where a path goes (too long a name) is not one."""
    try:
        return Path(data).is_file()
    except OSError:
        return False


def iter_documents(data: CorpusLike, text_column: str = "text") -> list[str] | Iterator[str]:
    """The documents of ``data``: a text file's pieces, a dataset column's rows, or the strings."""
    if isinstance(data, (str, os.PathLike)):
        if not _is_file(data):
            text = str(data)
            shown = text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
            raise ValueError(
                f"data={shown!r} is not a file. Pass a list of strings (e.g. [text] for one text), the path "
                f"of a UTF-8 text file, or a datasets.Dataset."
            )
        return _file_pieces(Path(data))
    if hasattr(data, "column_names"):  # datasets.Dataset
        if text_column not in data.column_names:
            raise ValueError(
                f"text_column={text_column!r} is not a column of the dataset {data.column_names}; "
                f"pass text_column='<name of the text column>'."
            )
        return _dataset_rows(data, text_column)
    if isinstance(data, Sequence):
        bad = next((i for i, d in enumerate(data) if not isinstance(d, str)), None)
        if bad is None:
            return list(data)
        raise ValueError(
            f"data[{bad}] is {data[bad]!r}, not a string; pass a list of strings (drop or fill that entry)."
        )
    raise ValueError(
        f"data of type {type(data).__name__} is not a list of strings, a text file or a Dataset."
    )


def tokenize_corpus(
    tokenizer, data: CorpusLike, text_column: str = "text", separator: str = "\n\n"
) -> np.ndarray:
    """Tokenize every document (no special tokens) and concatenate them into one int32 stream.

    Documents are joined by ``separator`` (as the transformers perplexity guide joins WikiText
    lines); a text file is one document.
    """
    docs = iter_documents(data, text_column)
    is_file = isinstance(data, (str, os.PathLike))
    pieces: list[np.ndarray] = []
    batch: list[str] = []
    first = True
    has_text = False

    def flush() -> None:
        if batch:
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
            pieces.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
            batch.clear()

    for doc in docs:
        has_text = has_text or bool(doc.strip())
        if not is_file and not first:
            doc = separator + doc
        first = False
        batch.append(doc)
        if len(batch) >= _TOKENIZE_BATCH:
            flush()
    flush()
    if not has_text:
        raise ValueError(
            "data is empty: every document is empty or whitespace, so a datastore would only hold "
            "separator tokens. Pass the texts to remember (check the file, list or text_column)."
        )
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    if len(tokens) < 2:
        raise ValueError(
            f"the corpus has {len(tokens)} token(s) after tokenization; a datastore needs at least 2 "
            f"(one context and one target). Check that data is not empty."
        )
    return tokens


def corpus_name(data: CorpusLike) -> str:
    """A short name of the corpus for the model card; reads no text."""
    if isinstance(data, (str, os.PathLike)):
        return Path(data).name
    if hasattr(data, "column_names"):
        return getattr(getattr(data, "info", None), "dataset_name", None) or "dataset"
    return "texts"
