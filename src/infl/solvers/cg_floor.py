"""Where CG's recursive residual stops meaning anything: the round-off floor of its products.

CG never forms :math:`b - Ax_k`; it updates :math:`r_{k+1} = r_k - \\alpha_k A d_k`. Each product
:math:`A d_k` carries a rounding error of order :math:`\\varepsilon\\,\\|A d_k\\|`
(:math:`\\varepsilon` of the product dtype), so after :math:`k` steps the updated residual can
differ from the true one by about

.. math::

    \\tau_j = \\varepsilon \\sum_{i \\le k} \\|\\alpha_{ij} A d_{ij}\\|

(Greenbaum, SIAM J. Matrix Anal. Appl. 18, 1997: the gap is a sum of the local rounding errors
of the updates). Below :math:`\\tau_j` the updated residual keeps falling while the true one
stalls, and every further iteration is wasted: measured on the float32 digits MLP, block CG's
true residual stopped at 7.4e-7 from iteration 11 while the updated one went on to 1e-10 at
iteration 16. :class:`RoundoffFloor` measures the true residual of a system when its updated
residual first drops below :math:`\\tau_j` and stops the system once the two have parted.
"""

from __future__ import annotations

import torch

from infl.mixed_precision import product_dtype
from infl.operators import LinearOperator
from infl.solvers.block_cg import add_rows

FLOOR_GAP = 2.0
"""A system whose true residual exceeds this multiple of its updated one has stalled."""

FLOOR_RECHECK = 0.1
"""A system found still on track is measured again once its updated residual has fallen by
this factor (so checks cost at most one product per decade of progress)."""


class RoundoffFloor:
    """Watches the ``k`` systems of one CG solve for the round-off floor (see the module).

    Call :meth:`add` with every update's norms and :meth:`review` after every iteration.
    :meth:`review` measures :math:`\\|b_j - A x_j\\|` (one ``matmat`` of the systems that are
    due) for an active system whose updated residual is below both :math:`\\tau_j` and its
    next check level, and then stops it when the true residual meets the threshold (it has
    converged) or exceeds :data:`FLOOR_GAP` times the updated one (it has stalled). A stopped
    system's ``rr`` entry becomes its *true* squared residual. Systems stopped here are
    ``verified`` (their residual needs no final check); ``stalled`` marks those stopped
    above their threshold.
    """

    def __init__(self, operator: LinearOperator, b: torch.Tensor, threshold: torch.Tensor) -> None:
        self.operator = operator
        self.b = b
        self.threshold = threshold
        k = b.shape[0]
        self.eps = float(torch.finfo(product_dtype(operator)).eps)
        self.updates = torch.zeros(k, dtype=b.dtype, device=b.device)  # sum of ||alpha A d||
        self.next_check = torch.full((k,), float("inf"), dtype=b.dtype, device=b.device)
        self.verified = torch.zeros(k, dtype=torch.bool, device=b.device)
        self.stalled = torch.zeros(k, dtype=torch.bool, device=b.device)
        self.checks = 0

    def add(self, rows: torch.Tensor | slice, update_norms: torch.Tensor) -> None:
        """Record :math:`\\|\\alpha_j A d_j\\|` of this iteration's update of systems ``rows``
        (indices, or ``slice(None)`` for all of them)."""
        add_rows(self.updates, rows, update_norms)

    def true_norms(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """:math:`\\|b_j - A x_j\\|` for the systems ``rows`` (one ``matmat`` of them)."""
        return torch.linalg.vector_norm(self.b[rows] - self.operator.matmat(x[rows]), dim=1)

    def review(
        self,
        x: torch.Tensor,
        rr: torch.Tensor,
        active: torch.Tensor,
        norms: torch.Tensor | None = None,
    ) -> bool:
        """Measure the systems that are due and stop those that converged or stalled (in place
        on ``rr`` and ``active``); returns whether it stopped any. ``norms``: ``sqrt(rr)`` when
        the caller has it."""
        updated = torch.sqrt(rr) if norms is None else norms
        due = active & (updated <= torch.minimum(self.eps * self.updates, self.next_check))
        if not bool(due.any()):
            return False
        rows = due.nonzero().reshape(-1)
        true = self.true_norms(x, rows)
        self.checks += 1
        done = true <= self.threshold[rows]
        stalled = ~done & (true > FLOOR_GAP * updated[rows])
        stop = rows[done | stalled]
        rr[stop] = true[done | stalled].square()
        active[stop] = False
        self.verified[stop] = True
        self.stalled[rows[stalled]] = True
        going = rows[~(done | stalled)]
        self.next_check[going] = FLOOR_RECHECK * updated[going]
        return bool(stop.numel())
