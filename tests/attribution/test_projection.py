"""Random-projection attribution converges to the unprojected empirical-Fisher influence."""

from __future__ import annotations

import itertools

import pytest
import torch

import reference
from infl import InputError, NotPositiveDefiniteError, Objective
from infl.attribution import projection, random_projection


def _setup(p):
    return Objective("bce_with_logits", weight_decay=p.wd), (p.x, p.y), (p.x_test, p.y_test)


def _unprojected(p, damping):
    g = reference.per_example_grads(p.theta, p.x, p.y, p.wd)
    t = reference.per_example_grads(p.theta, p.x_test, p.y_test, 0.0)
    fisher = g.T @ g / g.shape[0] + damping * torch.eye(g.shape[1], dtype=g.dtype)
    return -t @ torch.linalg.solve(fisher, g.T)


def test_error_decreases_with_the_projection_dimension(logistic):
    obj, train, test = _setup(logistic)
    exact = _unprojected(logistic, 0.05)
    errors = [
        reference.rel_err(
            random_projection(logistic.model, obj, train, test, dim=k, damping=0.05, seed=1),
            exact,
        )
        for k in (2, 20, 200, 2000, 20000)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.2  # k < p = 5: a real sketch, far from the answer
    assert errors[-1] < 0.03  # k >> p: near-equality


def test_undamped_sketch_with_k_at_least_p_is_exact(logistic):
    # k = p: P is square and invertible, so P^T (P F P^T)^{-1} P = F^{-1}
    obj, train, test = _setup(logistic)
    got = random_projection(logistic.model, obj, train, test, dim=5, damping=0.0, seed=3)
    torch.testing.assert_close(got, _unprojected(logistic, 0.0), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_the_projection_is_seeded_and_independent_of_blocking(logistic, monkeypatch, kind):
    obj, train, test = _setup(logistic)

    def run(**kw):
        return random_projection(
            logistic.model, obj, train, test, dim=3, damping=0.1, kind=kind, **kw
        )

    monkeypatch.setattr(projection, "BLOCK_COLUMNS", 2)  # p = 5: three blocks
    kept = run(seed=4)
    torch.testing.assert_close(run(seed=4, projection_bytes=0, chunk_size=7), kept)
    assert not torch.allclose(run(seed=5), kept)
    blocks = list(projection.projection_blocks(3, 5, seed=4, kind=kind))
    assert [b[0] for b in blocks] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    if kind == "rademacher":
        entries = torch.cat([b[1] for b in blocks], 1).abs()
        torch.testing.assert_close(entries, torch.full_like(entries, 3**-0.5))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"dim": 0}, InputError, "dim must be a positive integer"),
        ({"damping": -1.0}, InputError, "damping must be a finite number >= 0"),
        ({"kind": "sparse"}, InputError, "kind must be 'gaussian' or 'rademacher'"),
        ({"dim": 80, "damping": 0.0}, NotPositiveDefiniteError, "rank at most n=60"),
        ({"dim": 8, "damping": 0.0}, NotPositiveDefiniteError, "raise damping"),
    ],
)
def test_bad_settings_are_refused(logistic, kwargs, error, words):
    obj, train, test = _setup(logistic)
    settings = {"dim": 3, "damping": 0.1, **kwargs}
    with pytest.raises(error, match=words):
        random_projection(logistic.model, obj, train, test, **settings)
