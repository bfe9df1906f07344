"""Every example in a docstring runs, offline, on tiny models or local folders (doctest)."""

from __future__ import annotations

import doctest
import importlib
import re

import pytest

# Modules whose docstrings hold ``>>>`` examples.
MODULES = ["hf_knnlm.hub_mixin"]

_FENCE = re.compile(r"^\s*```\w*\s*$", re.MULTILINE)


class FencedDocTestParser(doctest.DocTestParser):
    """Examples sit in Markdown ``` fences (as in transformers); a fence line ends an example's output."""

    def parse(self, string, name="<string>"):
        return super().parse(_FENCE.sub("", string), name)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write relative paths write here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(parser=FencedDocTestParser(), exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} has no docstring examples"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} failed (output above)"
