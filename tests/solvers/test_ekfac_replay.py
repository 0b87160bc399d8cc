"""EK-FAC's eigenvalue pass replays the factor pass's kept records (``EKFAC.replay_bytes``).

Pass 2 draws the labels of pass 1, so whatever the budget (none, some chunks, all) the fit is
the same to the bit; the chunks kept are not read from the data again.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infl import EKFAC, HessianOperator, IndexedData, InputError, ModelWrapper, Objective
from infl.solvers import kronecker
from infl.solvers.base import solver_from_spec, solver_spec
from infl.solvers.kronecker_stream import Replay

pytestmark = pytest.mark.usefixtures("float64_default")

N, CHUNK = 48, 8  # six chunks of eight


class ChunkCounter(IndexedData):
    """IndexedData that counts the chunks read from it."""

    read = 0

    def chunks(self, chunk_size, *, skip=0):
        for item in super().chunks(chunk_size, skip=skip):
            type(self).read += 1
            yield item


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # stride 1: pass 1 sums A by correlations of inputs
        nn.GroupNorm(2, 4),  # a diagonal block: pass 1 reads its owner's records
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1),  # strided: pass 1 unfolds patches
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(N, 2, 6, 6), torch.randint(0, 4, (N,))


def fitted(solver: EKFAC):
    x, y = data()
    wrapper = ModelWrapper(cnn(), Objective("cross_entropy", 0.01))
    ChunkCounter.read = 0
    return solver.fit(HessianOperator(wrapper, ChunkCounter((x, y)), CHUNK))


def chunk_bytes(solver: EKFAC) -> int:
    """Bytes of one chunk's records (every chunk has eight examples)."""
    x, y = data()
    wrapper = ModelWrapper(cnn(), Objective("cross_entropy", 0.01))
    keep = Replay(1 << 40)
    kronecker.collect_factors(
        wrapper,
        IndexedData((x, y)),
        kronecker.partition(wrapper, allow_diagonal=True),
        fisher=solver.fisher,
        chunk_size=CHUNK,
        generator=torch.Generator().manual_seed(0),
        mc_samples=solver.mc_samples,
        progress=False,
        keep=keep,
    )
    assert keep.kept == N // CHUNK
    assert keep.nbytes % keep.kept == 0
    return keep.nbytes // keep.kept


@pytest.mark.parametrize(
    "options",
    [
        {"fisher": "true", "mc_samples": 1},
        {"fisher": "true", "mc_samples": 3},
        {"fisher": "true", "mc_samples": "exact"},
        {"fisher": "empirical"},
    ],
)
def test_fit_is_the_same_for_every_budget_and_kept_chunks_are_not_read(options):
    base = EKFAC(damping=0.01, unsupported="diagonal", seed=5, **options)
    size = chunk_bytes(base)
    fits = {}
    for kept, budget in ((0, 0), (3, 3 * size + size // 2), (6, 6 * size)):
        fit = fitted(EKFAC(**{**base.__dict__, "replay_bytes": budget}))
        assert fit.info["replayed_chunks"] == kept
        assert ChunkCounter.read == 6 + (6 - kept)  # pass 1 reads all, pass 2 the rest
        fits[kept] = fit
    for fit in (fits[3], fits[6]):
        for name, values in fits[0].eigenvalues.items():
            assert torch.equal(fit.eigenvalues[name], values), name
        for block, other in zip(fits[0].partition.diagonal, fit.partition.diagonal, strict=True):
            assert torch.equal(block.diag, other.diag)
    # the eigenvalues are refit in pass 2, not K-FAC's products of the factors' eigenvalues
    layer = fits[6].partition.layers[0]
    assert not torch.allclose(
        fits[6].eigenvalues[layer.name], torch.outer(layer.eig_S, layer.eig_A)
    )


def test_pass_two_draws_the_labels_of_pass_one():
    """With one kept chunk of two, pass 2 recomputes the second from pass 1's generator state:
    forgetting that state (drawing from the seed again) changes the fit."""
    base = EKFAC(damping=0.01, unsupported="diagonal", seed=5)
    size = chunk_bytes(base)
    kept = fitted(EKFAC(**{**base.__dict__, "replay_bytes": size}))
    assert kept.info["replayed_chunks"] == 1
    original = Replay.offer

    def forgetful(self, records):
        original(self, records)
        if self.closed:
            self.state = None

    try:
        Replay.offer = forgetful
        redrawn = fitted(EKFAC(**{**base.__dict__, "replay_bytes": size}))
    finally:
        Replay.offer = original
    name = kept.partition.layers[0].name
    assert not torch.equal(kept.eigenvalues[name], redrawn.eigenvalues[name])
    every = fitted(EKFAC(**{**base.__dict__, "replay_bytes": 0}))
    assert torch.equal(kept.eigenvalues[name], every.eigenvalues[name])


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1GiB"])
def test_replay_bytes_is_checked(bad):
    with pytest.raises(InputError, match="replay_bytes"):
        EKFAC(replay_bytes=bad)


def test_spec_leaves_the_default_out_and_keeps_another():
    assert "replay_bytes" not in solver_spec(EKFAC())["fields"]
    spec = solver_spec(EKFAC(replay_bytes=0))
    assert spec["fields"]["replay_bytes"] == 0
    assert solver_from_spec(spec) == EKFAC(replay_bytes=0)
    assert solver_from_spec(solver_spec(EKFAC())) == EKFAC()


def test_records_count_what_they_hold():
    """Each storage once; a view of the data set counts its slice, a broadcast its storage."""
    from infl.solvers.kronecker_stream import ChunkRecord, records_nbytes

    data = torch.zeros(1000, 5)
    acts = torch.randn(8, 4, 3)
    grads = {"a": torch.zeros(1).expand(8, 2, 4), "b": acts.transpose(1, 2)}
    inputs = {"a": [data[:8]], "b": [acts, acts[:, :2]]}
    rec = ChunkRecord(8, inputs, {}, grads, (data[:8],), 1.0, 0, lambda *a: None)
    bytes_per = 8  # float64
    assert records_nbytes([rec]) == (8 * 5 + 8 * 4 * 3 + 1) * bytes_per
    second = ChunkRecord(8, inputs, {}, {"a": torch.zeros(8, 1, 4)}, (data[:8],), 1.0, 1, None)
    assert records_nbytes([rec, second]) == (8 * 5 + 8 * 4 * 3 + 1 + 8 * 4) * bytes_per
