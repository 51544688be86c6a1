"""Evaluation metrics for generated precipitation fields, in mm/day, computed on the data's device.

Every metric is a function of one :class:`EvalData` (K prior samples per held-out day, the
observed fields, their validity mask and optionally the latent statistics) that returns a
tensor on the same device. :func:`compute_metrics` evaluates any subset of the registry
:data:`METRICS` and moves all results to the host in one transfer; intermediate results
shared by several metrics (sorted pools, correlations, spectra) are computed once per
:class:`EvalData`. Formulas and the reason for each metric: README.md, "The metric formulas".

Pooled computations work on fixed-shape tensors (excluded values padded with ``+inf`` and a
count alongside) so that nothing waits on the device before the final transfer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = [
    "METRICS",
    "Direction",
    "EvalData",
    "Metric",
    "Pool",
    "collapse_probe",
    "compute_diagnostics",
    "compute_metrics",
    "get_metric",
    "ks_2samp",
    "make_pool",
    "pool_quantile",
    "power_spectrum",
    "small_scale_power_ratio",
    "standardize",
    "wasserstein1",
]

logger = logging.getLogger(__name__)

Direction = Literal["maximize", "minimize"]

_F64 = torch.float64
# Fields per FFT chunk: bounds the complex intermediate to about 2**24 values.
_FFT_BUDGET = 2**24


@dataclass(frozen=True, eq=False)
class EvalData:
    """Everything the metrics read, for N held-out days on one device; treated as immutable.

    Attributes:
        samples: [N, K, H, W] generated fields, mm/day (K >= 2 prior draws per day).
        obs: [N, H, W] observed fields, mm/day.
        mask: [N, H, W] bool, True on valid cells; invalid cells never affect a metric.
        recon_post: [N, H, W] decoder output from the posterior mean, mm/day.
        recon_prior: [N, H, W] decoder output from one prior draw, mm/day.
        mu_post: [N, D] posterior means q(z|obs).
        logvar_post: [N, D] posterior log-variances.
        prior_mu: [N, D] prior means; None means the standard normal prior.
        prior_logvar: [N, D] prior log-variances; None means the standard normal prior.
        wet_threshold: mm/day above which a cell counts as wet.
        active_unit_threshold: variance of a posterior mean above which a latent unit is active.
        seed: seeds the random tie-breaking of the rank histogram.
    """

    samples: Tensor
    obs: Tensor
    mask: Tensor
    recon_post: Tensor | None = None
    recon_prior: Tensor | None = None
    mu_post: Tensor | None = None
    logvar_post: Tensor | None = None
    prior_mu: Tensor | None = None
    prior_logvar: Tensor | None = None
    wet_threshold: float = 0.1
    active_unit_threshold: float = 0.01
    seed: int = 0
    _cache: dict[str, object] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.samples.dim() != 4:
            raise ValueError(
                f"EvalData.samples: expected [N, K, H, W], got shape {tuple(self.samples.shape)}"
            )
        n, k, h, w = self.samples.shape
        if k < 2:
            raise ValueError(f"EvalData.samples: expected K >= 2 samples per day, got K={k}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"EvalData.mask: expected a bool tensor, got {self.mask.dtype}")
        for name in ("obs", "mask", "recon_post", "recon_prior"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n, h, w):
                raise ValueError(f"EvalData.{name}: expected shape {(n, h, w)}, got {tuple(t.shape)}")
        latent = {"mu_post": self.mu_post, "logvar_post": self.logvar_post}
        latent |= {"prior_mu": self.prior_mu, "prior_logvar": self.prior_logvar}
        shapes = {tuple(t.shape) for t in latent.values() if t is not None}
        if len(shapes) > 1 or any(len(s) != 2 or s[0] != n for s in shapes):
            got = {k_: tuple(t.shape) for k_, t in latent.items() if t is not None}
            raise ValueError(f"EvalData latents: expected one shape [N={n}, D] for all, got {got}")
        for name in ("obs", "mask", "recon_post", "recon_prior", *latent):
            t = getattr(self, name)
            if t is not None and t.device != self.samples.device:
                raise ValueError(
                    f"EvalData.{name}: on {t.device}, expected {self.samples.device} like samples"
                )


@dataclass(frozen=True)
class Metric:
    """One registered metric.

    Attributes:
        name: Stable snake_case name, as search studies refer to it.
        fn: Computes the metric on the data's device; a 0-dim tensor, or, when ``finish``
            is set, the 1-D tensor of inputs ``finish`` turns into the value on the host.
        direction: The natural "better" direction; None where the target is a band or a
            ratio near 1 (or a signed error near 0).
        description: One line, with units.
        requires: ``EvalData`` fields that must not be None.
        finish: Host-side last step (the KS p-values, computed by SciPy from D and sizes).
    """

    name: str
    fn: Callable[[EvalData], Tensor]
    direction: Direction | None
    description: str
    requires: tuple[str, ...] = ()
    finish: Callable[[list[float]], float] | None = None

    def available(self, data: EvalData) -> bool:
        """Whether every input this metric needs is present in ``data``."""
        return all(getattr(data, name) is not None for name in self.requires)


_T = TypeVar("_T")


def _cached(fn: Callable[[EvalData], _T]) -> Callable[[EvalData], _T]:
    """Compute ``fn(data)`` once per EvalData: several metrics share each intermediate."""

    @functools.wraps(fn)
    def wrapper(data: EvalData) -> _T:
        if fn.__name__ not in data._cache:
            data._cache[fn.__name__] = fn(data)
        return data._cache[fn.__name__]  # type: ignore[return-value]

    return wrapper


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum(dtype=_F64)


@_cached
def _n_valid(d: EvalData) -> Tensor:
    return d.mask.sum(dtype=_F64)


@_cached
def _samples(d: EvalData) -> Tensor:
    return torch.where(d.mask[:, None], d.samples, 0.0)


@_cached
def _obs(d: EvalData) -> Tensor:
    return torch.where(d.mask, d.obs, 0.0)


# --- ensemble spread and skill -------------------------------------------------------------


@_cached
def _ensemble_var(d: EvalData) -> Tensor:
    return _samples(d).var(dim=1, correction=1)


def _diversity(d: EvalData) -> Tensor:
    return _masked_sum(_ensemble_var(d).sqrt(), d.mask) / _n_valid(d)


@_cached
def _obs_mean(d: EvalData) -> Tensor:
    return _masked_sum(d.obs, d.mask) / _n_valid(d)


def _spread_norm(d: EvalData) -> Tensor:
    dev = (_obs(d).to(_F64) - _obs_mean(d)).square()
    obs_std = (_masked_sum(dev, d.mask) / (_n_valid(d) - 1)).sqrt()
    return _diversity(d) / obs_std


def _mass_bias(d: EvalData) -> Tensor:
    gen_mean = _samples(d).sum(dtype=_F64) / (_n_valid(d) * d.samples.shape[1])
    return (gen_mean - _obs_mean(d)) / _obs_mean(d)


def _crps(d: EvalData) -> Tensor:
    x, y = _samples(d), _obs(d)
    k = x.shape[1]
    mae = (x - y[:, None]).abs().mean(dim=1)
    # sum_{k,l} |x_k - x_l| = 2 sum_i (2i - K - 1) x_(i): O(K log K) instead of O(K^2).
    weights = 2 * torch.arange(1, k + 1, device=x.device, dtype=x.dtype) - k - 1
    pair_sum = 2 * torch.einsum("nkhw,k->nhw", x.sort(dim=1).values, weights)
    return _masked_sum(mae - pair_sum / (2 * k * (k - 1)), d.mask) / _n_valid(d)


def _spread_skill(d: EvalData) -> Tensor:
    k = d.samples.shape[1]
    spread = (_masked_sum(_ensemble_var(d), d.mask) / _n_valid(d)).sqrt()
    err = (_samples(d).mean(dim=1) - _obs(d)).square()
    rmse = (_masked_sum(err, d.mask) / _n_valid(d)).sqrt()
    return spread / rmse * math.sqrt((k + 1) / k)


@_cached
def _rank_histogram(d: EvalData) -> Tensor:
    x, y = _samples(d), _obs(d)[:, None]
    k = x.shape[1]
    below = (x < y).sum(dim=1)
    ties = (x == y).sum(dim=1)
    gen = torch.Generator(device=y.device).manual_seed(d.seed)
    u = torch.rand(below.shape, generator=gen, device=y.device, dtype=_F64)
    # A tied observation is equally likely to sit at any of the ties + 1 positions.
    rank = below + torch.minimum((u * (ties + 1)).floor().long(), ties)
    counts = torch.zeros(k + 1, dtype=torch.long, device=y.device)
    counts.scatter_add_(0, rank.flatten(), d.mask.flatten().long())
    return counts.to(_F64) / _n_valid(d)


def _rank_hist_deviation(d: EvalData) -> Tensor:
    freq = _rank_histogram(d)
    return (freq - 1.0 / freq.numel()).abs().sum()


# --- correlations ---------------------------------------------------------------------------


def standardize(x: Tensor, mask: Tensor) -> Tensor:
    """Centre each field on its valid cells and scale it to unit norm; constant fields become 0.

    Args:
        x: [..., P] fields with their cells flattened.
        mask: [..., P] validity, broadcastable to ``x``.
    """
    n = mask.sum(dim=-1, keepdim=True).clamp_min(1)
    mean = torch.where(mask, x, 0.0).sum(dim=-1, keepdim=True) / n
    xc = torch.where(mask, x - mean, 0.0)
    norm = xc.square().sum(dim=-1, keepdim=True).sqrt()
    # Constancy is tested exactly (max == min): rounding in the mean leaves a constant field
    # a tiny residual whose "correlation" would be noise.
    hi = torch.where(mask, x, -math.inf).amax(dim=-1, keepdim=True)
    lo = torch.where(mask, x, math.inf).amin(dim=-1, keepdim=True)
    return torch.where(hi > lo, xc / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


@_cached
def _standardized(d: EvalData) -> tuple[Tensor, Tensor]:
    n, k = d.samples.shape[:2]
    m = d.mask.reshape(n, 1, -1)
    z_gen = standardize(d.samples.reshape(n, k, -1), m)
    z_obs = standardize(d.obs.reshape(n, -1), m[:, 0])
    return z_gen, z_obs


@_cached
def _valid_days(d: EvalData) -> Tensor:
    """[N] True for days with at least one valid cell; a fully masked day enters no mean over days."""
    return d.mask.flatten(1).any(dim=1)


def _mean_over_valid_days(per_day: Tensor, days: Tensor) -> Tensor:
    """Mean of ``per_day`` [N, ...] over the ``days`` [N] that hold a valid cell (NaN if none)."""
    days = days.reshape(-1, *([1] * (per_day.dim() - 1))).expand_as(per_day)
    return _masked_sum(per_day, days) / days.sum(dtype=_F64)


@_cached
def _corr_sample_truth(d: EvalData) -> Tensor:
    z_gen, z_obs = _standardized(d)
    corr = torch.einsum("nkp,np->nk", z_gen, z_obs).clamp(-1, 1)
    return _mean_over_valid_days(corr, _valid_days(d))


@_cached
def _corr_sample_sample(d: EvalData) -> Tensor:
    z_gen, _ = _standardized(d)
    k = z_gen.shape[1]
    gram = torch.bmm(z_gen, z_gen.transpose(1, 2))
    i, j = torch.triu_indices(k, k, offset=1, device=z_gen.device)
    return _mean_over_valid_days(gram[:, i, j].clamp(-1, 1), _valid_days(d))


def _corr_gap(d: EvalData) -> Tensor:
    return _corr_sample_sample(d) - _corr_sample_truth(d)


# --- pooled distributions -------------------------------------------------------------------


class Pool(NamedTuple):
    """Values sorted ascending, the ``n`` included ones first and ``+inf`` after them."""

    values: Tensor
    n: Tensor


def make_pool(x: Tensor, include: Tensor) -> Pool:
    """The values of ``x`` where ``include`` holds, as a :class:`Pool` (fixed shape, no sync).

    Args:
        x: Values of any shape.
        include: Bool, the shape of ``x``.
    """
    padded = torch.where(include, x, math.inf).flatten()
    return Pool(padded.sort().values, include.sum())


def _cdf(pool: Pool, at: Tensor) -> Tensor:
    """Empirical CDF of ``pool`` at ``at`` (right-continuous, as SciPy's searchsorted 'right')."""
    counts = torch.minimum(torch.searchsorted(pool.values, at, right=True), pool.n)
    return counts.to(_F64) / pool.n.clamp_min(1).to(_F64)


def ks_2samp(a: Pool, b: Pool) -> Tensor:
    """Two-sided two-sample KS statistic of two pools, with the sizes its p-value needs.

    Returns:
        [D, n_a, n_b] in float64; D is ``scipy.stats.ks_2samp``'s statistic, 1 if a pool is empty.
    """
    at = torch.cat([a.values, b.values])
    included = torch.cat(
        [
            torch.arange(a.values.numel(), device=at.device) < a.n,
            torch.arange(b.values.numel(), device=at.device) < b.n,
        ]
    )
    diff = torch.where(included, (_cdf(a, at) - _cdf(b, at)).abs(), 0.0).amax()
    d = torch.where(torch.minimum(a.n, b.n) == 0, 1.0, diff)
    return torch.stack([d, a.n.to(_F64), b.n.to(_F64)])


def _ks_asymp_pvalue(values: list[float]) -> float:
    """Two-sided asymptotic p-value exactly as ``scipy.stats.ks_2samp(method="asymp")``."""
    import numpy as np
    from scipy.stats import kstwo

    d, n1, n2 = values
    if min(n1, n2) == 0:
        return 0.0
    m, n = sorted([n1, n2], reverse=True)
    return float(np.clip(kstwo.sf(d, np.round(m * n / (m + n))), 0, 1))


def wasserstein1(a: Pool, b: Pool) -> Tensor:
    """Integral of |F_a - F_b| over the merged support, as ``scipy.stats.wasserstein_distance``.

    An empty pool counts as all mass at 0 mm/day (no wet intensities), so a model that never
    rains scores the observed mean intensity rather than an undefined value.
    """
    merged = torch.cat([a.values, b.values]).sort().values
    n = a.n + b.n
    steps = torch.arange(merged.numel() - 1, device=merged.device) < n - 1
    deltas = merged.to(_F64).diff()
    left = merged[:-1]
    w = torch.where(steps, (_cdf(a, left) - _cdf(b, left)).abs() * deltas, 0.0).sum()
    w = torch.where(a.n == 0, _pool_mean(b), w)
    return torch.where(b.n == 0, _pool_mean(a), w)


def _pool_mean(pool: Pool) -> Tensor:
    included = torch.arange(pool.values.numel(), device=pool.values.device) < pool.n
    return torch.where(included, pool.values, 0.0).sum(dtype=_F64) / pool.n.clamp_min(1)


def pool_quantile(pool: Pool, q: float) -> Tensor:
    """Linear-interpolation quantile (as ``torch.quantile``) of a pool, float64; 0 mm/day if empty."""
    pos = q * (pool.n.to(_F64) - 1).clamp_min(0)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (pool.n - 1).clamp_min(0))
    # index_select, not values[lo]: indexing with a 0-dim tensor waits for the device.
    lo_v, hi_v = pool.values.index_select(0, torch.stack([lo, hi])).to(_F64)
    v = torch.lerp(lo_v, hi_v, pos - lo.to(_F64))
    return torch.where(pool.n > 0, v, 0.0)


