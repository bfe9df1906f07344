"""Datastores by repo id through huggingface_hub against a real Hub-compatible server on loopback.

``olah`` serves a read-only Hub mirror from local git repositories (offline: it never contacts
huggingface.co). Large files are committed as git-LFS pointers with the objects in ``.git/lfs``,
as on the Hub. Uploads cannot be served locally; ``test_hub_local.py`` records the ``HfApi`` calls.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import require
except ImportError:
    from conftest import require

OLAH_MISSING = "olah is not installed (pip install -e '.[dev]'); it serves the Hub mirror these tests use"
require(importlib.util.find_spec("olah") is not None, OLAH_MISSING)
require(shutil.which("git") is not None, "git is needed to create the repositories olah serves")
# The mirror's start and the stores it publishes take seconds (module fixtures).
pytestmark = pytest.mark.slow

from huggingface_hub import constants  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from hf_knnlm import (  # noqa: E402
    Datastore,
    IntegrityError,  # noqa: E402
    KNNLMForCausalLM,
    KNNProcessor,
)
from hf_knnlm.commands import main as cli_main  # noqa: E402

ORG = "hf-knnlm-test"
LFS_SUFFIXES = (".safetensors", ".faiss")
LFS_SPEC = "https://git-lfs.github.com/spec/v1"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}
STARTUP_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def publish(
    mirrors: Path,
    name: str,
    folder: Path,
    *,
    skip: tuple[str, ...] = (),
    tag: str | None = None,
    edit: dict[str, bytes] | None = None,
) -> str:
    """Commit the files of ``folder`` as the new state of repo ``ORG/name``; return the commit sha.

    Files ending in ``LFS_SUFFIXES`` are committed as git-LFS pointers, their bytes stored under
    ``.git/lfs/objects`` where olah reads them. ``edit`` replaces a file's bytes (a corrupted upload).
    """
    repo = mirrors / "models" / ORG / name
    if not (repo / ".git").is_dir():
        repo.mkdir(parents=True)
        _git(repo, "init", "-q", "-b", "main")
    for old in repo.iterdir():
        if old.name != ".git":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
    (repo / ".gitattributes").write_text(attributes)
    for src in sorted(folder.rglob("*")):  # subfolders too: a wrapper keeps its datastore in one
        name = src.relative_to(folder).as_posix()
        if not src.is_file() or name in skip:
            continue
        data = (edit or {}).get(name, src.read_bytes())
        if src.name.endswith(LFS_SUFFIXES):
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            data = f"version {LFS_SPEC}\noid sha256:{oid}\nsize {len(data)}\n".encode()
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"Upload {folder.name}")
    if tag:
        _git(repo, "tag", tag)
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    """``olah`` on 127.0.0.1:<free port>, serving ``<root>/mirrors``; always stopped afterwards."""
    root = tmp_path_factory.mktemp("olah")
    mirrors = root / "mirrors"
    mirrors.mkdir()
    port = _free_port()
    config = root / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "olah-cache"}"\n'
        f'mirrors-path = ["{mirrors}"]\n\n[accessibility]\noffline = true\n'
    )
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(root / "logs")],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                log_tail = (root / "server.log").read_text()[-3000:]
                pytest.fail(f"olah exited with code {proc.returncode}:\n{log_tail}")
            try:
                urllib.request.urlopen(url + "/api/whoami-v2", timeout=1)
                break
            except urllib.error.HTTPError:  # any HTTP answer means it is serving
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"olah did not answer on {url} within {STARTUP_SECONDS} s")
                time.sleep(0.2)
        yield url, mirrors
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory, model, tokenizer, corpus_text, other_text):
    """Two stores built by ``hf-knnlm build`` (tiny shards), the first kept as the reference."""
    root = tmp_path_factory.mktemp("built")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    stores = {}
    for name, text in [("a", corpus_text), ("b", other_text)]:
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
        args = [
            "build",
            "--model",
            str(root / "model"),
            "--data",
            str(root / f"{name}.txt"),
            "--output",
            str(root / name),
            "--max-length",
            "64",
            "--stride",
            "32",
            "--batch-size",
            "4",
            "--max-shard-size",
            "64KB",
        ]
        assert cli_main(args) == 0
        stores[name] = root / name
    assert (stores["a"] / "keys.safetensors.index.json").is_file()
    return stores


@pytest.fixture(scope="module")
def published(hub_server, built):
    _, mirrors = hub_server
    a = built["a"]
    # main: store b re-saved with other shards (build -> save_pretrained -> serve).
    b = built["b"].parent / "b-saved"
    Datastore.from_pretrained(built["b"]).save_pretrained(b, max_shard_size="24KB")
    assert len(list(b.glob("keys-*.safetensors"))) > len(list(built["b"].glob("keys-*.safetensors"))) > 1
    shard = sorted(p.name for p in a.glob("keys-*.safetensors"))[1]
    data = bytearray((a / shard).read_bytes())
    data[-3] ^= 0x55
    return {
        "v1": publish(mirrors, "knn", a, tag="v1"),
        "main": publish(mirrors, "knn", b),
        "main_folder": b,
        "corrupt_file": shard,
        "corrupt": publish(mirrors, "corrupt", a, edit={shard: bytes(data)}),
        "incomplete": publish(mirrors, "incomplete", a, skip=("values.safetensors.index.json",)),
        "model": publish(mirrors, "tiny-gpt2", built["a"].parent / "model"),
    }


def _point_hub_at(monkeypatch, url: str, cache: Path, offline: bool = False) -> None:
    # huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE once, at import, into
    # `constants`; a running process must patch those (the subprocess test sets the variables).
    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture()
def hub(hub_server, published, monkeypatch, tmp_path):
    url, _ = hub_server
    _point_hub_at(monkeypatch, url, tmp_path / "hf-cache")
    return url


def _queries(store: Datastore) -> torch.Tensor:
    rows = np.linspace(0, len(store) - 1, 7).astype(np.int64)
    noise = 0.01 * torch.randn(7, store.hidden_size, generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(store.keys.take(rows).astype(np.float32)) + noise


def _search(store: Datastore, queries: torch.Tensor) -> tuple[list, list]:
    distances, ids = store.search_ids(queries, 16)
    return distances.tolist(), ids.tolist()


def test_built_store_round_trips_through_the_hub(hub, built, published, tmp_path):
    local_a, local_b = Datastore.from_pretrained(built["a"]), Datastore.from_pretrained(built["b"])
    q = _queries(local_a)
    served_b = Datastore.from_pretrained(published["main_folder"])
    cases = [
        ("v1", local_a, local_a, published["v1"]),
        (published["v1"], local_a, local_a, published["v1"]),
        (None, local_b, served_b, published["main"]),
    ]
    for revision, local, served, commit in cases:
        remote = Datastore.from_pretrained(f"{ORG}/knn", revision=revision)
        assert remote.folder.name == commit and remote.folder.parent.name == "snapshots"
        assert str(remote.folder).startswith(str(tmp_path / "hf-cache"))
        # Every file, the faiss index and the shards alike, lies in the one snapshot folder.
        assert sorted(p.name for p in remote.folder.iterdir()) == sorted(
            [*remote.config.files, "datastore_config.json", "README.md"]
        )
        assert _search(remote, q) == _search(local, q)
        assert np.array_equal(remote.values.to_numpy(), local.values.to_numpy())
        assert len(remote.keys.shards) == len(served.keys.shards) > 1


def test_explicit_cache_dir_and_revision(hub, built, published, tmp_path):
    remote = Datastore.from_pretrained(f"{ORG}/knn", revision="v1", cache_dir=tmp_path / "elsewhere")
    assert str(remote.folder).startswith(str(tmp_path / "elsewhere"))
    local = Datastore.from_pretrained(built["a"])
    assert _search(remote, _queries(local)) == _search(local, _queries(local))


def test_knnlm_model_and_processor_accept_a_repo_id(hub, built, model, tokenizer):
    ids = tokenizer("The king sees the bridge. A knight follows", return_tensors="pt")["input_ids"]
    local = KNNLMForCausalLM.from_pretrained(model, datastore=built["a"], k=8)
    remote = KNNLMForCausalLM.from_pretrained(
        model, datastore=f"{ORG}/knn", k=8, datastore_kwargs={"revision": "v1"}
    )
    assert remote.config.datastore == f"{ORG}/knn"
    assert torch.equal(remote(ids).logits, local(ids).logits)

    # Base model and datastore both by repo id, as a user writes it.
    by_ids = KNNLMForCausalLM.from_pretrained(
        f"{ORG}/tiny-gpt2", datastore=f"{ORG}/knn", k=8, datastore_kwargs={"revision": "v1"}
    )
    assert torch.equal(by_ids(ids).logits, local(ids).logits)

    outputs = []
    for datastore in (built["b"], f"{ORG}/knn"):  # main is store b
        with KNNProcessor(model, datastore, k=8, lmbda=0.5) as processor:
            outputs.append(
                model.generate(
                    ids,
                    max_new_tokens=6,
                    do_sample=False,
                    pad_token_id=1,
                    logits_processor=LogitsProcessorList([processor]),
                )
            )
    assert torch.equal(outputs[0], outputs[1])


def test_a_wrapper_saved_with_its_datastore_loads_by_repo_id(hub, hub_server, built, tokenizer, tmp_path):
    _, mirrors = hub_server
    ids = tokenizer("The king sees the bridge. A knight follows", return_tensors="pt")["input_ids"]
    wrapper = KNNLMForCausalLM.from_pretrained(f"{ORG}/tiny-gpt2", datastore=built["a"], k=8, lmbda=0.5)
    wrapper.save_pretrained(tmp_path / "wrapper", save_datastore=True)
    publish(mirrors, "knnlm-wrapper", tmp_path / "wrapper", tag="v1")
    legacy = json.loads((tmp_path / "wrapper" / "config.json").read_text())
    legacy.update(datastore="datastore", datastore_subfolder=None)  # as the first release wrote it
    (tmp_path / "wrapper" / "config.json").write_text(json.dumps(legacy))
    publish(mirrors, "knnlm-legacy", tmp_path / "wrapper")
    expected = wrapper(ids).logits
    for repo, revision in ((f"{ORG}/knnlm-wrapper", "v1"), (f"{ORG}/knnlm-legacy", None)):
        remote = KNNLMForCausalLM.from_pretrained(repo, revision=revision)
        assert remote.datastore.folder.name == "datastore"
        assert remote.datastore.folder.parent.parent.name == "snapshots"  # inside the wrapper's snapshot
        assert torch.equal(remote(ids).logits, expected)
    # Saved again elsewhere, the wrapper points at the repository's subfolder, not at a cache path.
    remote.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (config["datastore"], config["datastore_subfolder"]) == (f"{ORG}/knnlm-legacy", "datastore")
    assert torch.equal(KNNLMForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, expected)


def test_corrupted_download_is_refused_by_name(hub, published):
    with pytest.raises(IntegrityError, match=f"'{published['corrupt_file']}'.*sha256"):
        Datastore.from_pretrained(f"{ORG}/corrupt")
    with pytest.raises(IntegrityError, match="'values.safetensors.index.json' is missing"):
        Datastore.from_pretrained(f"{ORG}/incomplete")


def test_offline_from_a_prepopulated_cache(hub, built, monkeypatch, tmp_path):
    for revision in ("v1", None):
        Datastore.from_pretrained(f"{ORG}/knn", revision=revision)
    assert len(Datastore.from_pretrained(f"{ORG}/knn", revision="v1", local_files_only=True)) == len(
        Datastore.from_pretrained(built["a"])
    )
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens: any request would fail
    _point_hub_at(monkeypatch, dead, tmp_path / "hf-cache", offline=True)
    for revision, name in (("v1", "a"), (None, "b")):
        local = Datastore.from_pretrained(built[name])
        remote = Datastore.from_pretrained(f"{ORG}/knn", revision=revision)
        assert _search(remote, _queries(local)) == _search(local, _queries(local))
    with pytest.raises(
        FileNotFoundError, match=f"the Hub repository {ORG}/corrupt could not be fetched"
    ) as info:
        Datastore.from_pretrained(f"{ORG}/corrupt")  # one sentence, the Hub's error chained
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


_CHILD = """
import json, sys, numpy as np, torch
from hf_knnlm import Datastore
store = Datastore.from_pretrained(sys.argv[1], revision=sys.argv[2] if len(sys.argv) > 2 else None)
queries = torch.tensor(json.loads(open(sys.argv[3] if len(sys.argv) > 3 else "queries.json").read()))
distances, ids = store.search_ids(queries, 16)
print(json.dumps({"folder": str(store.folder), "distances": distances.tolist(), "ids": ids.tolist()}))
"""


def test_environment_variables_in_a_fresh_process(hub_server, published, built, tmp_path):
    """HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them, read at import time."""
    url, _ = hub_server
    local = Datastore.from_pretrained(built["a"])
    q = _queries(local)
    (tmp_path / "queries.json").write_text(json.dumps(q.tolist()))
    expected = _search(local, q)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_CACHE=str(tmp_path / "cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    results = []
    for extra in ({}, {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}"}):
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, f"{ORG}/knn", "v1"],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 0, child.stderr[-3000:]
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    for result in results:
        snapshot = tmp_path / "cache" / f"models--{ORG}--knn" / "snapshots" / published["v1"]
        assert result["folder"] == str(snapshot)
        assert (result["distances"], result["ids"]) == expected


def test_load_retriever_takes_a_hub_id(hub, hub_server, tmp_path):
    """What `--retriever org/name` of the RAG verbs reads: the kind comes from the configs the repo holds."""
    from hf_knnlm.retrieval import BM25Retriever, load_retriever

    _, mirrors = hub_server
    docs = [{"text": "The cat sat on the mat."}, {"text": "Dogs bark at night."}]
    BM25Retriever.build(docs).save_pretrained(tmp_path / "bm25")
    publish(mirrors, "bm25", tmp_path / "bm25")
    retriever = load_retriever(f"{ORG}/bm25")
    assert type(retriever).__name__ == "BM25Retriever" and retriever.search(["dogs"], k=1)[1].tolist() == [
        [1]
    ]
    with pytest.raises(FileNotFoundError, match=f"Hub repository {ORG}/no-such-index could not be fetched"):
        load_retriever(f"{ORG}/no-such-index")
