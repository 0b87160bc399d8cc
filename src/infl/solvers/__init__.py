"""Inverse-Hessian-vector-product solvers sharing one interface (see :mod:`infl.solvers.base`)."""

from infl.solvers.arnoldi import Arnoldi
from infl.solvers.base import FittedSolver, Solver, SolveResult
from infl.solvers.cg import ConjugateGradient
from infl.solvers.exact import ExactHessian
from infl.solvers.kfac import EKFAC, KFAC
from infl.solvers.lissa import LiSSA

__all__ = [
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "ConjugateGradient",
    "ExactHessian",
    "FittedSolver",
    "LiSSA",
    "SolveResult",
    "Solver",
]