@_cached
def _wet_pools(d: EvalData) -> tuple[Pool, Pool]:
    gen = make_pool(d.samples, d.mask[:, None] & (d.samples > d.wet_threshold))
    obs = make_pool(d.obs, d.mask & (d.obs > d.wet_threshold))
    return gen, obs


@_cached
def _ks_wet(d: EvalData) -> Tensor:
    return ks_2samp(*_wet_pools(d))


def _quantile_error(q: float) -> Callable[[EvalData], Tensor]:
    def fn(d: EvalData) -> Tensor:
        gen, obs = _wet_pools(d)
        return pool_quantile(gen, q) - pool_quantile(obs, q)

    return fn


def _wasserstein_wet(d: EvalData) -> Tensor:
    return wasserstein1(*_wet_pools(d))


def _wet_fraction_gen(d: EvalData) -> Tensor:
    return _wet_pools(d)[0].n.to(_F64) / (_n_valid(d) * d.samples.shape[1])


def _wet_fraction_obs(d: EvalData) -> Tensor:
    return _wet_pools(d)[1].n.to(_F64) / _n_valid(d)


def _wet_fraction_error(d: EvalData) -> Tensor:
    return _wet_fraction_gen(d) - _wet_fraction_obs(d)


@_cached
def _ks_daily_mean(d: EvalData) -> Tensor:
    cells = d.mask.sum(dim=(1, 2))
    gen_means = _samples(d).sum(dim=(2, 3), dtype=_F64) / cells.clamp_min(1)[:, None]
    obs_means = _obs(d).sum(dim=(1, 2), dtype=_F64) / cells.clamp_min(1)
    days = cells > 0
    return ks_2samp(make_pool(gen_means, days[:, None].expand_as(gen_means)), make_pool(obs_means, days))


