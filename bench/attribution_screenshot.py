"""The attribution view of a real model, as the docs show it (docs/screenshots/attribution.png).

SmolLM2-135M-Instruct with the datastore of the 3 State of the Union addresses before the held-out part
(what ``--quick`` of the SOTU benchmarks builds), a greedy continuation of a prompt explained token by
token by ``hf-knnlm explain --html`` (the verb itself runs), and photographed in headless Chromium with the
token of the largest datastore share selected.

    python bench/attribution_screenshot.py --workdir runs/sotu --output docs/screenshots/attribution.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import chromium_context, load_smollm2, smollm2_cli_args
from sotu import get_store

from hf_knnlm.commands import main as cli


def screenshot(page: Path, output: Path, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        with chromium_context(profile, chromium, {"width": 1100, "height": 800}) as context:
            tab = context.new_page()
            tab.goto(page.as_uri())
            tab.screenshot(path=str(output), full_page=True, timeout=120_000)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/sotu")
    parser.add_argument("--prompt", default="The state of our Union is")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--lmbda", type=float, default=0.15)
    parser.add_argument("--temperature", type=float, default=2.676)  # tuned on dev text for this store
    parser.add_argument("--output", default="docs/screenshots/attribution.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    store = get_store(model, tokenizer, Path(args.workdir), quick=True, index_factory="Flat")
    del model, tokenizer  # the verb loads its own
    page = Path(args.workdir) / "attribution.html"
    options = {
        "--datastore": store.folder,
        "--prompt": args.prompt,
        "--max-new-tokens": args.max_new_tokens,
        "--k": args.k,
        "--lmbda": args.lmbda,
        "--temperature": args.temperature,
        "--top": 5,
        "--html": page,
    }
    explain = ["explain", *smollm2_cli_args(), *(str(x) for option in options.items() for x in option)]
    if cli(explain) != 0:
        raise SystemExit(f"hf-knnlm {' '.join(explain)} failed")
    screenshot(page, Path(args.output), args.chromium)
    print(f"wrote {page} and {args.output}")


if __name__ == "__main__":
    main()
