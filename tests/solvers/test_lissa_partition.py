"""LiSSA(sampling="partition"): the blocks of a fixed random partition, cycled by epochs.

The blocks average to the full-data operator exactly (unequal block sizes and weight decay
included), each keeps its gradient graph and gives the same products as a fresh one, and the
recursion converges to the exact inverse with the control variate, as independent draws do.
"""

from __future__ import annotations

import pytest
import torch
from test_lissa import _heterogeneous_examples, _MeanOfExamples, control_variate_errors
from torch import nn

from infl import (
    GaussNewtonOperator,
    HessianOperator,
    IndexedData,
    InflWarning,
    InputError,
    LiSSA,
    ModelWrapper,
    Objective,
)
from infl.mixed_precision import mixed_precision_operator
from infl.operators import DenseOperator, LinearOperator, MeanOperator, TrainingDataOperator
from infl.second_order import GRAPH_BUDGET_BYTES
from infl.solvers.lissa_recursion import EpochCycle
from reference import rel_err

N = 50  # examples; batch_size 8 cuts them into 7 blocks of 7 or 8


def _wrapper_and_data(decay: float = 1e-2) -> tuple[ModelWrapper, IndexedData]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    return ModelWrapper(model, Objective("cross_entropy", weight_decay=decay)), IndexedData((x, y))


def _hessian(chunk_size: int = 16) -> HessianOperator:
    wrapper, data = _wrapper_and_data()
    return HessianOperator(wrapper, data, chunk_size, dense=False)


