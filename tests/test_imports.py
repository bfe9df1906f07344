"""``import hf_knnlm`` is light and works without faiss; faiss features say how to install it; the
Auto classes know hf_knnlm's model types whatever the import order."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import make_model, make_tokenizer
except ImportError:
    from open_qa_utils import make_model, make_tokenizer

REPO = Path(__file__).resolve().parents[1]

# faiss looks uninstalled: ``import faiss`` raises ModuleNotFoundError and ``importlib.util.find_spec``
# answers None (libraries such as datasets probe for it), whatever this environment has.
_NO_FAISS = """
import sys
sys.modules["faiss"] = None
"""


def run_python(code: str, *, faiss: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (optionally without faiss); its last stdout line is JSON."""
    source = ("" if faiss else _NO_FAISS) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", source], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def last_json(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_heavy_library_and_needs_no_faiss():
    result = run_python(
        """
        import json, sys
        import hf_knnlm
        libraries = ("faiss", "torch", "transformers", "datasets", "matplotlib")
        heavy = [m for m in libraries if sys.modules.get(m) is not None]
        print(json.dumps({"heavy": heavy, "version": hf_knnlm.__version__, "all": sorted(hf_knnlm.__all__)}))
        """,
        faiss=False,
    )
    out = last_json(result)
    assert out["heavy"] == [] and out["version"]
    assert "Datastore" in out["all"] and "KNNProcessor" in out["all"] and "IntegrityError" in out["all"]


def test_cli_help_lists_the_verbs_without_importing_heavy_libraries():
    # `hf-knnlm --help` built every verb's options, which imported torch, transformers and datasets
    result = run_python(
        """
        import contextlib, io, json, sys
        from hf_knnlm.commands import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["--help"])
        libraries = ("faiss", "torch", "transformers", "datasets")
        heavy = [m for m in libraries if sys.modules.get(m) is not None]
        print(json.dumps({"heavy": heavy, "lists_verbs": "long-evaluate" in out.getvalue()}))
        """
    )
    assert last_json(result) == {"heavy": [], "lists_verbs": True}


@pytest.mark.slow
def test_every_public_name_resolves_without_faiss():
    result = run_python(
        """
        import json, sys
        import hf_knnlm
        names = [n for n in hf_knnlm.__all__ if getattr(hf_knnlm, n) is None]
        print(json.dumps({"unresolved": names, "faiss": sys.modules.get("faiss") is not None}))
        """,
        faiss=False,
    )
    assert last_json(result) == {"unresolved": [], "faiss": False}


def test_faiss_features_fail_with_one_line_naming_the_extras(store_dir, tmp_path):
    result = run_python(
        f"""
        import json
        from hf_knnlm import Datastore
        from hf_knnlm.utils.faiss_support import MissingDependencyError
        from hf_knnlm.commands import main
        try:
            Datastore.from_pretrained({str(store_dir)!r})
        except MissingDependencyError as err:
            message = str(err)
        code = main(["reindex", "--datastore", {str(store_dir)!r}, "--output", {str(tmp_path / "x")!r},
                     "--index-factory", "Flat"])
        print(json.dumps({{"message": message, "code": code}}))
        """,
        faiss=False,
    )
    out = last_json(result)
    assert out["message"].startswith("Opening a kNN-LM datastore needs faiss")
    assert "pip install 'hf-knnlm[cpu]'" in out["message"] and "'hf-knnlm[gpu]'" in out["message"]
    assert "\n" not in out["message"]
    assert out["code"] == 2
    assert "Traceback" not in result.stderr
    assert "hf-knnlm reindex: error: Opening a kNN-LM datastore needs faiss" in result.stderr


@pytest.mark.slow
def test_a_build_without_faiss_fails_before_the_model_runs(tmp_path):
    result = run_python(
        f"""
        import json
        from transformers import GPT2Config, GPT2LMHeadModel
        from hf_knnlm import Datastore
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
        calls = []
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            Datastore.build(model, None, ["text"], {str(tmp_path / "store")!r})
        except ImportError as err:
            print(json.dumps({{"message": str(err), "forward_calls": len(calls)}}))
        """,
        faiss=False,
    )
    out = last_json(result)
    assert out["message"].startswith("Building a kNN-LM datastore needs faiss") and out["forward_calls"] == 0


@pytest.fixture(scope="module")
def saved_realm(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("realm")
    make_model(make_tokenizer(folder)).save_pretrained(folder)
    return folder


_AUTO = "from transformers import AutoConfig, AutoModel"


@pytest.mark.slow
@pytest.mark.parametrize(
    "imports",
    [
        "import hf_knnlm\nfrom transformers import AutoConfig, AutoModel",
        "from transformers import AutoConfig, AutoModel\nimport hf_knnlm",
        "import hf_knnlm\nfrom transformers import BertModel, Trainer\n" + _AUTO,
        "from transformers import GPT2LMHeadModel\nimport hf_knnlm\n" + _AUTO,
        "from hf_knnlm import RealmForOpenQA\nfrom transformers import AutoConfig, AutoModel",
    ],
    ids=["hf_knnlm-first", "transformers-first", "trainer-between", "model-first", "class"],
)
def test_auto_classes_know_our_model_types_in_any_import_order(saved_realm, imports):
    result = run_python(
        imports
        + f"""
import json, sys
model = AutoModel.from_pretrained({str(saved_realm)!r})
config = AutoConfig.for_model("knnlm", base_model_name_or_path="gpt2")
print(json.dumps({{"model": type(model).__name__, "config": type(config).__name__,
                   "faiss": sys.modules.get("faiss") is not None}}))
""",
        faiss=False,
    )
    assert last_json(result) == {"model": "RealmForOpenQA", "config": "KNNLMConfig", "faiss": False}


def _binds_faiss(node: ast.AST) -> bool:
    return isinstance(node, (ast.Import, ast.ImportFrom)) and any(
        (alias.asname or alias.name) == "faiss" for alias in node.names
    )


def _annotation_nodes(fn: ast.FunctionDef) -> set[int]:
    roots = [a.annotation for a in ast.walk(fn) if isinstance(a, (ast.arg, ast.AnnAssign)) and a.annotation]
    roots += [fn.returns] if fn.returns else []
    return {id(n) for root in roots for n in ast.walk(root)}


def _functions_using_faiss_without_importing_it() -> list[str]:
    """Functions that read the name ``faiss`` in a module that binds it only for type checkers."""
    found = []
    for path in sorted((REPO / "hf_knnlm").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(_binds_faiss(node) for node in tree.body):
            continue  # a module-level import (only in modules outside the package's import path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            annotations = _annotation_nodes(fn)
            bound = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            bound |= {"faiss" for n in ast.walk(fn) if _binds_faiss(n)}
            reads = [
                n
                for n in ast.walk(fn)
                if isinstance(n, ast.Name) and n.id == "faiss" and isinstance(n.ctx, ast.Load)
                if id(n) not in annotations
            ]
            if reads and "faiss" not in bound:
                found.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name}")
    return found


def test_faiss_is_reached_through_import_faiss_only():
    """A function that uses faiss binds it with ``import_faiss(...)`` (which names the extras when
    faiss is missing); otherwise it would fail with a NameError once the module-level import is gone."""
    assert _functions_using_faiss_without_importing_it() == []