# --- power spectra --------------------------------------------------------------------------


def _power_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum over leading dims of |FFT|^2 / (H W) of each field, mean-removed and masked to 0."""
    h, w = x.shape[-2:]
    n = mask.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    mean = torch.where(mask, x, 0.0).sum(dim=(-2, -1), keepdim=True) / n
    xc = torch.where(mask, x - mean, 0.0)
    power = torch.fft.fft2(xc).abs().square() / (h * w)
    return power.reshape(-1, h, w).sum(dim=0, dtype=_F64)


def power_spectrum(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Radially averaged power spectrum of masked fields, mean over fields of days with a valid cell.

    Each field has its valid-cell mean removed and its invalid cells set to 0 before the FFT.

    Args:
        x: [N, K, H, W] fields, K per day.
        mask: [N, H, W] valid cells, shared by a day's K fields.

    Returns:
        (wavenumbers, power): bins 0..min(H, W) // 2 in cycles per the smaller side, and the
        power in each, float64, (units of x)^2.
    """
    n, k, h, w = x.shape
    days_per_chunk = max(1, _FFT_BUDGET // (k * h * w))
    power = torch.zeros(h, w, dtype=_F64, device=x.device)
    for start in range(0, n, days_per_chunk):
        sl = slice(start, start + days_per_chunk)
        power += _power_sum(x[sl], mask[sl, None])
    # Fully masked days add no power; they must not dilute the average either.
    power /= mask.flatten(1).any(dim=1).sum(dtype=_F64).clamp_min(1) * k

    side = min(h, w)
    k_max = side // 2
    fy = torch.fft.fftfreq(h, device=x.device, dtype=_F64)
    fx = torch.fft.fftfreq(w, device=x.device, dtype=_F64)
    radius = torch.sqrt(fy[:, None].square() + fx[None, :].square()) * side
    # Bin i holds radii in [i - 1/2, i + 1/2); radii past the smaller axis' Nyquist are dropped.
    wavenumbers = torch.arange(k_max + 1, device=x.device, dtype=_F64)
    onehot = ((radius + 0.5).floor().flatten()[:, None] == wavenumbers).to(_F64)
    return wavenumbers, power.flatten() @ onehot / onehot.sum(dim=0)


def small_scale_power_ratio(gen: Tensor, obs: Tensor) -> Tensor:
    """Power of ``gen`` / of ``obs`` summed over the upper half of wavenumbers (bins > k_max // 2).

    Args:
        gen: [k_max + 1] radially averaged power, as :func:`power_spectrum` gives.
        obs: [k_max + 1] the same for the observed fields.
    """
    k_max = gen.numel() - 1
    return gen[k_max // 2 + 1 :].sum() / obs[k_max // 2 + 1 :].sum()


@_cached
def _spectra(d: EvalData) -> tuple[Tensor, Tensor, Tensor]:
    """Radially averaged power spectra: (wavenumbers, P_gen, P_obs), bins 0..min(H, W) // 2."""
    wavenumbers, gen = power_spectrum(d.samples, d.mask)
    _, obs = power_spectrum(d.obs[:, None], d.mask)
    return wavenumbers, gen, obs


def _spectrum_log_error(d: EvalData) -> Tensor:
    _, gen, obs = _spectra(d)
    gen, obs = gen[1:], obs[1:]
    # A scale with no power in either spectrum carries no error; one with power in only one of
    # them is infinitely wrong in decades (an all-dry split against rain, say), not the ~300
    # decades that clamping at the float64 minimum used to give.
    either = (gen > 0) | (obs > 0)
    err = torch.where(either, (gen.log10() - obs.log10()).abs(), 0.0)
    return err.sum() / either.sum().clamp_min(1)


def _small_scale_power_ratio(d: EvalData) -> Tensor:
    _, gen, obs = _spectra(d)
    return small_scale_power_ratio(gen, obs)


# --- latent usage ---------------------------------------------------------------------------


@_cached
def _kl_per_dim(d: EvalData) -> Tensor:
    """Raw KL(q(z|obs) || p(z)) per latent dimension, averaged over days (nats)."""
    mu, logvar = d.mu_post.to(_F64), d.logvar_post.to(_F64)  # type: ignore[union-attr]
    p_mu = torch.zeros_like(mu) if d.prior_mu is None else d.prior_mu.to(_F64)
    p_lv = torch.zeros_like(mu) if d.prior_logvar is None else d.prior_logvar.to(_F64)
    kl = 0.5 * (p_lv - logvar + (logvar.exp() + (mu - p_mu).square()) / p_lv.exp() - 1)
    return kl.mean(dim=0)


def _kl_raw(d: EvalData) -> Tensor:
    return _kl_per_dim(d).sum()


def _kl_raw_min_dim(d: EvalData) -> Tensor:
    return _kl_per_dim(d).min()


def _kl_raw_median_dim(d: EvalData) -> Tensor:
    return _kl_per_dim(d).quantile(0.5)


def _active_units(d: EvalData) -> Tensor:
    var = d.mu_post.to(_F64).var(dim=0, correction=1)  # type: ignore[union-attr]
    return (var > d.active_unit_threshold).sum().to(_F64)


def _z_usage(d: EvalData) -> Tensor:
    obs = d.obs
    mae_post = _masked_sum((d.recon_post - obs).abs(), d.mask)  # type: ignore[operator]
    mae_prior = _masked_sum((d.recon_prior - obs).abs(), d.mask)  # type: ignore[operator]
    # Both MAEs share the valid-cell count, so it cancels from the ratio.
    return torch.where(mae_prior > 0, 1 - mae_post / mae_prior, 0.0)


# --- registry -------------------------------------------------------------------------------

_LATENT = ("mu_post", "logvar_post")
_RECON = ("recon_post", "recon_prior")

_REGISTRY = [
    Metric(
        "diversity", _diversity, "maximize", "mean over valid cells and days of the across-sample std, mm/day"
    ),
    Metric(
        "spatial_correlation",
        _corr_sample_truth,
        None,
        "mean Pearson correlation over valid cells between a sample and its observed day (seed's name)",
    ),
    Metric(
        "mass_bias", _mass_bias, None, "(mean generated - mean observed) / mean observed, over valid cells"
    ),
    Metric(
        "ks_stat", lambda d: _ks_wet(d)[0], "minimize", "KS statistic D between pooled wet-cell intensities"
    ),
    Metric(
        "ks_pvalue",
        _ks_wet,
        "maximize",
        "asymptotic KS p-value of pooled wet-cell intensities (~0 for any model at millions of cells)",
        finish=_ks_asymp_pvalue,
    ),
    Metric(
        "spread_norm", _spread_norm, None, "diversity / std of the observed field over days and valid cells"
    ),
    Metric(
        "corr_sample_sample",
        _corr_sample_sample,
        None,
        "mean Pearson correlation between two samples of a day",
    ),
    Metric(
        "corr_sample_truth",
        _corr_sample_truth,
        None,
        "mean Pearson correlation between a sample and its observed day (= spatial_correlation)",
    ),
    Metric(
        "corr_gap", _corr_gap, None, "corr_sample_sample - corr_sample_truth (0 for a calibrated ensemble)"
    ),
    Metric("crps", _crps, "minimize", "fair ensemble CRPS over valid cells and days, mm/day"),
    Metric(
        "spread_skill",
        _spread_skill,
        None,
        "sqrt(mean ensemble variance) / RMSE of ensemble mean, K-corrected",
    ),
    Metric(
        "rank_hist_deviation",
        _rank_hist_deviation,
        "minimize",
        "sum over the K+1 bins of |f_i - 1/(K+1)| (0: flat)",
    ),
    Metric(
        "spectrum_log_error",
        _spectrum_log_error,
        "minimize",
        "mean over wavenumbers k > 0 of |log10 P_gen(k) - log10 P_obs(k)|, decades",
    ),
    Metric(
        "small_scale_power_ratio",
        _small_scale_power_ratio,
        None,
        "power of samples / of obs over the upper half of wavenumbers (<< 1: blur)",
    ),
    Metric("q95_error", _quantile_error(0.95), None, "P95 of wet intensities, generated - observed, mm/day"),
    Metric("q99_error", _quantile_error(0.99), None, "P99 of wet intensities, generated - observed, mm/day"),
    Metric(
        "q999_error", _quantile_error(0.999), None, "P99.9 of wet intensities, generated - observed, mm/day"
    ),
    Metric(
        "wasserstein1",
        _wasserstein_wet,
        "minimize",
        "1-Wasserstein distance of pooled wet intensities, mm/day",
    ),
    Metric(
        "ks_daily_mean_stat",
        lambda d: _ks_daily_mean(d)[0],
        "minimize",
        "KS statistic D between per-day domain means, generated (N*K) vs observed (N)",
    ),
    Metric(
        "ks_daily_mean_pvalue",
        _ks_daily_mean,
        "maximize",
        "asymptotic KS p-value between per-day domain means, generated vs observed",
        finish=_ks_asymp_pvalue,
    ),
    Metric(
        "wet_fraction_gen", _wet_fraction_gen, None, "fraction of valid sample cells above the wet threshold"
    ),
    Metric(
        "wet_fraction_obs",
        _wet_fraction_obs,
        None,
        "fraction of valid observed cells above the wet threshold",
    ),
    Metric("wet_fraction_error", _wet_fraction_error, None, "wet_fraction_gen - wet_fraction_obs"),
    Metric(
        "active_units",
        _active_units,
        "maximize",
        "latent units whose posterior mean varies over days by more than the threshold (count)",
        requires=("mu_post",),
    ),
    Metric(
        "kl_raw", _kl_raw, None, "unclamped KL(q||p) summed over dimensions, mean over days, nats", _LATENT
    ),
    Metric(
        "kl_raw_min_dim",
        _kl_raw_min_dim,
        None,
        "smallest per-dimension raw KL (mean over days), nats",
        _LATENT,
    ),
    Metric(
        "kl_raw_median_dim",
        _kl_raw_median_dim,
        None,
        "median per-dimension raw KL (mean over days), nats",
        _LATENT,
    ),
    Metric(
        "z_usage",
        _z_usage,
        "maximize",
        "1 - MAE(recon_post, obs) / MAE(recon_prior, obs) (0: decoder ignores z)",
        _RECON,
    ),
]

METRICS: dict[str, Metric] = {m.name: m for m in _REGISTRY}
"""Every metric by name; search studies name their objectives and constraints from here."""


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``.

    Raises:
        KeyError: ``name`` is not registered; the message lists the known names.
    """
    try:
        return METRICS[name]
    except KeyError as e:
        raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from e


def compute_metrics(data: EvalData, names: Sequence[str] | None = None) -> dict[str, float]:
    """Compute metrics on the data's device and move them to the host in one transfer.

    Args:
        data: The evaluation inputs.
        names: Metrics to compute; None computes every metric whose inputs ``data`` has.

    Returns:
        Name to value. A ratio whose denominator is 0 (e.g. ``mass_bias`` on an all-dry
        split) is inf or nan, as the division gives.

    Raises:
        KeyError: A name is not registered.
        ValueError: A requested metric needs an input that ``data`` lacks.
    """
    if names is None:
        metrics = [m for m in METRICS.values() if m.available(data)]
        skipped = [m.name for m in METRICS.values() if not m.available(data)]
        if skipped:
            logger.debug("metrics skipped for missing inputs: %s", ", ".join(skipped))
    else:
        metrics = [get_metric(name) for name in names]
        for m in metrics:
            if not m.available(data):
                missing = [f for f in m.requires if getattr(data, f) is None]
                raise ValueError(
                    f"metric {m.name!r} needs EvalData.{', EvalData.'.join(missing)}, which is None"
                )
    if not metrics:
        return {}
    parts = [m.fn(data).to(_F64).reshape(-1) for m in metrics]
    flat = torch.cat(parts).tolist()
    out: dict[str, float] = {}
    offset = 0
    for m, part in zip(metrics, parts, strict=True):
        values = flat[offset : offset + part.numel()]
        offset += part.numel()
        out[m.name] = m.finish(values) if m.finish is not None else values[0]
    return out


def compute_diagnostics(data: EvalData) -> dict[str, list[float]]:
    """Non-scalar diagnostics, moved to the host in one transfer.

    Returns:
        ``rank_histogram`` (K+1 frequencies of the observation's rank among the samples),
        ``spectrum_wavenumber`` (in cycles per the smaller side of the grid),
        ``spectrum_gen`` and ``spectrum_obs`` (radially averaged power, (mm/day)^2) and,
        when the posterior is present, ``kl_per_dim`` (raw KL per latent dimension, nats).
    """
    wavenumbers, gen, obs = _spectra(data)
    arrays = {
        "rank_histogram": _rank_histogram(data),
        "spectrum_wavenumber": wavenumbers,
        "spectrum_gen": gen,
        "spectrum_obs": obs,
    }
    if all(getattr(data, f) is not None for f in _LATENT):
        arrays["kl_per_dim"] = _kl_per_dim(data)
    flat = torch.cat([a.to(_F64).reshape(-1) for a in arrays.values()]).tolist()
    out: dict[str, list[float]] = {}
    offset = 0
    for name, a in arrays.items():
        out[name] = flat[offset : offset + a.numel()]
        offset += a.numel()
    return out


def collapse_probe(
    samples: Tensor, obs: Tensor, mask: Tensor, recon_post: Tensor, recon_prior: Tensor
) -> dict[str, float]:
    """``spread_norm`` and ``z_usage`` only: cheap collapse signals after a warm-up epoch.

    Args:
        samples: [N, K, H, W] prior samples of a few days, mm/day.
        obs: [N, H, W] observed fields, mm/day.
        mask: [N, H, W] valid cells.
        recon_post: [N, H, W] decoder output from the posterior mean, mm/day.
        recon_prior: [N, H, W] decoder output from a prior draw, mm/day.
    """
    data = EvalData(samples=samples, obs=obs, mask=mask, recon_post=recon_post, recon_prior=recon_prior)
    return compute_metrics(data, ["spread_norm", "z_usage"])
