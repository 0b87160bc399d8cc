"""EK-FAC's eigenvalue pass replays records made by the factor pass (``EKFAC.replay_bytes``).

Pass 1 keeps its layer inputs and the output gradients of pass 2's own label draws (made from
pass 2's generator), so whether pass 2 replays them or runs the model again the fit is the
same to the bit; a replayed pass reads no data. Records are kept only when all of them fit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infl import EKFAC, HessianOperator, IndexedData, InputError, ModelWrapper, Objective
from infl.solvers import kronecker
from infl.solvers.base import solver_from_spec, solver_spec
from infl.solvers.kronecker_stream import ChunkRecord, Replay, records_nbytes, stream

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


def pass_one(x, y, *, fisher="true", mc_samples=1, seed=0) -> Replay:
    """Pass 1 over ``(x, y)`` in chunks of eight, every record kept."""
    wrapper = ModelWrapper(cnn(), Objective("cross_entropy", 0.01))
    keep = Replay(1 << 40, torch.Generator().manual_seed(seed + 1))
    kronecker.collect_factors(
        wrapper,
        IndexedData((x, y)),
        kronecker.partition(wrapper, allow_diagonal=True),
        fisher=fisher,
        chunk_size=CHUNK,
        generator=torch.Generator().manual_seed(seed),
        mc_samples=mc_samples,
        progress=False,
        keep=keep,
    )
    return keep


def chunk_bytes(solver: EKFAC) -> int:
    """Bytes of one chunk's records (every chunk has eight examples)."""
    keep = pass_one(*data(), fisher=solver.fisher, mc_samples=solver.mc_samples)
    assert keep.complete
    assert keep.chunks == N // CHUNK
    assert keep.nbytes % keep.chunks == 0
    return keep.nbytes // keep.chunks


@pytest.mark.parametrize(
    "options",
    [
        {"fisher": "true", "mc_samples": 1},
        {"fisher": "true", "mc_samples": 3},
        {"fisher": "true", "mc_samples": "exact"},
        {"fisher": "empirical"},
    ],
)
def test_fit_is_the_same_replayed_or_not_and_a_replay_reads_no_data(options):
    base = EKFAC(damping=0.01, unsupported="diagonal", seed=5, **options)
    size = chunk_bytes(base)
    fits = {}
    # all six chunks fit, or only five: none is kept then (all or nothing)
    for budget, replayed in ((0, False), (5 * size + size // 2, False), (6 * size, True)):
        fit = fitted(EKFAC(**{**base.__dict__, "replay_bytes": budget}))
        assert fit.info["replayed"] is replayed
        assert ChunkCounter.read == (6 if replayed else 12)
        fits[budget] = fit
    first = fits[0]
    for fit in fits.values():
        for name, values in first.eigenvalues.items():
            assert torch.equal(fit.eigenvalues[name], values), name
        for block, other in zip(first.partition.diagonal, fit.partition.diagonal, strict=True):
            assert torch.equal(block.diag, other.diag)
    # the eigenvalues are refit in pass 2, not K-FAC's products of the factors' eigenvalues
    layer = first.partition.layers[0]
    assert not torch.allclose(first.eigenvalues[layer.name], torch.outer(layer.eig_S, layer.eig_A))


def test_a_pass_that_outgrows_the_budget_keeps_nothing():
    """The first chunk's size times the chunks decides at once; a later chunk that does not
    fit (the estimate fell short) releases what was kept."""
    first = one_chunk_records(3)
    size = records_nbytes(first)
    keep = Replay(6 * size - 1)
    assert not keep.admits(size, 6)
    assert keep.dropped
    keep = Replay(2 * size)
    assert keep.admits(size, 2)
    keep.add(first, size, 2)
    assert keep.chunks == 1
    assert keep.records
    assert not keep.admits(2 * size, 2)  # twice the estimate: over the budget
    assert keep.dropped
    assert keep.records == []
    assert keep.chunks == 0
    assert not keep.complete
    assert not keep.admits(0, 2)  # dropped for good


def test_kept_gradients_are_pass_twos_draws():
    """Sampled labels: the kept output gradients are those of the generator given to the
    keep (pass 2's draws), not the visited ones; the data's labels keep the visited ones."""
    x, y = data()
    wrapper = ModelWrapper(cnn(), Objective("cross_entropy", 0.01))
    part = kronecker.partition(wrapper, allow_diagonal=True)
    for fisher in ("true", "empirical"):
        visited = []
        keep = Replay(1 << 40, torch.Generator().manual_seed(11))
        stream(
            wrapper,
            IndexedData((x, y)),
            part.layers,
            visited.append,
            fisher=fisher,
            chunk_size=CHUNK,
            generator=torch.Generator().manual_seed(10),
            mc_samples=1,
            desc="",
            progress=False,
            keep=keep,
        )
        assert keep.complete
        assert len(keep.records) == len(visited) == N // CHUNK
        name = part.layers[-1].name
        same = [
            torch.equal(k.grads[name], v.grads[name])
            for k, v in zip(keep.records, visited, strict=True)
        ]
        assert all(same) if fisher == "empirical" else not any(same)
        for k, v in zip(keep.records, visited, strict=True):
            assert k.inputs is v.inputs
    # and they are what pass 2 draws from that generator when it runs the model itself
    replayed = Replay(1 << 40, torch.Generator().manual_seed(11))
    stream(wrapper, IndexedData((x, y)), part.layers, lambda rec: None, fisher="true",
           chunk_size=CHUNK, generator=torch.Generator().manual_seed(10), mc_samples=1,
           desc="", progress=False, keep=replayed)  # fmt: skip
    rerun = []
    stream(wrapper, IndexedData((x, y)), part.layers, rerun.append, fisher="true",
           chunk_size=CHUNK, generator=torch.Generator().manual_seed(11), mc_samples=1,
           desc="", progress=False)  # fmt: skip
    for k, v in zip(replayed.records, rerun, strict=True):
        assert torch.equal(k.grads[name], v.grads[name])


def one_chunk_records(seed: int) -> list:
    """One chunk's records of pass 1 (eight examples, one draw)."""
    x, y = data()
    return list(pass_one(x[:CHUNK], y[:CHUNK], seed=seed).records)


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
    data = torch.zeros(1000, 5)
    acts = torch.randn(8, 4, 3)
    grads = {"a": torch.zeros(1).expand(8, 2, 4), "b": acts.transpose(1, 2)}
    inputs = {"a": [data[:8]], "b": [acts, acts[:, :2]]}
    rec = ChunkRecord(8, inputs, {}, grads, (data[:8],), 1.0, 0, lambda *a: None)
    bytes_per = 8  # float64
    assert records_nbytes([rec]) == (8 * 5 + 8 * 4 * 3 + 1) * bytes_per
    second = ChunkRecord(8, inputs, {}, {"a": torch.zeros(8, 1, 4)}, (data[:8],), 1.0, 1, None)
    assert records_nbytes([rec, second]) == (8 * 5 + 8 * 4 * 3 + 1 + 8 * 4) * bytes_per
