"""Between millimetres per day and the model's space (transformed, then standardised).

``x = (T(y) - mean) / std`` with ``T = log1p`` (or the identity), fitted on the training
split's valid cells. Everything that speaks of precipitation amounts (mass, intensities,
metrics) converts back to mm/day first: a mean taken in log space biases mass low.

A dry cell is exactly 0 mm/day on the way back: in float32, ``x * std + mean`` at the dry
value leaves a residue of a few units in the last place of ``mean`` (about 6e-8 mm/day), and
a dry generated cell that is not exactly 0 breaks every tie with a dry observation (the rank
histogram piles them into its first bin) and writes "rain" into every dry cell of a file.
"""

from __future__ import annotations

import math

import torch

from model.config import Normalization

__all__ = ["Normalizer"]

_DRY_ULPS = 8


class Normalizer:
    """The target transform and the training split's statistics, as used on any device."""

    def __init__(self, stats: Normalization, transform: str) -> None:
        if transform not in ("log1p", "none"):
            raise ValueError(f"transform: expected 'log1p' or 'none', got {transform!r}")
        self.stats = stats
        self.transform = transform
        # Transformed values this close to 0 are 0 at float32 precision: rounding x (to_model's
        # output or the model's dry value) and x * std each err by at most one unit in the last
        # place of |mean|; eight units leave room for either path.
        self._dry_tolerance = _DRY_ULPS * torch.finfo(torch.float32).eps * abs(stats.target_mean)

    def to_model(self, mm: torch.Tensor) -> torch.Tensor:
        """mm/day to model space."""
        t = torch.log1p(mm) if self.transform == "log1p" else mm
        return (t - self.stats.target_mean) / self.stats.target_std

    def to_mm(self, x: torch.Tensor) -> torch.Tensor:
        """Model space to mm/day: at or below the dry value exactly 0 (no negative rain)."""
        t = x * self.stats.target_std + self.stats.target_mean
        # The cap (about 22,000 mm/day) keeps an untrained decoder's outliers finite.
        mm = torch.expm1(t.clamp(max=10.0)) if self.transform == "log1p" else t
        return torch.where(t > self._dry_tolerance, mm, 0.0)

    def model_value(self, mm: float) -> float:
        """``to_model`` of one amount, as a Python float (a constant for the model and the loss)."""
        t = math.log1p(mm) if self.transform == "log1p" else mm
        return (t - self.stats.target_mean) / self.stats.target_std

    def expected_mm(self, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[mm/day] of a Gaussian model-space value ``N(mean, sigma^2)``, ignoring the clamp at
        zero: ``exp(t + s^2 / 2) - 1`` for log1p, with ``t`` and ``s`` the transformed mean and
        spread, which is ``to_mm`` at ``mean + sigma^2 * std / 2``."""
        if self.transform == "none":
            return self.to_mm(mean)
        return self.to_mm(mean + 0.5 * sigma.square() * self.stats.target_std)

    @property
    def zero(self) -> float:
        """Model-space value of 0 mm/day (a dry cell)."""
        return self.model_value(0.0)
