"""compress_datastore refuses what cannot give the store asked for, by name and before any work: booleans and
non-integers where a size goes, samples too small for the PCA or the index (no faiss assertion, no LAPACK
line on the terminal)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hf_knnlm import compress_datastore


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pca_dim=True), "pca_dim=True"),
        (dict(pca_dim=16.0), "pca_dim=16.0"),
        (dict(pca_dim=0), "pca_dim=0"),
        (dict(prune_to=True), "prune_to=True"),
        (dict(prune_to=0.5, merge_k=0), "merge_k=0"),
        (dict(prune_to=0.5, merge_k=2.5), "merge_k=2.5"),
        (dict(prune_to=0.5, merge_k=True), "merge_k=True"),
        (dict(pca_dim=8, train_size=0), "train_size=0"),
        (dict(pca_dim=8, train_size=1), "train_size=1"),
        (dict(pca_dim=8, train_size=8.0), "train_size=8.0"),
        (dict(index_factory=3), "index_factory=3"),
        (dict(overwrite=1), "overwrite=1"),
    ],
    ids=str,
)
def test_compress_arguments_are_refused_by_name_before_any_work(store, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress_datastore(store, tmp_path / "small", **kwargs)
    assert not (tmp_path / "small").exists()


def test_a_pca_sample_too_small_prints_no_lapack_or_faiss_lines(store_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        from hf_knnlm import Datastore, compress_datastore
        store = Datastore.from_pretrained({str(store_dir)!r})
        try:
            compress_datastore(store, "small", pca_dim=8, train_size=4)
        except ValueError as err:
            print(err)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train_size=4" in done.stdout and "32" in done.stdout, done.stdout
    assert "SSYRK" not in done.stderr and "ssyev" not in done.stderr and "faiss" not in done.stdout
