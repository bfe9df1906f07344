"""The shard index of a sharded keys/values tensor: ``keys.safetensors.index.json``.

Laid out like transformers' ``model.safetensors.index.json`` (``metadata.total_size`` plus a
``weight_map`` from names to shard files), except that a datastore splits one tensor by rows, so
each ``weight_map`` name is a row slice: ``"keys[0:4096]": "keys-00001-of-00004.safetensors"``.
Every shard file holds its rows under the plain tensor name (``keys`` / ``values``). A store
with a single shard has no index file, as a transformers checkpoint with one file has none.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..utils.files import IntegrityError, atomic_write_bytes
from .config import CONFIG_NAME, DatastoreConfig

KEYS_PREFIX, VALUES_PREFIX = "keys", "values"

INDEX_SUFFIX = ".safetensors.index.json"
_SLICE = re.compile(r"(?P<tensor>[A-Za-z_][\w.]*)\[(?P<start>\d+):(?P<end>\d+)\]")

DEFAULT_MAX_SHARD_SIZE = "5GB"  # largest keys shard, as transformers' max_shard_size


def shard_index_name(prefix: str) -> str:
    """``keys`` -> ``keys.safetensors.index.json``."""
    return prefix + INDEX_SUFFIX


def write_shard_index(
    folder: str | os.PathLike,
    prefix: str,
    tensor: str,
    files: list[str],
    bounds: list[tuple[int, int]],
    row_bytes: int,
) -> list[str]:
    """Write the index json of a tensor split into ``files`` (rows ``bounds``); none for one shard.

    Returns:
        `list[str]`: the names written (empty for a single shard), to be hashed with the shards.
    """
    if len(files) <= 1:
        return []
    num_rows = bounds[-1][1] if bounds else 0
    index = {
        "metadata": {
            "total_size": num_rows * row_bytes,
            "num_rows": num_rows,
            "tensor": tensor,
            "format": "hf_knnlm row shards: each weight_map entry maps rows [start:end) of the tensor "
            "to the file that holds them under the tensor's name",
        },
        "weight_map": {f"{tensor}[{s}:{e}]": name for name, (s, e) in zip(files, bounds, strict=True)},
    }
    name = shard_index_name(prefix)
    # Not key-sorted (unlike the config): the weight_map reads in row order.
    atomic_write_bytes(Path(folder) / name, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
    return [name]


def read_shard_index(
    folder: str | os.PathLike, prefix: str, tensor: str
) -> list[tuple[str, int, int]] | None:
    """``[(file, start, end), ...]`` in row order from ``<prefix>.safetensors.index.json``, or None.

    Raises:
        IntegrityError: the index is not valid JSON, names another tensor, a file outside the
            folder, or its row ranges do not tile ``[0, num_rows)``.
    """
    path = Path(folder) / shard_index_name(prefix)
    if not path.is_file():
        return None

    def bad(why: str) -> IntegrityError:
        return IntegrityError(
            f"shard index '{path.name}' in {path.parent} {why}; re-download or re-save the datastore."
        )

    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        num_rows = int(index["metadata"]["num_rows"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise bad(f"is not a valid shard index ({err!r})") from err
    shards = []
    for key, name in weight_map.items():
        match = _SLICE.fullmatch(key)
        if match is None or match["tensor"] != tensor:
            raise bad(f"has entry {key!r}; expected '{tensor}[start:end]'")
        if not isinstance(name, str) or os.path.isabs(name) or ".." in name.split("/"):
            raise bad(f"points at {name!r}, which is not a file name inside the datastore folder")
        shards.append((name, int(match["start"]), int(match["end"])))
    shards.sort(key=lambda s: s[1])
    expected_start = 0
    for name, start, end in shards:
        if start != expected_start or end < start:
            raise bad(f"has rows [{start}:{end}) in {name} where row {expected_start} should start")
        expected_start = end
    if expected_start != num_rows:
        raise bad(f"covers {expected_start} rows but metadata.num_rows is {num_rows}")
    return shards


def shard_layout(folder: Path, config: DatastoreConfig) -> list[dict]:
    """The shards of a store, ``[{"keys", "values", "start", "end"}]``, from its shard index jsons.

    A single-shard store (or one saved before the index jsons existed) is described by
    ``config.shards`` alone; when both exist they must agree.
    """
    keys = read_shard_index(folder, KEYS_PREFIX, "keys")
    if keys is None:
        return config.shards
    values = read_shard_index(folder, VALUES_PREFIX, "values")
    if values is None or [(s, e) for _, s, e in keys] != [(s, e) for _, s, e in values]:
        raise IntegrityError(
            f"{folder}: {KEYS_PREFIX}{INDEX_SUFFIX} and {VALUES_PREFIX}{INDEX_SUFFIX} describe different row "
            f"ranges (or the latter is missing); re-download or re-save the datastore."
        )
    layout = [
        {"keys": k, "values": v, "start": s, "end": e}
        for (k, s, e), (v, _, _) in zip(keys, values, strict=True)
    ]
    if config.shards and config.shards != layout:
        raise IntegrityError(
            f"{folder}: the shards in {CONFIG_NAME} differ from {KEYS_PREFIX}{INDEX_SUFFIX}; re-download or "
            f"re-save the datastore."
        )
    return layout
