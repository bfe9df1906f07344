"""The documentation site builds with warnings as errors, and its pages render in a real headless browser.

Chromium is Debian's ``chromium`` package, driven through the ``playwright`` Python package
(``executable_path``: Playwright's own browser download is not used). In CI (``HF_KNNLM_CI=1``) a
missing tool fails these tests; elsewhere they are skipped with the reason (``conftest.require``). With
``HF_KNNLM_UPDATE_SCREENSHOTS=1`` the screenshots are written to ``docs/screenshots/`` (the ones the
docs show); otherwise to a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import require
except ImportError:
    from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def _bench_common():
    """``bench/_common.py``: its headless Chromium is the one the bench screenshots use."""
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(docs_root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=docs_root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(docs_root), "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    installed = all(importlib.util.find_spec(name) is not None for name in ("mkdocs", "mkdocstrings"))
    require(installed, 'mkdocs / mkdocstrings are not installed (pip install -e ".[docs]")')
    folder = tmp_path_factory.mktemp("site")
    result = _build(ROOT, folder)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require(
        importlib.util.find_spec("playwright") is not None,
        "the playwright package is not installed (the dev extra has it)",
    )
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    require(executable is not None, "no chromium on PATH (Debian: apt-get install -y chromium)")
    profile = str(tmp_path_factory.mktemp("chromium-profile"))  # a fresh profile: nothing from before
    with _bench_common().chromium_context(profile, executable, {"width": 1280, "height": 900}) as context:
        context.set_default_timeout(60_000)
        context.route("http*://**", lambda route: route.abort())  # a page that needs the network fails
        yield context


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    if os.environ.get("HF_KNNLM_UPDATE_SCREENSHOTS") == "1":
        return ROOT / "docs" / "screenshots"
    return tmp_path_factory.mktemp("screenshots")


def _open(browser, path: Path):
    page = browser.new_page()
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page


def test_a_broken_link_fails_the_build(tmp_path):
    installed = importlib.util.find_spec("mkdocs") is not None
    require(installed, 'mkdocs is not installed (pip install -e ".[docs]")')
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "hf_knnlm", copy / "hf_knnlm")
    page = copy / "docs" / "get-started.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = _build(copy, tmp_path / "site")
    assert result.returncode != 0 and "no-such-page.md" in result.stdout + result.stderr


def test_home_page_renders_navigation_and_code(site, browser, screenshots):
    page = _open(browser, site / "index.html")
    nav = page.locator("nav.md-nav--primary")
    for section in ("Get started", "Tutorials", "How-to guides", "Concepts", "API reference", "Benchmarks"):
        assert nav.get_by_text(section, exact=True).first.is_visible(), f"{section!r} missing from the nav"
    code = page.locator("div.highlight pre code").first
    assert code.is_visible() and "KNNProcessor" in code.inner_text()
    assert code.locator("span.kn, span.n").count() > 0  # highlighted tokens, not plain text
    assert page.locator("img[src$='data_flow.svg']").evaluate("img => img.naturalWidth") > 0
    page.screenshot(path=str(screenshots / "home.png"))
    page.close()


def test_api_reference_page_renders_a_docstring(site, browser, screenshots):
    page = _open(browser, site / "api" / "knnlm.html")
    heading = page.locator("[id='hf_knnlm.KNNProcessor']")
    assert heading.is_visible() and "KNNProcessor" in heading.inner_text()
    assert page.locator("nav.md-nav--primary a.md-nav__link--active").first.inner_text().strip() == "kNN-LM"
    example = page.locator("div.doc-contents div.highlight pre code").first
    assert example.is_visible() and ">>>" in example.inner_text()
    links = page.locator("a.autorefs-internal")
    assert links.count() > 0  # cross-references resolved to anchors
    target = links.first.get_attribute("href")
    assert target and "#hf_knnlm." in target
    page.set_viewport_size({"width": 1280, "height": 2000})  # the heading, the docstring and its example
    page.screenshot(path=str(screenshots / "api-knnlm.png"))
    page.close()


def test_attribution_view_shows_a_legend_and_the_neighbours_of_a_token(
    browser, screenshots, model, tokenizer, store, tmp_path
):
    from hf_knnlm import explain_generation, render_html

    attributions, _ = explain_generation(
        model, tokenizer, store, "the king", max_new_tokens=8, k=16, lmbda=0.15, top=4
    )
    view = tmp_path / "why.html"
    view.write_text(render_html("the king", attributions), encoding="utf-8")
    page = _open(browser, view)
    ticks = page.locator(".legend .ticks span").all_inner_texts()
    low, high = min(a.knn_share for a in attributions), max(a.knn_share for a in attributions)
    assert ticks[0] == f"{low:.1%}" and ticks[-1] == f"{high:.1%}"  # the text's own range
    tokens = page.locator(".text .tok")
    assert tokens.count() == len(attributions)
    colours = set(tokens.evaluate_all("ts => ts.map(t => getComputedStyle(t).backgroundColor)"))
    assert len(colours) > 1  # shaded apart, not all white
    tokens.nth(2).click()
    shown = page.locator("section.detail:not([hidden])")
    assert shown.count() == 1 and shown.get_attribute("data-i") == "2"
    rows = shown.locator("table tr")
    assert rows.count() == 1 + len(attributions[2].neighbours)
    assert "texts[0][" in shown.inner_text()  # the source document and character span
    page.screenshot(path=str(screenshots / "attribution-test.png"), full_page=True)
    page.close()


def _inventory(site: Path) -> set[str]:
    """The objects the API reference documents (mkdocstrings' objects.inv)."""
    import zlib

    header_and_body = (site / "objects.inv").read_bytes().split(b"\n", 4)
    return {line.split()[0] for line in zlib.decompress(header_and_body[4]).decode().splitlines()}


def test_every_public_name_is_in_the_api_reference(site):
    import importlib

    import hf_knnlm

    documented = _inventory(site)
    missing = []
    for package in (
        "",
        ".retrieval",
        ".rag",
        ".open_qa",
        ".open_qa.pretraining",
        ".datastore",
        ".lm",
        ".utils",
        ".attention",
    ):
        module = importlib.import_module(f"hf_knnlm{package}")
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, str):  # __version__, file-name constants
                continue
            paths = {f"hf_knnlm{package}.{name}", f"hf_knnlm.{name}", f"{obj.__module__}.{name}"}
            paths |= {
                f"hf_knnlm.{home}.{name}"
                for home in ("retrieval", "knnlm", "datastore", "lm", "utils", "attention")
            }
            if not paths & documented:
                missing.append(f"hf_knnlm{package}.{name}")
    assert not missing, f"not in the API reference (docs/api/*.md): {missing}"
    assert hf_knnlm.__all__  # the top-level names were checked too
