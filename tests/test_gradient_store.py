"""GradientStore: projected training gradients stored once; scores converge to the exact ones
as k grows (random), equal them (Arnoldi); resumable, settings-checked, mixed precision."""

from __future__ import annotations

import errno

import pytest
import torch
from torch import nn

from infl import (
    Arnoldi,
    ExactHessian,
    GradientStore,
    InfluenceCalculator,
    InputError,
    Objective,
    StoreMismatchError,
    StoreWriteError,
    gradient_store,
)

N, M, CHUNK = 60, 8, 16  # 4 chunks


def _problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N + M, 4, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (N + M,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype).eval()
    return model, Objective("cross_entropy", 0.01), (x[:N], y[:N]), (x[N:], y[N:])


def _calc(model, objective, train, solver=None) -> InfluenceCalculator:
    return InfluenceCalculator(
        model,
        objective,
        train,
        solver if solver is not None else ExactHessian(damping=1.0),
        progress=False,
        check_minimum=False,
        chunk_size=CHUNK,
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_projected_scores_converge_to_the_exact_ones_as_k_grows(tmp_path):
    model, objective, train, test = _problem()
    calc = _calc(model, objective, train)
    exact = calc.influence(test)
    errors = {}
    for k in (16, 256, 4096):
        runs = [
            _relative(
                GradientStore.build(
                    calc, tmp_path / f"k{k}-s{seed}", dim=k, seed=seed, dtype="float64"
                ).influence(test),
                exact,
            )
            for seed in range(2)
        ]
        errors[k] = sum(runs) / len(runs)
    # the error of an unbiased JL inner product falls like 1/sqrt(k): 16x from k=16 to 4096
    assert errors[16] > 2 * errors[256] > 4 * errors[4096], errors
    assert errors[4096] < 0.1, errors


def test_the_arnoldi_basis_store_equals_the_calculators_scores(tmp_path):
    model, objective, train, test = _problem()
    calc = _calc(model, objective, train, Arnoldi(rank=12, damping=1.0))
    store = GradientStore.build(calc, tmp_path / "a", basis="arnoldi", dtype="float64")
    assert store.dim == 12
    torch.testing.assert_close(store.influence(test), calc.influence(test), rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="needs a low-rank solver"):
        GradientStore.build(_calc(model, objective, train), tmp_path / "b", basis="arnoldi")


def test_top_k_from_the_store_ranks_its_own_scores(tmp_path):
    model, objective, train, test = _problem()
    store = GradientStore.build(_calc(model, objective, train), tmp_path, dim=64, dtype="float64")
    scores = store.influence(test)
    idx, val = store.top_k(test, 5, by="harmful")
    assert torch.equal(idx, scores.topk(5, dim=1).indices)
    torch.testing.assert_close(val, scores.gather(1, idx))


def test_an_interrupted_build_resumes_at_the_first_unfinished_chunk(tmp_path, monkeypatch):
    model, objective, train, _test = _problem()
    calc = _calc(model, objective, train)
    original = calc.wrapper.train_grads
    calls = [0]
    interrupt_at = [3]  # Ctrl-C while the third chunk is computed

    def counted(batch):
        calls[0] += 1
        if calls[0] == interrupt_at[0]:
            raise KeyboardInterrupt
        return original(batch)

    monkeypatch.setattr(calc.wrapper, "train_grads", counted)
    with pytest.raises(KeyboardInterrupt):
        GradientStore.build(calc, tmp_path, dim=32, dtype="float64")
    calls[0], interrupt_at[0] = 0, -1
    store = GradientStore.build(calc, tmp_path, dim=32, dtype="float64")
    assert calls[0] == 4 - 2  # the two chunks finished before Ctrl-C are not recomputed
    fresh = GradientStore.build(_calc(model, objective, train), tmp_path / "f", dim=32)
    torch.testing.assert_close(store.gradients(), fresh.gradients().double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("change", "setting"),
    [({"dim": 33}, "shape"), ({"seed": 1}, "seed"), ({"dtype": "float16"}, "storage_dtype")],
)
def test_a_store_of_other_settings_is_refused(tmp_path, change, setting):
    model, objective, train, _ = _problem()
    calc = _calc(model, objective, train)
    GradientStore.build(calc, tmp_path, dim=32, seed=0, dtype="float32")
    kwargs = {"dim": 32, "seed": 0, "dtype": "float32", **change}
    with pytest.raises(StoreMismatchError, match=f"'{setting}' was"):
        GradientStore.build(calc, tmp_path, **kwargs)
    other = _calc(model, objective, (train[0] + 0.5, train[1]))
    with pytest.raises(StoreMismatchError, match="'training data' was"):
        GradientStore.build(other, tmp_path, dim=32, seed=0, dtype="float32")


def test_a_full_disk_during_the_build_keeps_the_finished_chunks(tmp_path, monkeypatch):
    model, objective, train, _test = _problem()
    calc = _calc(model, objective, train)
    real = gradient_store.write_atomic
    records = [0]

    def disk_fills_up(path, content):
        records[0] += 1
        if records[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, content)

    monkeypatch.setattr(gradient_store, "write_atomic", disk_fills_up)
    with pytest.raises(StoreWriteError, match="disk is full"):
        GradientStore.build(calc, tmp_path, dim=32, dtype="float64")
    monkeypatch.setattr(gradient_store, "write_atomic", real)  # space freed
    original = calc.wrapper.train_grads
    calls = [0]

    def counted(batch):
        calls[0] += 1
        return original(batch)

    monkeypatch.setattr(calc.wrapper, "train_grads", counted)
    store = GradientStore.build(calc, tmp_path, dim=32, dtype="float64")
    assert store.complete
    assert calls[0] == 4 - 2  # two chunks were recorded before the disk filled up
    fresh = GradientStore.build(calc, tmp_path / "f", dim=32, dtype="float64")
    torch.testing.assert_close(store.gradients(), fresh.gradients(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("storage", "amp"),
    [("float16", None), ("bfloat16", None), ("float32", "bfloat16"), ("float16", "float16")],
)
def test_low_precision_storage_and_autocast_are_close_and_deterministic(tmp_path, storage, amp):
    model, objective, train, test = _problem(torch.float32)
    calc = _calc(model, objective, train)
    exact = GradientStore.build(calc, tmp_path / "ref", dim=256, seed=3, dtype="float32")
    first = GradientStore.build(
        calc, tmp_path / "a", dim=256, seed=3, dtype=storage, mixed_precision=amp
    )
    second = GradientStore.build(
        calc, tmp_path / "b", dim=256, seed=3, dtype=storage, mixed_precision=amp
    )
    assert first.gradients().dtype == getattr(torch, storage)
    assert torch.equal(first.gradients(), second.gradients())  # same seed, same bits
    tolerance = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[storage]
    if amp is not None:
        tolerance += {"bfloat16": 3e-2, "float16": 5e-3}[amp]
    assert _relative(first.influence(test), exact.influence(test)) < tolerance


def test_mixed_precision_needs_a_float32_model_and_names_are_checked(tmp_path):
    model, objective, train, _ = _problem()
    calc = _calc(model, objective, train)
    with pytest.raises(InputError, match=r"model\.float\(\)"):
        GradientStore.build(calc, tmp_path, dim=8, mixed_precision="bfloat16")
    with pytest.raises(InputError, match="dtype must be one of"):
        GradientStore.build(calc, tmp_path, dim=8, dtype="int8")
    with pytest.raises(InputError, match="positive integer"):
        GradientStore.build(calc, tmp_path, dim=0)
