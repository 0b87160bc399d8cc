"""Attribution baselines beside the influence calculator.

Each returns ``[m, n]`` test-major scores with the sign of
:meth:`infl.InfluenceCalculator.influence`: **negative = helpful** (up-weighting training
example ``i`` lowers test measurement ``j``), positive = harmful; ``-scores / n`` is read as a
predicted removal effect. None of them needs a Hessian-vector product.

* :func:`grad_dot` — :math:`-\\nabla f(z_j)^T g_i` (influence with the identity as curvature);
* :func:`grad_cosine` — the same, normalised to a cosine in :math:`[-1, 1]`;
* :func:`tracin_cp` — TracIn-CP (Pruthi et al. 2020) over given checkpoints and learning rates;
* :func:`random_projection` — TRAK-style influence in a seeded random gradient sketch, with
  the empirical Fisher as curvature.

See docs/attribution.md for equations, cost and when to use which.
"""

from infl.attribution.grad_dot import grad_cosine, grad_dot
from infl.attribution.projection import projection_blocks, random_projection
from infl.attribution.tracin import tracin_cp

__all__ = ["grad_cosine", "grad_dot", "projection_blocks", "random_projection", "tracin_cp"]
