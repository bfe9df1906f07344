"""What CI and the bench scripts rely on and nothing else would notice rotting: the ``slow`` marker is
registered (``--strict-markers``), ``.ci/run`` runs the README's test command verbatim, and the bench
scripts import only public names of ``hf_knnlm`` that exist."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_SCRIPTS = sorted((ROOT / "bench").glob("*.py"))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the package supports 3.10, whose tomllib is the tomli backport
    tomllib = pytest.importorskip("tomli")


def _pytest_options() -> dict:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return pyproject["tool"]["pytest"]["ini_options"]


def test_the_slow_marker_is_registered_and_markers_are_strict():
    options = _pytest_options()
    assert any(m.split(":")[0].strip() == "slow" for m in options["markers"])
    assert "--strict-markers" in options["addopts"].split()
    assert any(o.startswith("--durations") for o in options["addopts"].split())  # CI prints the slowest


def readme_test_command() -> str:
    """The command of the README's "Run the tests" code block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.+?)\n```", readme, re.S)
    assert found, "README.md has no **Run the tests** block with a bash command"
    return found.group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = readme_test_command()
    assert "python -m pytest" in command
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert command in lines, f".ci/run does not run the README's test command:\n{command}"


def _hf_knnlm_imports(tree: ast.AST):
    """``(module, name)`` of every ``from hf_knnlm... import name`` / ``import hf_knnlm...``, also inside
    string constants that are Python code (the probe and child scripts the bench scripts run)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_knnlm":
            yield from ((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "hf_knnlm")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "hf_knnlm" in node.value:
            try:
                yield from _hf_knnlm_imports(ast.parse(node.value))
            except SyntaxError:
                continue


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda p: p.name)
def test_bench_scripts_import_only_public_names_that_exist(script):
    imports = list(_hf_knnlm_imports(ast.parse(script.read_text(encoding="utf-8"), str(script))))
    private = [f"{m}.{n}" for m, n in imports if any(_private(p) for p in [*m.split("."), n or ""])]
    assert not private, f"{script.name} imports private names of hf_knnlm: {private}"
    missing = []
    for module, name in imports:
        loaded = importlib.import_module(module)
        if name is not None and not hasattr(loaded, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{script.name} imports names hf_knnlm no longer has: {missing}"
