"""One base for everything hf_knnlm saves as a folder: save, load, share on the Hub, check integrity.

Like huggingface_hub's ``ModelHubMixin``, the public ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub`` live here and call two private methods a store type implements; the base owns what
every store must do the same way:

- the config file (a [`StoreConfig`][hf_knnlm.utils.StoreConfig] dataclass): format version (a file
  written by a newer hf_knnlm is refused with the upgrade command), hf_knnlm version, the sha256 of every
  file;
- the order of writes (data files, then the model card, then the config last, so a folder with a
  config is complete), into a temporary sibling folder that replaces the old one whole, under a
  write lock (``HubMixin._writable_folder``);
- loading: a local folder first, then one ``snapshot_download`` of the store's files; every file is
  checked against its sha256 before it is parsed;
- the model card (``README.md``, a ``huggingface_hub.ModelCard``) and pushes as one commit.

A new store type plugs in as the example of [`HubMixin`][hf_knnlm.utils.HubMixin] shows.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import json
import logging
import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .._version import __version__
from .checks import is_int, is_real
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    file_hashes,
    not_matching,
    verify_files,
    write_folder,
)
from .hub import PUSH_OPTIONS, push_folder, resolve_folder

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
CARD_TEMPLATES = Path(__file__).resolve().parent.parent / "model_cards"

ConfigT = TypeVar("ConfigT", bound="StoreConfig")
StoreT = TypeVar("StoreT", bound="HubMixin")


@dataclass(kw_only=True)
class StoreConfig:
    """The on-disk contract every saved store shares; a store type subclasses it with its own fields.

    Class attributes a subclass sets: ``CONFIG_NAME`` (the file name), ``WHAT`` (how errors name
    the store), ``FORMAT_VERSION`` (the newest version this hf_knnlm reads, bumped whenever an older
    hf_knnlm could not read new files) and, for a store whose config has a ``format`` field,
    ``FORMAT``: the only value that field may hold. A store type whose newer layout is optional
    overrides ``written_format_version`` so that its other folders stay readable by older releases.

    Examples:

    ```python
    >>> from hf_knnlm.datastore import DatastoreConfig  # a StoreConfig of one store type
    >>> config = DatastoreConfig(model_type="gpt2", hook_module="transformer.h.1.mlp", hidden_size=32,
    ...                          vocab_size=50257)
    >>> DatastoreConfig.from_dict(config.to_dict()) == config  # what save / load write and read
    True
    >>> try:
    ...     DatastoreConfig.from_dict({**config.to_dict(), "hidden_size": "abc"}, source="config.json")
    ... except ValueError as err:
    ...     print(err)
    config.json: field 'hidden_size' is 'abc', not of type int...
    ```
    """

    CONFIG_NAME: ClassVar[str] = "config.json"
    WHAT: ClassVar[str] = "store"
    FORMAT_VERSION: ClassVar[int] = 1
    FORMAT: ClassVar[str | None] = None

    format_version: int = field(default=0, metadata={"help": "Version of this on-disk format."})
    hf_knnlm_version: str = field(default="", metadata={"help": "hf_knnlm version that wrote the files."})
    files: dict[str, str] = field(
        default_factory=dict, metadata={"help": "sha256 of every file but the config and README.md."}
    )

    def __post_init__(self) -> None:
        if not self.format_version:
            self.format_version = self.written_format_version()
        if self.format_version > self.FORMAT_VERSION:
            raise ValueError(
                f"this {self.WHAT} has format_version {self.format_version} in {self.CONFIG_NAME}, "
                f"newer than the {self.FORMAT_VERSION} this hf_knnlm {__version__} reads; upgrade with "
                f"`pip install -U hf-knnlm`."
            )
        for name in self.files:
            check_relative(name, self.WHAT)
        found = getattr(self, "format", None)
        if self.FORMAT is not None and found != self.FORMAT:
            raise ValueError(
                f"{self.CONFIG_NAME} has format {found!r}, not {self.FORMAT!r}: not a {self.WHAT}."
            )

    def written_format_version(self) -> int:
        """The format version a folder with this config is saved as: the oldest that reads it."""
        return self.FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Sorted JSON, written atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any], source: str | None = None) -> ConfigT:
        """Build from parsed JSON; unknown keys (from a newer hf_knnlm) are dropped with a warning.

        A missing required field or a value of the wrong type is refused naming ``source`` (the
        file, by default the config's name) and the field.
        """
        source = source or cls.CONFIG_NAME
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            logger.warning("Ignoring unknown keys in %s: %s (written by a newer hf_knnlm?)", source, unknown)
        hints = typing.get_type_hints(cls)
        fix = f"The file was truncated or edited: re-download or rebuild the {cls.WHAT}."
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in data:
                if required:
                    raise ValueError(f"{source}: required field {f.name!r} is missing. {fix}")
            elif not _matches(data[f.name], hints[f.name]):
                value = data[f.name]
                raise ValueError(f"{source}: field {f.name!r} is {value!r}, not of type {f.type}. {fix}")
        try:
            return cls(**{f.name: data[f.name] for f in fields if f.name in data})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def load(cls: type[ConfigT], path: str | os.PathLike) -> ConfigT:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); the {cls.WHAT} config is truncated or edited."
            ) from err
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} holds a JSON {type(data).__name__}, not an object; is it a {cls.WHAT} config?"
            )
        return cls.from_dict(data, source=str(path))


def _matches(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a field's type hint (int, str, X | None, list[...], dict[..., ...])?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values())
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_real(value)
    return value is None if hint is type(None) else isinstance(value, hint)


def check_relative(name: str, what: str = "store") -> None:
    """Refuse a file name that points outside the store's folder (configs come from the Hub)."""
    if os.path.isabs(name) or ".." in name.split("/"):
        raise ValueError(f"{what} file name {name!r} must be relative to the {what} folder.")


def render_card(template: str, card_data: ModelCardData, config: StoreConfig, **variables: Any) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` from a jinja template in ``hf_knnlm/model_cards``.

    The template sees the store's ``config`` (``{{ config.num_entries }}``) and ``variables``.
    """
    from huggingface_hub import ModelCard

    path = str(CARD_TEMPLATES / template)
    return ModelCard.from_template(card_data, template_path=path, config=config, **variables)


def finish_folder(
    folder: Path,
    config: StoreConfig,
    files: Iterable[str],
    card: Callable[[StoreConfig], ModelCard | None] | None = None,
    hashes: dict[str, str] | None = None,
) -> StoreConfig:
    """Complete a folder whose data files are written: hashes, model card, then the config, last.

    Every save and every build ends here, so a folder that has a config is a complete store.
    ``card`` renders the ``README.md`` from the finished config. ``hashes``: the sha256 of files
    besides ``files`` already hashed by the processes that wrote them (a per-rank datastore build), so
    that no single process reads every file again.
    """
    folder = Path(folder)
    config.hf_knnlm_version = __version__
    config.format_version = config.written_format_version()
    config.files = {**(hashes or {}), **file_hashes(folder, files)}
    rendered = card(config) if card is not None else None
    if rendered is not None:  # not hashed: users edit their cards on the Hub
        atomic_write_bytes(folder / CARD_NAME, str(rendered).encode("utf-8"))
    config.save(folder / config.CONFIG_NAME)
    return config


class HubMixin(abc.ABC):
    """Base of the saveable stores ([`Datastore`][hf_knnlm.Datastore],
    [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex]).

    A subclass sets ``config_class`` and ``hub_patterns`` (the glob patterns of its data files,
    which a Hub download fetches into one snapshot folder) and implements ``_save_pretrained``
    and ``_from_pretrained``; optionally ``_model_card`` and ``delete_patterns`` (remote
    files a push replaces, e.g. shards of an earlier push with another shard count).

    Examples:

    A new store type plugs in like this (a table of counts; any class with a ``README.md`` card
    overrides ``_model_card`` too, see ``render_card``):

    ```python
    >>> import tempfile
    >>> from dataclasses import dataclass, field
    >>> from typing import ClassVar
    >>> import numpy as np
    >>> from safetensors.numpy import load_file, save_file
    >>> from hf_knnlm.utils.hub_mixin import HubMixin, StoreConfig
    >>> @dataclass(kw_only=True)
    ... class CountsConfig(StoreConfig):
    ...     CONFIG_NAME: ClassVar[str] = "counts_config.json"
    ...     WHAT: ClassVar[str] = "count table"
    ...     num_rows: int = field(default=0, metadata={"help": "Rows in counts.safetensors."})
    >>> class CountTable(HubMixin):
    ...     config_class = CountsConfig
    ...     hub_patterns = ("counts.safetensors",)  # what a Hub download fetches besides the config
    ...
    ...     def __init__(self, counts):
    ...         self.counts = counts
    ...
    ...     def _save_pretrained(self, folder):  # folder: given by the base
    ...         save_file({"counts": self.counts}, str(folder / "counts.safetensors"))
    ...         return CountsConfig(num_rows=len(self.counts)), ["counts.safetensors"]
    ...
    ...     @classmethod
    ...     def _from_pretrained(cls, folder, config):  # files already sha256-checked
    ...         return cls(load_file(str(folder / "counts.safetensors"))["counts"])
    >>> folder = CountTable(np.arange(3)).save_pretrained(tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['counts.safetensors', 'counts_config.json']
    >>> CountTable.from_pretrained(folder).counts
    array([0, 1, 2])
    ```
    """

    config_class: ClassVar[type[StoreConfig]] = StoreConfig
    hub_patterns: ClassVar[tuple[str, ...]] = ()
    delete_patterns: ClassVar[tuple[str, ...] | None] = None
    default_commit_message: ClassVar[str] = "Upload with hf_knnlm"

    # ----------------------------------------------------------------- what a store type implements
    # Abstract, so that a store type missing one fails when instantiated, not halfway through a save.
    @abc.abstractmethod
    def _save_pretrained(self, folder: Path, **kwargs: Any) -> tuple[StoreConfig, list[str]]:
        """Write the data files into ``folder`` (given by the base); return the config and the names."""

    @classmethod
    @abc.abstractmethod
    def _from_pretrained(cls: type[StoreT], folder: Path, config: StoreConfig, **kwargs: Any) -> StoreT:
        """Open the store in ``folder``; its files have been checked against ``config.files``."""

    @classmethod
    def _files_read(cls, config: StoreConfig) -> Iterable[str]:
        """The files ``_from_pretrained`` reads: each must have a sha256 in the config."""
        return ()

    @classmethod
    def _files_needed(cls, config: StoreConfig, **kwargs: Any) -> list[str] | None:
        """The files a load with ``kwargs`` needs when it is not all of them (e.g. one process's part of a
        sharded store): only they are downloaded from the Hub and checked. ``None``: every file."""
        return None

    @classmethod
    def _model_card(cls, config: StoreConfig, repo_id: str | None = None) -> ModelCard | None:
        """The ``README.md`` of a saved store; ``repo_id`` is the Hub repository it is pushed to."""
        return None

    # ----------------------------------------------------------------- the seam for whole-folder writes
    @contextlib.contextmanager
    def _writable_folder(self, save_directory: Path) -> Iterator[Path]:
        """The folder a save writes into: a temporary sibling of ``save_directory`` that replaces it
        as a whole once the block completes, under the folder's write lock.

        A save that fails midway (a full disk, an interrupt) leaves the store that was there as it
        was, and a concurrent writer fails at once ([`FolderInUseError`][hf_knnlm.FolderInUseError]).
        Files of the old folder that are not the store's own (a user's notes) are carried over.
        """
        own = (self.config_class.CONFIG_NAME, CARD_NAME, *self.hub_patterns)
        with write_folder(save_directory, keep=not_matching(own)) as folder:
            yield folder

    # ----------------------------------------------------------------- public API
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, repo_id: str | None = None, **kwargs: Any
    ) -> Path:
        """Write the store to ``save_directory``: data files, ``README.md`` model card, config (last).

        Args:
            save_directory (`str` or `os.PathLike`): the folder; created if missing.
            repo_id (`str`, *optional*): the Hub repository the folder is meant for (shown in the card).
            kwargs: store-specific options (e.g. ``max_shard_size`` of a datastore).

        Returns:
            `Path`: the folder written.
        """
        save_directory = Path(save_directory)
        with self._writable_folder(save_directory) as folder:
            config, files = self._save_pretrained(folder, **kwargs)
            finish_folder(folder, config, files, functools.partial(self._model_card, repo_id=repo_id))
        return save_directory

    @classmethod
    def from_pretrained(
        cls: type[StoreT],
        repo_id_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        verify: bool = True,
        **kwargs: Any,
    ) -> StoreT:
        """Open a store from a local folder or, if there is none, a Hub repository.

        Args:
            repo_id_or_path (`str` or `os.PathLike`): a folder written by ``save_pretrained`` or a Hub
                repository id (``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the cache are honoured).
            subfolder (`str`, *optional*): the store's folder inside the repository or folder.
            revision, cache_dir, local_files_only, token, force_download: as in ``snapshot_download``.
            verify (`bool`, defaults to `True`): check every file's sha256 before it is read.
            kwargs: store-specific options, passed to ``_from_pretrained``.
        """
        config_name = cls.config_class.CONFIG_NAME

        def patterns(config_path: Path) -> list[str]:  # what to download, once the config is here
            needed = cls._files_needed(cls.config_class.load(config_path), **kwargs)
            return [CARD_NAME, *(cls.hub_patterns if needed is None else needed)]

        folder = resolve_folder(
            repo_id_or_path,
            config_name=config_name,
            allow_patterns=patterns,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
        )
        config = cls.config_class.load(folder / config_name)
        if verify:
            needed = cls._files_needed(config, **kwargs)
            required = cls._files_read(config) if needed is None else needed
            expected = (
                config.files if needed is None else {n: config.files[n] for n in needed if n in config.files}
            )
            verify_files(folder, expected, what=cls.config_class.WHAT, required=required)
        return cls._from_pretrained(folder, config, **kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, **kwargs: Any) -> Any:
        """Save into a temporary folder and upload it to ``repo_id`` as one commit.

        Args:
            repo_id (`str`): the Hub model repository (created if missing).
            commit_message (`str`, *optional*): the commit message.
            revision (`str`, *optional*): branch to commit to (created from the default branch if missing).
            private (`bool`, *optional*): visibility of a repository this call creates.
            token (`str` or `bool`, *optional*): Hub token; defaults to the logged-in one.
            create_pr (`bool`, defaults to `False`): open a pull request instead of committing.
            kwargs: everything else goes to [`save_pretrained`][hf_knnlm.utils.HubMixin.save_pretrained] (e.g.
                ``max_shard_size``).

        A README.md the repository already has is kept; remote files matching ``delete_patterns``
        that this upload does not rewrite are deleted in the same commit.
        """
        hub_kwargs = {name: kwargs.pop(name) for name in PUSH_OPTIONS if name in kwargs}
        return push_folder(
            functools.partial(self.save_pretrained, repo_id=repo_id, **kwargs),
            repo_id,
            commit_message=commit_message or self.default_commit_message,
            delete_patterns=list(self.delete_patterns) if self.delete_patterns else None,
            **hub_kwargs,
        )


__all__ = ["CARD_NAME", "HubMixin", "StoreConfig", "check_relative", "finish_folder", "render_card"]
