"""Run a probe against several source trees of hf_knnlm, one process each, for before/after tables.

A "tree" is a folder holding an ``hf_knnlm`` package: this checkout, or one exported from another
commit (``git archive <commit> hf_knnlm | tar -x -C /tmp/old``). Each probe runs with the tree first
on ``PYTHONPATH`` (then this ``bench/`` folder, for ``_common``'s helpers) and in it as working
directory, and prints JSON as its last line of output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import BENCH, REPO

THIS_TREE = REPO


def add_tree_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tree", type=Path, default=THIS_TREE, help="the tree to measure (default: this one)"
    )
    parser.add_argument("--compare", type=Path, default=None, help="another tree, measured in the same run")


def trees(args: argparse.Namespace) -> dict[str, Path]:
    """``{"this tree": ..., "compared tree": ...}`` from ``add_tree_args``'s arguments."""
    return {"this tree": args.tree} | ({"compared tree": args.compare} if args.compare else {})


def run_probe(tree: Path, code: str, *argv: str) -> dict:
    """Run ``python -c code *argv`` against ``tree``; return the JSON of its last output line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(BENCH)])}
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, cwd=tree, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
