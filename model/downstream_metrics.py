"""Scores of SRDRN's deterministic fields against the held-out observations, and the verdict on
augmentation: SRDRN trained without and with cVAE-generated pairs, compared seed by seed.

:func:`score_fields` computes every score of one prediction on the tensors' device and moves
them to the host in one transfer; :func:`gain` signs a difference so that positive is better and
:func:`verdict` decides whether the per-seed gains are distinguishable from seed noise.
Formulas: README.md, "The downstream scores".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from model.metrics import (
    ks_2samp,
    make_pool,
    pool_quantile,
    power_spectrum,
    small_scale_power_ratio,
    standardize,
    wasserstein1,
)

__all__ = [
    "SCORES",
    "Score",
    "Verdict",
    "format_table",
    "gain",
    "heavy_thresholds",
    "score_definitions",
    "score_fields",
    "threshold_labels",
    "verdict",
]

_F64 = torch.float64
Better = Literal["higher", "lower", "zero", "one"]


@dataclass(frozen=True)
class Score:
    """One downstream score.

    Attributes:
        name: Stable snake_case name, e.g. ``rmse``, ``csi_p99``, ``sedi_20mm``.
        better: ``higher`` or ``lower`` is better; ``zero``: closer to 0 (signed errors);
            ``one``: closer to 1 (ratios).
        description: One line, with units.
    """

    name: str
    better: Better
    description: str


_HEAD = [
    Score("rmse", "lower", "root mean squared error over valid cells, mm/day"),
    Score("mae", "lower", "mean absolute error over valid cells, mm/day"),
    Score("bias", "zero", "mean predicted - mean observed over valid cells, mm/day"),
    Score(
        "spatial_corr",
        "higher",
        "mean over days of the Pearson correlation of predicted and observed valid cells",
    ),
]
_TAIL = [
    Score("q99_error", "zero", "P99 of pooled wet intensities, predicted - observed, mm/day"),
    Score("q999_error", "zero", "P99.9 of pooled wet intensities, predicted - observed, mm/day"),
    Score("ks_wet", "lower", "two-sample KS statistic D of pooled wet intensities"),
    Score("wasserstein_wet", "lower", "1-Wasserstein distance of pooled wet intensities, mm/day"),
    Score(
        "small_scale_power_ratio",
        "one",
        "power of predicted / of observed over the upper half of wavenumbers (< 1: blur)",
    ),
]

SCORES: dict[str, Score] = {s.name: s for s in _HEAD + _TAIL}
"""The scores whose names do not depend on the thresholds."""


def _threshold_scores(label: str) -> list[Score]:
    event = f"cells above {label}"
    return [
        Score(f"pod_{label}", "higher", f"probability of detection of {event}: hits / observed events"),
        Score(f"far_{label}", "lower", f"false alarm ratio of {event}: false alarms / predicted events"),
        Score(f"csi_{label}", "higher", f"critical success index of {event}: hits / (hits + misses + FA)"),
        Score(f"sedi_{label}", "higher", f"symmetric extremal dependence index of {event}, in [-1, 1]"),
    ]


def score_definitions(threshold_labels: Sequence[str]) -> dict[str, Score]:
    """Every score :func:`score_fields` returns for these threshold labels, in its order."""
    scores = list(_HEAD)
    for label in threshold_labels:
        scores += _threshold_scores(label)
    return {s.name: s for s in scores + _TAIL}


def _quantile_label(q: float) -> str:
    # :g keeps 6 significant digits, so 0.07 * 100 = 7.000000000000001 reads "p7".
    return "p" + f"{q * 100:g}".replace(".", "")


def _fixed_label(mm: float) -> str:
    return f"{mm:g}mm".replace(".", "p")


def threshold_labels(quantiles: Sequence[float], fixed_mm: Sequence[float]) -> list[str]:
    """The labels :func:`heavy_thresholds` gives its thresholds, quantile ones first."""
    return [_quantile_label(q) for q in quantiles] + [_fixed_label(v) for v in fixed_mm]


def heavy_thresholds(
    obs_mm: Tensor, mask: Tensor, quantiles: Sequence[float], fixed_mm: Sequence[float], wet_threshold: float
) -> dict[str, float]:
    """Heavy-rain thresholds: quantiles of the training split's wet-cell intensities, then fixed ones.

    Args:
        obs_mm: [N, H, W] the training split's observed fields, mm/day.
        mask: [N, H, W] bool, valid cells.
        quantiles: In (0, 1); labelled ``p`` + 100 q without its dot (0.95 -> ``p95``, 0.999 -> ``p999``).
        fixed_mm: Fixed thresholds, mm/day; labelled ``20mm``, ``2p5mm``.
        wet_threshold: mm/day above which a cell is wet (enters the quantiles).

    Returns:
        Label to threshold in mm/day, quantile ones first.

    Raises:
        ValueError: A quantile outside (0, 1), a fixed threshold that is not a positive finite
            number, two thresholds with one label, or quantiles of a split without wet cells.
    """
    if mask.shape != obs_mm.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"heavy_thresholds mask: expected a bool tensor of shape {tuple(obs_mm.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    for q in quantiles:
        if not 0.0 < q < 1.0:
            raise ValueError(f"downstream.threshold_quantiles: expected values in (0, 1), got {q}")
    for v in fixed_mm:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"downstream.thresholds_mm: expected positive mm/day, got {v}")
    labels = threshold_labels(quantiles, fixed_mm)
    if len(set(labels)) != len(labels):
        raise ValueError(f"downstream thresholds: expected distinct labels, got {labels}")
    out: dict[str, float] = {}
    if quantiles:
        pool = make_pool(obs_mm.to(_F64), mask & (obs_mm > wet_threshold))
        values = torch.stack([pool_quantile(pool, q) for q in quantiles] + [pool.n.to(_F64)]).tolist()
        if values[-1] == 0:
            raise ValueError(
                f"downstream.threshold_quantiles: the training split has no valid cell above the "
                f"wet threshold {wet_threshold} mm/day to take quantiles of"
            )
        out |= dict(zip(labels[: len(quantiles)], values[:-1], strict=True))
    out |= {_fixed_label(v): float(v) for v in fixed_mm}
    return out


def _check_fields(pred_mm: Tensor, obs_mm: Tensor, mask: Tensor) -> None:
    if obs_mm.dim() != 3:
        raise ValueError(f"score_fields obs_mm: expected [N, H, W], got shape {tuple(obs_mm.shape)}")
    for name, t in (("pred_mm", pred_mm), ("mask", mask)):
        if t.shape != obs_mm.shape:
            raise ValueError(
                f"score_fields {name}: expected shape {tuple(obs_mm.shape)} like obs_mm, got {tuple(t.shape)}"
            )
        if t.device != obs_mm.device:
            raise ValueError(f"score_fields {name}: on {t.device}, expected {obs_mm.device} like obs_mm")
    if mask.dtype != torch.bool:
        raise ValueError(f"score_fields mask: expected a bool tensor, got {mask.dtype}")


def _spatial_corr(pred: Tensor, obs: Tensor, mask: Tensor) -> Tensor:
    n = pred.shape[0]
    m = mask.reshape(n, -1)
    z_pred, z_obs = standardize(pred.reshape(n, -1), m), standardize(obs.reshape(n, -1), m)
    # standardize zeroes a constant field (and a day with fewer than 2 valid cells); others have
    # unit norm, so a norm above 1/2 marks a day whose correlation is defined.
    defined = (z_pred.square().sum(dim=1) > 0.5) & (z_obs.square().sum(dim=1) > 0.5)
    corr = (z_pred * z_obs).sum(dim=1).clamp(-1, 1)
    return torch.where(defined, corr, 0.0).sum() / defined.sum().clamp_min(1)


def _contingency(pred: Tensor, obs: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """[hits, misses, false alarms, correct negatives] over valid cells; an event is > threshold."""
    p, o = pred > threshold, obs > threshold
    cells = [p & o, ~p & o, p & ~o, ~p & ~o]
    return torch.stack([(c & mask).sum() for c in cells]).to(_F64)


def _categorical(hits: float, misses: float, false_alarms: float, negatives: float) -> list[float]:
    """POD, FAR, CSI and SEDI from a contingency table, each finite (conventions: see score_fields)."""
    events, non_events = hits + misses, false_alarms + negatives
    pod = hits / events if events > 0 else 0.0
    far = false_alarms / (hits + false_alarms) if hits + false_alarms > 0 else 1.0
    csi = hits / (events + false_alarms) if events + false_alarms > 0 else 0.0
    if hits == 0 or non_events == 0:
        return [pod, far, csi, 0.0]
    h = min(max(pod, 0.5 / events), 1 - 0.5 / events)
    f = min(max(false_alarms / non_events, 0.5 / non_events), 1 - 0.5 / non_events)
    logs = [math.log(f), math.log(h), math.log(1 - f), math.log(1 - h)]
    sedi = (logs[0] - logs[1] - logs[2] + logs[3]) / sum(logs)
    return [pod, far, csi, sedi]


def score_fields(
    pred_mm: Tensor, obs_mm: Tensor, mask: Tensor, thresholds: dict[str, float], *, wet_threshold: float
) -> dict[str, float]:
    """Every downstream score of one prediction, in the order of :func:`score_definitions`.

    Computed on the tensors' device in float64; invalid cells never enter. Definitions:

    - ``rmse``, ``mae``, ``bias``: over all valid cells of all days.
    - ``spatial_corr``: mean, over the days whose valid cells vary in both fields (so at least
      2 of them), of the per-day Pearson correlation; 0 when no day qualifies.
    - per threshold ``t``, an event is a valid cell above ``t`` mm/day; from the hits, misses,
      false alarms (FA) and correct negatives (CN): ``pod_t`` = hits / (hits + misses),
      ``far_t`` = FA / (hits + FA), ``csi_t`` = hits / (hits + misses + FA), ``sedi_t`` =
      (ln F - ln H - ln(1-F) + ln(1-H)) / (ln F + ln H + ln(1-F) + ln(1-H)) (Ferro & Stephenson
      2011) with H = POD and F = FA / (FA + CN), each clamped to [1/(2n), 1 - 1/(2n)], n the
      number of observed events resp. non-events. Degenerate tables score as no skill, never
      NaN: POD and CSI are 0 and FAR is 1 where their denominators are 0 (nothing to detect,
      nothing predicted); SEDI is 0 when there is no hit (no events, or all missed) or no
      observed non-event.
    - ``q99_error``, ``q999_error``: linear-interpolation quantiles of the pooled valid wet
      (> ``wet_threshold``) intensities, predicted minus observed; an empty pool's quantile is 0.
    - ``ks_wet``, ``wasserstein_wet``: two-sample KS D and 1-Wasserstein of the same pools
      (D = 1 if a pool is empty; an empty pool counts as all mass at 0 for Wasserstein).
    - ``small_scale_power_ratio``: as ``model.metrics`` defines it, on the radially averaged
      spectra of the masked, mean-removed fields; 1 when neither field has small-scale power,
      inf when only the prediction has.

    Args:
        pred_mm: [N, H, W] predicted fields, mm/day.
        obs_mm: [N, H, W] observed fields, mm/day.
        mask: [N, H, W] bool, True on valid cells.
        thresholds: Label to mm/day, as :func:`heavy_thresholds` gives.
        wet_threshold: mm/day above which a cell is wet.

    Raises:
        ValueError: Shapes, devices or the mask's dtype disagree, or no cell is valid.
    """
    _check_fields(pred_mm, obs_mm, mask)
    pred, obs = pred_mm.to(_F64), obs_mm.to(_F64)
    n_valid = mask.sum(dtype=_F64)
    err = torch.where(mask, pred - obs, 0.0)
    parts = [
        n_valid,
        err.square().sum() / n_valid,
        err.abs().sum() / n_valid,
        err.sum() / n_valid,
        _spatial_corr(pred, obs, mask),
    ]
    parts += [_contingency(pred, obs, mask, t) for t in thresholds.values()]
    pred_pool = make_pool(pred, mask & (pred > wet_threshold))
    obs_pool = make_pool(obs, mask & (obs > wet_threshold))
    parts += [pool_quantile(pred_pool, q) - pool_quantile(obs_pool, q) for q in (0.99, 0.999)]
    parts += [ks_2samp(pred_pool, obs_pool)[0], wasserstein1(pred_pool, obs_pool)]
    _, power_pred = power_spectrum(pred[:, None], mask)
    _, power_obs = power_spectrum(obs[:, None], mask)
    ratio = small_scale_power_ratio(power_pred, power_obs)
    parts.append(torch.where(ratio.isnan(), 1.0, ratio))
    flat = torch.cat([p.reshape(-1) for p in parts]).tolist()

    if flat[0] == 0:
        raise ValueError("score_fields mask: expected at least one valid cell, got none")
    values = [math.sqrt(flat[1]), *flat[2:5]]
    offset = 5
    for _ in thresholds:
        values += _categorical(*flat[offset : offset + 4])
        offset += 4
    values += flat[offset:]
    return dict(zip(score_definitions(list(thresholds)), values, strict=True))


def gain(score: Score, without: float, with_: float) -> float:
    """The change from ``without`` to ``with_``, signed so that positive is better.

    ``higher``: with - without; ``lower``: without - with; ``zero``: |without| - |with|;
    ``one``: |without - 1| - |with - 1|.
    """
    if score.better == "higher":
        return with_ - without
    if score.better == "lower":
        return without - with_
    if score.better == "zero":
        return abs(without) - abs(with_)
    return abs(without - 1) - abs(with_ - 1)


@dataclass
class Verdict:
    """Per-seed gains of one score, summarised.

    Attributes:
        mean: Mean of the per-seed gains.
        spread: Their sample standard deviation (ddof 1); 0 for one seed.
        verdict: ``better``, ``worse`` or ``within noise``, by :func:`verdict`'s rule.
    """

    mean: float
    spread: float
    verdict: Literal["better", "worse", "within noise"]


def verdict(gains_per_seed: Sequence[float], *, level: float = 0.05) -> Verdict:
    """Whether augmentation changed a score beyond seed noise.

    Both arms train with the same seeds, so the test is paired: a two-sided one-sample Student
    t-test of the per-seed gains against 0. Significant at ``level``: ``better`` if the mean
    gain is positive, ``worse`` if negative; otherwise ``within noise``. Where the t-test is
    undefined: one seed is ``within noise`` (nothing to measure the noise with); two or more
    identical gains are ``better``/``worse`` by their sign if nonzero (the difference did not
    vary at all over seeds) and ``within noise`` if 0. A non-finite gain is ``within noise``.

    Args:
        gains_per_seed: One gain per seed, as :func:`gain` gives (positive is better).
        level: Significance level of the test.

    Raises:
        ValueError: No gains, or ``level`` outside (0, 1).
    """
    if len(gains_per_seed) == 0:
        raise ValueError("verdict gains_per_seed: expected at least one gain, got none")
    if not 0.0 < level < 1.0:
        raise ValueError(f"verdict level: expected a value in (0, 1), got {level}")
    import numpy as np
    from scipy.stats import ttest_1samp

    gains = np.asarray(gains_per_seed, dtype=np.float64)
    mean = float(gains.mean())
    spread = float(gains.std(ddof=1)) if gains.size > 1 else 0.0
    sign: Literal["better", "worse"] = "better" if mean > 0 else "worse"
    if gains.size < 2 or not np.isfinite(gains).all() or mean == 0:
        return Verdict(mean, spread, "within noise")
    if (gains == gains[0]).all():  # the t statistic is ±inf, and SciPy warns of precision loss
        return Verdict(mean, spread, sign)
    significant = float(ttest_1samp(gains, 0.0).pvalue) < level
    return Verdict(mean, spread, sign if significant else "within noise")


_HEADS = ("metric", "without", "with", "gain ± spread", "verdict")


def format_table(
    rows: Sequence[tuple[str, float, float, float, float, str]], *, heads: Sequence[str] = _HEADS
) -> str:
    """An aligned plain-text table of the two arms' scores, their gain and the verdict.

    Args:
        rows: (score name, mean without, mean with, gain mean, gain spread, verdict) per score.
        heads: The five column headings.

    Returns:
        The heading line, a rule, and one line per row; numbers to 4 significant digits (the
        gain with its sign), names and verdicts left-aligned, numbers right-aligned, columns two
        spaces apart.

    Raises:
        ValueError: ``heads`` does not have five entries.
    """
    if len(heads) != 5:
        raise ValueError(f"format_table heads: expected 5 column headings, got {len(heads)}")
    cells = [
        [name, f"{without:.4g}", f"{with_:.4g}", f"{g:+.4g} ± {spread:.4g}", word]
        for name, without, with_, g, spread, word in rows
    ]
    widths = [max(len(r[i]) for r in [list(heads), *cells]) for i in range(5)]

    def line(r: Sequence[str]) -> str:
        numbers = (c.rjust(w) for c, w in zip(r[1:4], widths[1:4], strict=True))
        return "  ".join([r[0].ljust(widths[0]), *numbers, r[4]])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(heads), rule, *(line(r) for r in cells)])
