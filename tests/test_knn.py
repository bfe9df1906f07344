"""p_kNN and the interpolation against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_knnlm import KNNSettings, Neighbours, interpolate, knn_log_probs
from hf_knnlm.knnlm.mixture import knn_target_log_probs


def _numpy_pknn(keys, values, query, k, temperature, vocab):
    d = ((keys.astype(np.float64) - query.astype(np.float64)) ** 2).sum(-1)
    nearest = np.argsort(d, kind="stable")[:k]
    w = np.exp(-(d[nearest] - d[nearest].min()) / temperature)
    w /= w.sum()
    p = np.zeros(vocab)
    np.add.at(p, values[nearest], w)
    return p


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_pknn_matches_brute_force_numpy(store, temperature):
    keys = store.keys.to_numpy().astype(np.float32)
    values = store.values.to_numpy()
    rng = np.random.default_rng(0)
    queries = keys[rng.choice(len(keys), 5)] + rng.normal(0, 0.05, (5, keys.shape[1])).astype(np.float32)
    found = store.search(torch.from_numpy(queries), k=16)
    got = knn_log_probs(found, store.vocab_size, temperature).exp().double().numpy()
    for row, q in enumerate(queries):
        expected = _numpy_pknn(keys, values, q, 16, temperature, store.vocab_size)
        np.testing.assert_allclose(got[row], expected, atol=1e-5)


def test_target_only_equals_dense_gather():
    torch.manual_seed(0)
    d, ids = torch.rand(6, 8) * 5, torch.randint(0, 20, (6, 8))
    targets = torch.cat([ids[:3, 0], torch.tensor([19, 18, 17])])
    found = Neighbours(d, None, ids)
    dense = knn_log_probs(found, 20, 2.0).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(knn_target_log_probs(found, targets, 2.0), dense)


def test_interpolation_endpoints_are_exact_and_mixes_in_probability_space():
    torch.manual_seed(0)
    lm = torch.log_softmax(torch.randn(4, 30), -1)
    knn = knn_log_probs(Neighbours(torch.rand(4, 5), None, torch.randint(0, 30, (4, 5))), 30, 1.0)
    assert torch.equal(interpolate(lm, knn, 0.0), lm)
    assert torch.equal(interpolate(lm, knn, 1.0), knn)
    mixed = interpolate(lm, knn, 0.3)
    torch.testing.assert_close(mixed.exp(), 0.3 * knn.exp() + 0.7 * lm.exp())
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(4))


def test_missing_neighbours_carry_no_mass():
    d = torch.tensor([[0.5, math.inf], [math.inf, math.inf]])
    ids = torch.tensor([[3, 0], [0, 0]])
    p = knn_log_probs(Neighbours(d, None, ids), 5, 1.0).exp()
    assert p[0, 3] == 1 and p[0].sum() == 1
    assert p[1].sum() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k=0"),
        ({"k": -3}, "k=-3"),
        ({"lmbda": 1.5}, "lmbda=1.5"),
        ({"lmbda": -0.1}, "lmbda=-0.1"),
        ({"temperature": 0}, "temperature=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KNNSettings(**kwargs)
