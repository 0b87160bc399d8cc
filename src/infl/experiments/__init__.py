"""Paper procedures built on the core: how influence fades with training time, and correcting
mis-predictions by fine-tuning on influential examples (Schioppa et al., 2023)."""

from infl.experiments.correction import (
    CorrectionConfig,
    CorrectionResult,
    CorrectionSummary,
    compare_rankings,
    correct_prediction,
)
from infl.experiments.fading import FadingResult, influence_fading, plot_fading

__all__ = [
    "CorrectionConfig",
    "CorrectionResult",
    "CorrectionSummary",
    "FadingResult",
    "compare_rankings",
    "correct_prediction",
    "influence_fading",
    "plot_fading",
]
