"""Wall time of ``import hf_knnlm`` in fresh interpreters, and which heavy libraries it loads.

    python bench/import_time.py --runs 7 [--compare OTHER_SOURCE_TREE]

Each run is a new ``python -c`` process that times the import statement alone (interpreter start-up
is not counted). With ``--compare`` the same measurement runs, interleaved, on another source tree
(a folder holding an ``hf_knnlm`` package, e.g. an exported older commit), so that both medians
and their ratio come from one run under the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _trees import add_tree_args, run_probe, trees

HEAVY = ("torch", "transformers", "faiss", "datasets", "accelerate", "matplotlib", "pandas")
_PROBE = """
import json, sys, time
start = time.perf_counter()
import hf_knnlm
seconds = time.perf_counter() - start
assert hf_knnlm.__file__.startswith({root!r}), hf_knnlm.__file__
print(json.dumps({{"seconds": seconds, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def one_import(tree: Path) -> dict:
    return run_probe(tree, _PROBE.format(root=str(tree.resolve()), heavy=HEAVY))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    add_tree_args(parser)
    args = parser.parse_args()
    measured = trees(args)
    results: dict[str, list[dict]] = {name: [] for name in measured}
    for _ in range(args.runs):
        for name, tree in measured.items():  # interleaved: both see the same machine load
            results[name].append(one_import(tree))
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["seconds"] for r in runs)
        print(f"{name:14s} {measured[name]}")
        print(
            f"  import hf_knnlm: median {medians[name]:.3f} s over {len(runs)} runs "
            f"(min {min(r['seconds'] for r in runs):.3f}, max {max(r['seconds'] for r in runs):.3f})"
        )
        print(f"  heavy libraries loaded: {', '.join(runs[0]['loaded']) or 'none'}")
    if args.compare is not None:
        print(f"ratio compared / this: {medians['compared tree'] / medians['this tree']:.1f}x")


if __name__ == "__main__":
    main()
