from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from model.downstream_metrics import (
    SCORES,
    Score,
    format_table,
    gain,
    heavy_thresholds,
    score_definitions,
    score_fields,
    verdict,
)

WET = 0.1


def _case(seed: int = 0, n: int = 6, h: int = 16, w: int = 24) -> tuple[torch.Tensor, ...]:
    """Skewed rain-like observations, a noisy blurred-ish prediction and a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    obs = (torch.randn(n, h, w, generator=g) * 4).clamp_min(0) ** 1.5
    pred = (0.7 * obs + torch.rand(n, h, w, generator=g) * 3 - 0.5).clamp_min(0)
    mask = torch.rand(n, h, w, generator=g) > 0.25
    return pred, obs, mask


def _wet(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x[mask.numpy() & (x > WET)]


def _sedi(h: float, f: float) -> float:
    num = math.log(f) - math.log(h) - math.log(1 - f) + math.log(1 - h)
    return num / (math.log(f) + math.log(h) + math.log(1 - f) + math.log(1 - h))


def test_continuous_and_distribution_scores_match_numpy_and_scipy() -> None:
    pred, obs, mask = _case()
    s = score_fields(pred, obs, mask, {}, wet_threshold=WET)
    m = mask.numpy()
    err = (pred.double() - obs.double()).numpy()[m]
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-12)
    assert s["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-12)
    assert s["bias"] == pytest.approx(np.mean(err), rel=1e-12)
    wp, wo = _wet(pred, mask), _wet(obs, mask)
    assert s["q99_error"] == pytest.approx(np.quantile(wp, 0.99) - np.quantile(wo, 0.99), rel=1e-10)
    assert s["q999_error"] == pytest.approx(np.quantile(wp, 0.999) - np.quantile(wo, 0.999), rel=1e-10)
    assert s["ks_wet"] == pytest.approx(scipy.stats.ks_2samp(wp, wo).statistic, abs=1e-12)
    assert s["wasserstein_wet"] == pytest.approx(scipy.stats.wasserstein_distance(wp, wo), rel=1e-9)


def test_spatial_corr_is_the_mean_over_defined_days_of_numpy_pearson() -> None:
    pred, obs, mask = _case(1)
    pred[1] = 3.0  # constant prediction: undefined correlation, the day is left out
    mask[2] = False
    mask[2, 0, 0] = True  # one valid cell: left out
    s = score_fields(pred, obs, mask, {}, wet_threshold=WET)
    per_day = [
        np.corrcoef(pred[d].double().numpy()[mask[d].numpy()], obs[d].double().numpy()[mask[d].numpy()])[0, 1]
        for d in (0, 3, 4, 5)
    ]
    assert s["spatial_corr"] == pytest.approx(np.mean(per_day), rel=1e-10)


def test_spatial_corr_without_a_defined_day_is_zero() -> None:
    pred, obs, mask = _case(2)
    s = score_fields(torch.full_like(pred, 2.0), obs, mask, {}, wet_threshold=WET)
    assert s["spatial_corr"] == 0.0


def test_small_scale_power_ratio_matches_a_numpy_radial_spectrum() -> None:
    pred, obs, mask = _case(3, h=16, w=20)

    def spectrum(x: torch.Tensor) -> np.ndarray:
        f, m = x.double().numpy(), mask.numpy()
        mean = (f * m).sum(axis=(1, 2), keepdims=True) / m.sum(axis=(1, 2), keepdims=True)
        power = (np.abs(np.fft.fft2(np.where(m, f - mean, 0.0))) ** 2 / (16 * 20)).mean(axis=0)
        radius = np.hypot(*np.meshgrid(np.fft.fftfreq(16), np.fft.fftfreq(20), indexing="ij")) * 16
        bins = np.floor(radius + 0.5)
        return np.array([power[bins == k].mean() for k in range(9)])

    # k_max = 8: the upper half is bins 5..8.
    expected = spectrum(pred)[5:].sum() / spectrum(obs)[5:].sum()
    s = score_fields(pred, obs, mask, {}, wet_threshold=WET)
    assert s["small_scale_power_ratio"] == pytest.approx(expected, rel=1e-10)


def test_categorical_scores_match_a_hand_counted_contingency_table() -> None:
    # One day of 4 x 5 cells, threshold 10 mm/day: 3 hits, 2 misses, 4 false alarms, 11 negatives.
    obs = torch.zeros(1, 4, 5)
    pred = torch.zeros(1, 4, 5)
    flat_o, flat_p = obs.view(-1), pred.view(-1)
    flat_o[:3], flat_p[:3] = 20.0, 15.0  # hits
    flat_o[3:5], flat_p[3:5] = 12.0, 10.0  # misses (10 is not above 10)
    flat_o[5:9], flat_p[5:9] = 10.0, 30.0  # false alarms
    flat_p[9:] = 5.0  # correct negatives
    s = score_fields(pred, obs, torch.ones(1, 4, 5, dtype=torch.bool), {"10mm": 10.0}, wet_threshold=WET)
    assert s["pod_10mm"] == pytest.approx(3 / 5)
    assert s["far_10mm"] == pytest.approx(4 / 7)
    assert s["csi_10mm"] == pytest.approx(3 / 9)
    assert s["sedi_10mm"] == pytest.approx(_sedi(3 / 5, 4 / 15))


def test_sedi_clamps_a_perfect_hit_rate_and_zero_false_alarm_rate() -> None:
    obs = torch.zeros(1, 4, 5)
    obs.view(-1)[:4] = 50.0
    s = score_fields(obs.clone(), obs, torch.ones(1, 4, 5, dtype=torch.bool), {"p": 10.0}, wet_threshold=WET)
    assert (s["pod_p"], s["far_p"], s["csi_p"]) == (1.0, 0.0, 1.0)
    assert s["sedi_p"] == pytest.approx(_sedi(1 - 1 / 8, 1 / 32))


@pytest.mark.parametrize(
    ("pred_value", "obs_value", "expected"),
    [
        (0.0, 0.0, (0.0, 1.0, 0.0, 0.0)),  # nothing to detect, nothing predicted
        (0.0, 50.0, (0.0, 1.0, 0.0, 0.0)),  # every event missed
        (50.0, 0.0, (0.0, 1.0, 0.0, 0.0)),  # only false alarms
        (50.0, 50.0, (1.0, 0.0, 1.0, 0.0)),  # every cell an event: no non-event for SEDI's F
    ],
)
def test_degenerate_tables_have_the_documented_finite_scores(
    pred_value: float, obs_value: float, expected: tuple[float, ...]
) -> None:
    pred = torch.full((2, 4, 4), pred_value)
    obs = torch.full((2, 4, 4), obs_value)
    s = score_fields(pred, obs, torch.ones(2, 4, 4, dtype=torch.bool), {"t": 10.0}, wet_threshold=WET)
    got = (s["pod_t"], s["far_t"], s["csi_t"], s["sedi_t"])
    assert got == expected
    assert all(math.isfinite(v) for v in s.values())


def test_perfect_prediction_scores_perfectly() -> None:
    _, obs, mask = _case(4)
    thresholds = heavy_thresholds(obs, mask, [0.9], [5.0], WET)
    s = score_fields(obs.clone(), obs, mask, thresholds, wet_threshold=WET)
    assert (s["rmse"], s["mae"], s["bias"]) == (0.0, 0.0, 0.0)
    assert s["spatial_corr"] == pytest.approx(1.0, abs=1e-12)
    for t in thresholds:
        assert (s[f"pod_{t}"], s[f"far_{t}"], s[f"csi_{t}"]) == (1.0, 0.0, 1.0)
        assert s[f"sedi_{t}"] > 0.9
    assert (s["q99_error"], s["q999_error"], s["ks_wet"], s["wasserstein_wet"]) == (0.0, 0.0, 0.0, 0.0)
    assert s["small_scale_power_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_invalid_cells_never_change_a_score() -> None:
    pred, obs, mask = _case(5)
    thresholds = {"p95": 8.0, "20mm": 20.0}
    clean = score_fields(pred, obs, mask, thresholds, wet_threshold=WET)
    wild_pred = torch.where(mask, pred, torch.tensor(1e6))
    wild_obs = torch.where(mask, obs, torch.tensor(-1e6))
    wild_obs[~mask & (torch.rand_like(obs) > 0.5)] = math.nan
    wild = score_fields(wild_pred, wild_obs, mask, thresholds, wet_threshold=WET)
    assert wild.keys() == clean.keys()
    for name, value in clean.items():
        assert wild[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_scores_come_in_the_order_of_their_definitions() -> None:
    pred, obs, mask = _case(6)
    s = score_fields(pred, obs, mask, {"p95": 8.0, "2p5mm": 2.5}, wet_threshold=WET)
    defs = score_definitions(["p95", "2p5mm"])
    assert list(s) == list(defs)
    assert list(s)[:8] == ["rmse", "mae", "bias", "spatial_corr", "pod_p95", "far_p95", "csi_p95", "sedi_p95"]
    assert list(s)[-5:] == list(SCORES)[-5:]
    assert set(SCORES) <= set(defs)


def test_score_fields_rejects_bad_input() -> None:
    pred, obs, mask = _case(7)
    with pytest.raises(ValueError, match="pred_mm: expected shape"):
        score_fields(pred[:2], obs, mask, {}, wet_threshold=WET)
    with pytest.raises(ValueError, match="mask: expected a bool"):
        score_fields(pred, obs, mask.float(), {}, wet_threshold=WET)
    with pytest.raises(ValueError, match="at least one valid cell"):
        score_fields(pred, obs, torch.zeros_like(mask), {}, wet_threshold=WET)


def test_heavy_thresholds_are_wet_cell_quantiles_and_fixed_values_with_their_labels() -> None:
    _, obs, mask = _case(8)
    obs[~mask] = 1e6  # invalid cells never enter the quantiles
    t = heavy_thresholds(obs, mask, [0.95, 0.99, 0.999], [20.0, 2.5], WET)
    assert list(t) == ["p95", "p99", "p999", "20mm", "2p5mm"]
    assert list(heavy_thresholds(obs, mask, [0.07, 0.5], [0.25], WET)) == ["p7", "p50", "0p25mm"]
    wet = _wet(obs, mask)
    for label, q in (("p95", 0.95), ("p99", 0.99), ("p999", 0.999)):
        assert t[label] == pytest.approx(np.quantile(wet, q), rel=1e-12)
    assert (t["20mm"], t["2p5mm"]) == (20.0, 2.5)


def test_heavy_thresholds_reject_bad_input() -> None:
    _, obs, mask = _case(9)
    with pytest.raises(ValueError, match="threshold_quantiles: expected values in"):
        heavy_thresholds(obs, mask, [1.5], [], WET)
    with pytest.raises(ValueError, match="thresholds_mm: expected positive"):
        heavy_thresholds(obs, mask, [], [-1.0], WET)
    with pytest.raises(ValueError, match="distinct labels"):
        heavy_thresholds(obs, mask, [], [20.0, 20.0], WET)
    with pytest.raises(ValueError, match="no valid cell above the wet threshold"):
        heavy_thresholds(torch.zeros_like(obs), mask, [0.95], [], WET)


@pytest.mark.parametrize(
    ("better", "without", "with_", "expected"),
    [
        ("higher", 0.5, 0.7, 0.2),
        ("higher", 0.7, 0.5, -0.2),
        ("lower", 3.0, 2.0, 1.0),
        ("lower", 2.0, 3.0, -1.0),
        ("zero", -2.0, 1.0, 1.0),
        ("zero", 0.5, -1.5, -1.0),
        ("one", 0.6, 1.1, 0.3),
        ("one", 1.1, 0.6, -0.3),
    ],
)
def test_gain_is_positive_when_with_is_better(
    better: str, without: float, with_: float, expected: float
) -> None:
    assert gain(Score("s", better, ""), without, with_) == pytest.approx(expected)  # type: ignore[arg-type]


def test_each_score_has_the_direction_its_definition_implies() -> None:
    defs = score_definitions(["p99"])
    expected = {"higher": {"spatial_corr", "pod_p99", "csi_p99", "sedi_p99"}, "zero": {"bias"}}
    expected |= {"zero": {"bias", "q99_error", "q999_error"}, "one": {"small_scale_power_ratio"}}
    expected["lower"] = set(defs) - set().union(*expected.values())
    assert expected["lower"] == {"rmse", "mae", "far_p99", "ks_wet", "wasserstein_wet"}
    for better, names in expected.items():
        assert {defs[n].better for n in names} == {better}
    assert all(s.description for s in defs.values())


def test_verdict_on_clear_noisy_and_degenerate_gains() -> None:
    better = verdict([0.10, 0.12, 0.11, 0.09])
    assert better.verdict == "better"
    assert better.mean == pytest.approx(0.105)
    assert better.spread == pytest.approx(np.std([0.10, 0.12, 0.11, 0.09], ddof=1))
    assert verdict([-0.10, -0.12, -0.11]).verdict == "worse"
    assert verdict([0.3, -0.2, 0.1]).verdict == "within noise"
    # The rule is the t-test's p-value against the level.
    gains = [0.10, 0.02, 0.06]
    p = scipy.stats.ttest_1samp(gains, 0.0).pvalue
    assert verdict(gains, level=p * 1.01).verdict == "better"
    assert verdict(gains, level=p * 0.99).verdict == "within noise"
    assert verdict([-g for g in gains], level=p * 1.01).verdict == "worse"
    one = verdict([0.5])
    assert (one.mean, one.spread, one.verdict) == (0.5, 0.0, "within noise")
    assert verdict([0.0, 0.0, 0.0]).verdict == "within noise"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # identical gains never reach SciPy's ill-posed t-test
        assert verdict([0.2, 0.2]).verdict == "better"
        assert verdict([-0.2, -0.2, -0.2]).verdict == "worse"
    assert verdict([0.1, math.nan, 0.2]).verdict == "within noise"
    with pytest.raises(ValueError, match="at least one gain"):
        verdict([])


def test_table_layout() -> None:
    rows = [
        ("rmse", 1.234567, 1.1, 0.134567, 0.0123456, "better"),
        ("small_scale_power_ratio", 0.5, 0.45, -0.05, 0.2, "within noise"),
    ]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["metric", "without", "with", "gain", "±", "spread", "verdict"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["rmse", "1.235", "1.1", "+0.1346", "±", "0.01235", "better"]
    assert lines[3].split()[:6] == ["small_scale_power_ratio", "0.5", "0.45", "-0.05", "±", "0.2"]
    # The rule's dashes span the columns: names and verdicts start where their span starts,
    # numbers end where theirs ends.
    spans = [(m.start(), m.end()) for m in re.finditer("-+", lines[1])]
    assert len(spans) == 5
    assert spans[0] == (0, len("small_scale_power_ratio"))
    for line in [lines[0], *lines[2:]]:
        assert line[spans[0][0]] != " " and line[spans[4][0]] != " "
        for start, end in spans[1:4]:
            assert line[end - 1] != " " and line[start - 2 : start] == "  "