def _positive_definite_system() -> tuple[HessianOperator, torch.Tensor, torch.Tensor, float]:
    """``(H, H + damping*I as a dense matrix, rhs [2, p], damping)``; H is indefinite here, so
    the damping is set above its most negative eigenvalue."""
    op = _hessian()
    dense = op.to_dense()
    eigenvalues = torch.linalg.eigvalsh(dense)
    damping = max(0.05, -2.0 * float(eigenvalues[0]))
    rhs = torch.randn(2, op.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return op, dense + damping * torch.eye(op.size, dtype=torch.float64), rhs, damping


def _block_sizes(blocks: list[TrainingDataOperator]) -> list[int]:
    return [int(block.data[1].shape[0]) for block in blocks]


# ------------------------------------------------------------------------------- the blocks


@pytest.mark.parametrize("curvature", [HessianOperator, GaussNewtonOperator])
def test_the_blocks_cover_every_example_once_and_average_to_the_operator(
    curvature: type[TrainingDataOperator],
) -> None:
    wrapper, data = _wrapper_and_data()
    op = curvature(wrapper, data, 16)
    blocks = op.partition(8, torch.Generator().manual_seed(1))
    assert _block_sizes(blocks) == sorted(_block_sizes(blocks), reverse=True)
    assert sorted(_block_sizes(blocks)) == [7] * 6 + [8]  # 50 = 6 * 7 + 8: unequal sizes
    rows = torch.cat([block.data[0] for block in blocks])
    x = data.select(torch.arange(N))[0]
    assert torch.equal(rows[rows[:, 0].argsort()], x[x[:, 0].argsort()])  # each once
    mean = sum(block.to_dense() for block in blocks) / len(blocks)
    torch.testing.assert_close(mean, op.to_dense(), rtol=1e-12, atol=1e-12)
    # a block weighs its examples by B / n, so a block of 8 is not the mean of its examples
    big = next(block for block in blocks if block.data[1].shape[0] == 8)
    assert big.mean_over == pytest.approx(N / 7)
    # the damped operator's blocks are the damped blocks
    damped = op.damped(0.3).partition(8, torch.Generator().manual_seed(1))
    v = torch.randn(2, op.size, dtype=torch.float64)
    torch.testing.assert_close(
        sum(block.matmat(v) for block in damped) / len(damped),
        op.matmat(v) + 0.3 * v,
        rtol=1e-12,
        atol=1e-12,
    )


def test_a_batch_size_above_n_gives_one_block_equal_to_the_operator() -> None:
    op = _hessian()
    (block,) = op.partition(10 * N, torch.Generator().manual_seed(0))
    v = torch.randn(3, op.size, dtype=torch.float64)
    torch.testing.assert_close(block.matmat(v), op.matmat(v), rtol=1e-12, atol=1e-13)


def test_a_block_keeps_its_graph_and_gives_the_products_of_a_fresh_one() -> None:
    op = _hessian()
    blocks = op.partition(8, torch.Generator().manual_seed(2))
    assert sum(block.graph_budget or 0 for block in blocks) <= GRAPH_BUDGET_BYTES
    block = blocks[0]
    v = torch.randn(2, op.size, dtype=torch.float64)
    outputs = [block.matmat(v) for _ in range(3)]
    assert block._graphs is not None
    assert len(block._graphs.primals) == 1  # an MLP chain: its primal pass, not a graph
    twin = op.partition(8, torch.Generator().manual_seed(2))[0]
    twin.graph_budget = None  # a fresh graph for every product
    fresh = twin.matmat(v)
    assert twin._graphs is None
    for out in outputs:
        assert torch.equal(out, fresh)


def test_a_block_whose_graph_exceeds_its_budget_recomputes_the_same_products() -> None:
    op = _hessian()
    block = op.partition(8, torch.Generator().manual_seed(2))[0]
    block.graph_budget = 0
    v = torch.randn(2, op.size, dtype=torch.float64)
    outputs = [block.matmat(v) for _ in range(3)]
    assert block._graphs is not None
    assert not block._graphs.primals
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_float32_products_partition_the_same_examples_with_the_same_weights() -> None:
    op = _hessian()
    mixed = mixed_precision_operator(op, torch.float32)
    low_blocks = mixed.partition(8, torch.Generator().manual_seed(4))
    full_blocks = op.partition(8, torch.Generator().manual_seed(4))
    v = torch.randn(2, op.size, dtype=torch.float64)
    for low, full in zip(low_blocks, full_blocks, strict=True):
        twin = low.low_precision
        assert isinstance(twin, TrainingDataOperator)
        assert twin.dtype == torch.float32
        assert twin.mean_over == full.mean_over
        assert twin.graph_budget == full.graph_budget
        assert torch.equal(twin.data[1], full.data[1])
        torch.testing.assert_close(low.matmat(v), full.matmat(v), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(low.full_precision.matmat(v), full.matmat(v))


def test_operators_without_training_data_refuse_to_be_partitioned() -> None:
    dense = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(InputError, match="sampling='independent'"):
        dense.partition(2, torch.Generator())
    with pytest.raises(InputError, match="cannot be subsampled"):
        LiSSA(scale=2.0, depth=5, batch_size=2, sampling="partition").solve(
            dense, torch.ones(1, 3, dtype=torch.float64)
        )
    wrapper, data = _wrapper_and_data()
    one_batch = HessianOperator(wrapper, data.select(torch.arange(N)), 16)
    with pytest.raises(InputError, match="IndexedData"):
        one_batch.partition(8, torch.Generator())


# ------------------------------------------------------------------------------- the epochs


def test_each_epoch_visits_every_block_once_in_a_fresh_order() -> None:
    blocks: list[LinearOperator] = [
        DenseOperator(torch.full((1, 1), float(i), dtype=torch.float64)) for i in range(5)
    ]
    cycle = EpochCycle(blocks, torch.Generator().manual_seed(0))
    taken = [blocks.index(op) for op in cycle.take(7) + cycle.take(13)]  # windows cut epochs
    epochs = [taken[i : i + 5] for i in range(0, 20, 5)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


# ------------------------------------------------------------------------------- the solver


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_partition_lissa_with_the_control_variate_converges_to_the_exact_inverse() -> None:
    op, damped, rhs, damping = _positive_definite_system()
    exact = torch.linalg.solve(damped, rhs.T).T
    kw = {"damping": damping, "batch_size": 8, "rtol": 1e-30, "sampling": "partition"}
    errors, plain = control_variate_errors(op, rhs, exact, (28, 56, 140, 560), 14, **kw)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-7
    assert errors[3] < 1e-12  # round-off, where the plain cycled recursion keeps its noise
    assert plain > 1e-2


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_the_reported_residual_is_the_full_operators_taken_from_the_blocks() -> None:
    op, damped, rhs, damping = _positive_definite_system()
    kw = {"damping": damping, "scale": 3.0, "depth": 30, "batch_size": 8, "rtol": 1e-30}
    result = LiSSA(**kw, sampling="partition").solve(op, rhs)
    true = torch.linalg.vector_norm(result.value @ damped - rhs, dim=1)
    expected = true / torch.linalg.vector_norm(rhs, dim=1)
    torch.testing.assert_close(result.residual_norms, expected, rtol=1e-10, atol=0)
    assert op.num_matvecs == 0  # no pass over all the data: every product is a block's


def test_a_mean_of_operators_is_the_mean_of_their_products() -> None:
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(4, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    mats = [m + m.T for m in mats]
    mean = MeanOperator([DenseOperator(m) for m in mats])
    v = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mean.matmat(v), v @ (sum(mats) / 3), rtol=1e-14, atol=1e-14)
    with pytest.raises(InputError, match="at least one"):
        MeanOperator([])
    with pytest.raises(InputError, match="one size"):
        MeanOperator([DenseOperator(mats[0]), DenseOperator(torch.eye(3, dtype=torch.float64))])


class _PartitionedMean(_MeanOfExamples):
    """The dense mean of per-example matrices, with blocks of equal size (``b`` divides
    ``n``): cheap enough for thousands of steps."""

    def partition(self, batch_size: int, generator: torch.Generator) -> list[LinearOperator]:
        n = self.mats.shape[0]
        order = torch.randperm(n, generator=generator)
        return [_MeanOfExamples(self.mats[idx]) for idx in order.tensor_split(-(-n // batch_size))]


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_plain_cycled_steps_keep_a_bias_that_averaging_leaves() -> None:
    """What the docs say of sampling="partition" without the control variate: random
    reshuffling with a fixed scale has a bias that tail averaging does not remove, where
    averaged independent draws keep converging."""
    examples, rhs = _heterogeneous_examples()  # n = 40: 10 blocks of 4
    op = _PartitionedMean(examples.mats)
    exact = torch.linalg.solve(op.mean + 0.1 * torch.eye(6, dtype=torch.float64), rhs.T).T
    kw = {"damping": 0.1, "batch_size": 4, "rtol": 1e-30, "scale": 5.0, "average": True}

    def error(sampling: str, depth: int) -> float:
        runs = [LiSSA(**kw, depth=depth, sampling=sampling, seed=seed) for seed in range(3)]
        return sum(rel_err(run.solve(op, rhs).value, exact) for run in runs) / 3

    cycled = {depth: error("partition", depth) for depth in (1200, 4800)}
    assert cycled[4800] > 0.8 * cycled[1200]  # stalled at its bias
    assert 0.01 < cycled[4800] < 0.1
    assert error("independent", 4800) < cycled[4800] / 2


def test_one_block_is_the_full_data_recursion() -> None:
    op, _, rhs, damping = _positive_definite_system()
    kw = {"damping": damping, "scale": 3.0, "depth": 40, "rtol": 1e-30}
    with pytest.warns(InflWarning):
        one_block = LiSSA(**kw, batch_size=10 * N, sampling="partition").solve(op, rhs)
    with pytest.warns(InflWarning):
        full = LiSSA(**kw, batch_size=None, dense=False).solve(op, rhs)
    torch.testing.assert_close(one_block.value, full.value, rtol=1e-11, atol=1e-12)
    assert one_block.info["blocks"] == 1
    assert one_block.info["sampling"] == "partition"


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_partition_runs_are_seeded_and_do_not_depend_on_the_window() -> None:
    op, _, rhs, damping = _positive_definite_system()
    kw = {"damping": damping, "scale": 3.0, "depth": 45, "batch_size": 8, "rtol": 1e-30}
    solver = LiSSA(**kw, sampling="partition", seed=5)
    first = solver.solve(op, rhs).value
    torch.testing.assert_close(solver.solve(op, rhs).value, first, rtol=0, atol=0)
    for window in (1, 7):
        again = LiSSA(**kw, sampling="partition", seed=5, check_every=window).solve(op, rhs)
        torch.testing.assert_close(again.value, first, rtol=0, atol=0)
    other = LiSSA(**kw, sampling="partition", seed=6).solve(op, rhs).value
    assert not torch.equal(other, first)


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_the_fit_draws_the_blocks_once_and_with_damping_shares_them() -> None:
    op, _, rhs, damping = _positive_definite_system()
    fitted = LiSSA(damping=damping, depth=30, batch_size=8, sampling="partition").fit(op)
    assert fitted.info["blocks"] == 7
    assert fitted.minibatch_max is not None  # the automatic scale covers the blocks' curvature
    blocks = fitted._blocks
    fitted.solve(rhs)
    assert fitted._blocks is blocks
    other = fitted.with_damping(2 * damping)
    assert other._blocks is blocks
    assert all(b.base is a for a, b in zip(blocks or [], other.partition_blocks(), strict=True))
    # a restored fit draws the same blocks at its first solve
    fixed = LiSSA(damping=damping, scale=3.0, depth=30, batch_size=8, sampling="partition")
    lazy = fixed.restore(op, fixed.fit(op).state())
    assert lazy._blocks is None
    torch.testing.assert_close(
        lazy.solve(rhs).value, fixed.fit(op).solve(rhs).value, rtol=0, atol=0
    )
    assert lazy._blocks is not None


def test_sampling_is_checked_and_ignored_on_full_data_steps() -> None:
    with pytest.raises(InputError, match="sampling must be 'independent' or 'partition'"):
        LiSSA(sampling="cycled")  # type: ignore[arg-type]
    op, _, rhs, damping = _positive_definite_system()
    kw = {"damping": damping, "scale": 3.0, "depth": 20, "batch_size": None, "rtol": 1e-30}
    with pytest.warns(InflWarning):
        a = LiSSA(**kw, sampling="partition").solve(op, rhs)
    with pytest.warns(InflWarning):
        b = LiSSA(**kw).solve(op, rhs)
    torch.testing.assert_close(a.value, b.value, rtol=0, atol=0)
    assert a.info["sampling"] is None


def test_a_saved_partition_fit_reloads_to_the_same_scores(tmp_path) -> None:
    from infl import InfluenceCalculator

    wrapper, data = _wrapper_and_data()
    x, y = data.select(torch.arange(N))
    objective = Objective("cross_entropy", weight_decay=1e-2)
    solver = LiSSA(damping=1.0, batch_size=8, depth=40, sampling="partition")
    kw = {"progress": False, "check_minimum": False}
    calc = InfluenceCalculator(wrapper.model, objective, (x, y), solver, **kw)
    with pytest.warns(InflWarning):
        scores = calc.influence((x[:3], y[:3]))
    calc.save(tmp_path / "fit.pt")
    loaded = InfluenceCalculator.load(tmp_path / "fit.pt", wrapper.model, objective, (x, y), **kw)
    assert loaded.solver == solver
    with pytest.warns(InflWarning):
        again = loaded.influence((x[:3], y[:3]))
    assert torch.equal(again, scores)  # the same blocks, drawn again from the seed


def test_an_unconverged_cycled_run_names_the_control_variate_not_averaging() -> None:
    op, _, rhs, damping = _positive_definite_system()
    kw = {"damping": damping, "scale": 3.0, "depth": 10, "batch_size": 8, "rtol": 1e-12}
    with pytest.warns(InflWarning, match="snapshot_every='auto'") as cycled:
        LiSSA(**kw, sampling="partition").solve(op, rhs)
    assert not any("average=True" in str(w.message) for w in cycled)
    with pytest.warns(InflWarning, match="average=True"):
        LiSSA(**kw).solve(op, rhs)
