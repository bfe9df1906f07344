"""Every example in a docstring runs, offline, on tiny in-process models (doctest).

Examples load the GPT-2 tokenizer by its Hub id, as users write it; here it is served offline from a
Hub cache filled with the GPT-2 tokenizer files in ``../shared/data/gpt2-tokenizer`` (the same files).
Without them the examples are skipped with that reason; in CI (``HF_KNNLM_CI=1``) they fail instead.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants
from transformers import GPT2Config

import hf_knnlm

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import SHARED_DATA, require
except ImportError:
    from conftest import SHARED_DATA, require

GPT2_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
MODULES = sorted(m.name for m in pkgutil.walk_packages(hf_knnlm.__path__, "hf_knnlm."))
_FENCE = re.compile(r"^\s*```\w*\s*$", re.MULTILINE)


class FencedDocTestParser(doctest.DocTestParser):
    """Examples sit in Markdown ``` fences (as in transformers); a fence line ends an example's output."""

    def parse(self, string, name="<string>"):
        return super().parse(_FENCE.sub("", string), name)


def _examples(name: str) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(parser=FencedDocTestParser(), exclude_empty=True)
    return [t for t in finder.find(importlib.import_module(name), name) if t.examples]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hub cache holding ``gpt2``'s tokenizer files, as ``snapshot_download`` would have left it."""
    source = SHARED_DATA / "gpt2-tokenizer"
    require(
        source.is_dir(),
        f"{source} is missing (the GPT-2 tokenizer the examples load; HF_KNNLM_SHARED_DATA names the folder)",
    )
    cache = tmp_path_factory.mktemp("hf-cache")
    revision = "0" * 40
    snapshot = cache / "models--gpt2" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in GPT2_FILES:
        shutil.copyfile(source / name, snapshot / name)
    GPT2Config().to_json_file(snapshot / "config.json")  # AutoTokenizer reads the model type from it
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text(revision)
    return cache


def test_every_module_with_examples_is_collected():
    with_examples = {name for name in MODULES if _examples(name)}
    assert {
        "hf_knnlm.utils.hub_mixin",
        "hf_knnlm.knnlm.logits_process",
        "hf_knnlm.datastore.datastore",
    } <= with_examples


DOCUMENTED_PACKAGES = (
    "knnlm",
    "datastore",
    "retrieval",
    "rag",
    "open_qa",
    "open_qa.pretraining",
    "utils",
    "lm",
    "attention",
)


def _without_examples(module) -> list[str]:
    objects = {name: getattr(module, name) for name in module.__all__}
    return [name for name, obj in objects.items() if callable(obj) and ">>>" not in (obj.__doc__ or "")]


@pytest.mark.parametrize("package", DOCUMENTED_PACKAGES)
def test_every_public_name_has_an_example(package):
    missing = _without_examples(importlib.import_module(f"hf_knnlm.{package}"))
    assert not missing, f"hf_knnlm.{package}: public names without a docstring example: {missing}"


def test_every_top_level_name_has_an_example():
    missing = _without_examples(hf_knnlm)
    assert not missing, f"hf_knnlm: public names without a docstring example: {missing}"


@pytest.mark.parametrize("name", [name for name in MODULES if _examples(name)])
def test_docstring_examples_run(name, hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write relative paths write here
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may be downloaded
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} failed (output above)"
