from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from model.metrics import METRICS, EvalData, collapse_probe, compute_diagnostics, compute_metrics, get_metric


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rain(shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Skewed non-negative fields with dry cells, a crude stand-in for precipitation."""
    return (torch.randn(shape, generator=g, dtype=dtype) * 4).clamp_min(0) ** 1.5


def _full_case(seed: int = 0) -> EvalData:
    g = _gen(seed)
    n, k, h, w, d = 5, 4, 12, 16, 6
    obs = _rain((n, h, w), g)
    samples = _rain((n, k, h, w), g)
    return EvalData(
        samples=samples,
        obs=obs,
        mask=torch.rand(n, h, w, generator=g) > 0.2,
        recon_post=obs + 0.3 * torch.rand(n, h, w, generator=g),
        recon_prior=samples[:, 0],
        mu_post=torch.randn(n, d, generator=g),
        logvar_post=0.3 * torch.randn(n, d, generator=g),
        prior_mu=0.1 * torch.randn(n, d, generator=g),
        prior_logvar=0.1 * torch.randn(n, d, generator=g),
        wet_threshold=0.1,
    )


def _metric(data: EvalData, name: str) -> float:
    return compute_metrics(data, [name])[name]


def _all_valid(n: int, h: int, w: int) -> torch.Tensor:
    return torch.ones(n, h, w, dtype=torch.bool)


def test_identical_samples_have_no_spread_and_full_sample_correlation() -> None:
    g = _gen()
    obs = _rain((4, 10, 12), g)
    field = torch.randn(4, 1, 10, 12, generator=g).exp()
    data = EvalData(samples=field.expand(4, 5, 10, 12).clone(), obs=obs, mask=_all_valid(4, 10, 12))
    m = compute_metrics(data, ["diversity", "spread_norm", "corr_sample_sample"])
    assert m["diversity"] == 0.0
    assert m["spread_norm"] == 0.0
    assert m["corr_sample_sample"] == pytest.approx(1.0, abs=1e-5)


def test_diversity_of_gaussian_noise_matches_its_sigma() -> None:
    g = _gen()
    n, k, h, w, sigma = 8, 8, 16, 16, 0.7
    obs = _rain((n, h, w), g)
    samples = obs[:, None] + sigma * torch.randn(n, k, h, w, generator=g)
    # The mean of the unbiased sample std is c4(K) * sigma, slightly below sigma.
    c4 = math.sqrt(2 / (k - 1)) * math.exp(math.lgamma(k / 2) - math.lgamma((k - 1) / 2))
    cells = n * h * w
    tol = 5 * sigma / math.sqrt(2 * (k - 1) * cells)
    diversity = _metric(EvalData(samples=samples, obs=obs, mask=_all_valid(n, h, w)), "diversity")
    assert diversity == pytest.approx(c4 * sigma, abs=tol)


def _scipy_pools(data: EvalData) -> tuple[torch.Tensor, torch.Tensor]:
    gen = data.samples[data.mask[:, None].expand_as(data.samples)]
    obs = data.obs[data.mask]
    return gen[gen > data.wet_threshold], obs[obs > data.wet_threshold]


def test_ks_and_wasserstein_match_scipy_with_ties_and_unequal_sizes() -> None:
    g = _gen(3)
    n, k, h, w = 7, 3, 9, 11
    # Rounded to whole mm/day: many ties within and across the two pools.
    samples = _rain((n, k, h, w), g, torch.float64).round()
    obs = (1.2 * _rain((n, h, w), g, torch.float64)).round()
    mask = torch.rand(n, h, w, generator=g) > 0.3
    data = EvalData(samples=samples, obs=obs, mask=mask, wet_threshold=0.5)
    m = compute_metrics(data)

    gen_pool, obs_pool = (p.numpy() for p in _scipy_pools(data))
    assert len(gen_pool) != len(obs_pool)
    ref = scipy.stats.ks_2samp(gen_pool, obs_pool, method="asymp")
    assert m["ks_stat"] == pytest.approx(ref.statistic, abs=1e-6)
    assert m["ks_pvalue"] == pytest.approx(ref.pvalue, abs=1e-6)
    assert 0.0 < m["ks_stat"] < 1.0
    assert m["wasserstein1"] == pytest.approx(scipy.stats.wasserstein_distance(gen_pool, obs_pool), abs=1e-6)

    cells = mask.sum(dim=(1, 2)).double()
    gen_means = (samples * mask[:, None]).sum(dim=(2, 3)) / cells[:, None]
    obs_means = (obs * mask).sum(dim=(1, 2)) / cells
    daily = scipy.stats.ks_2samp(gen_means.flatten().numpy(), obs_means.numpy(), method="asymp")
    assert m["ks_daily_mean_stat"] == pytest.approx(daily.statistic, abs=1e-6)
    assert m["ks_daily_mean_pvalue"] == pytest.approx(daily.pvalue, abs=1e-6)


def test_ks_with_an_empty_pool_is_maximal() -> None:
    g = _gen()
    samples = _rain((3, 2, 6, 6), g) + 1.0
    data = EvalData(samples=samples, obs=torch.zeros(3, 6, 6), mask=_all_valid(3, 6, 6))
    m = compute_metrics(data, ["ks_stat", "ks_pvalue"])
    assert m == {"ks_stat": 1.0, "ks_pvalue": 0.0}
    both_dry = EvalData(samples=torch.zeros(3, 2, 6, 6), obs=torch.zeros(3, 6, 6), mask=_all_valid(3, 6, 6))
    assert compute_metrics(both_dry, ["ks_stat", "ks_pvalue"]) == {"ks_stat": 1.0, "ks_pvalue": 0.0}


def _gaussian_crps(y: float, mean: float, std: float) -> float:
    z = (y - mean) / std
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return std * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


@pytest.mark.parametrize("y", [0.3, 2.5])
def test_crps_of_a_large_gaussian_ensemble_matches_the_closed_form(y: float) -> None:
    g = _gen()
    mean, std, k = 1.0, 0.8, 2000
    samples = mean + std * torch.randn(1, k, 6, 6, generator=g, dtype=torch.float64)
    data = EvalData(
        samples=samples, obs=torch.full((1, 6, 6), y, dtype=torch.float64), mask=_all_valid(1, 6, 6)
    )
    assert _metric(data, "crps") == pytest.approx(_gaussian_crps(y, mean, std), rel=0.01)


def test_crps_with_two_members_by_hand() -> None:
    # Members {1, 4} at the first cell, {2, 2} at the second.
    samples = torch.tensor([[1.0, 2.0], [4.0, 2.0]]).reshape(1, 2, 1, 2)
    obs = torch.tensor([2.0, 5.0]).reshape(1, 1, 2)
    # Cell 1: (|1-2| + |4-2|)/2 - |1-4|/2 = 0; cell 2: (3 + 3)/2 - 0 = 3.
    data = EvalData(samples=samples, obs=obs, mask=_all_valid(1, 1, 2))
    assert _metric(data, "crps") == pytest.approx(1.5, abs=1e-6)


def _ensemble_case(spread: float, seed: int = 0, n: int = 8, k: int = 4) -> EvalData:
    g = _gen(seed)
    obs = torch.randn(n, 32, 32, generator=g)
    samples = spread * torch.randn(n, k, 32, 32, generator=g)
    return EvalData(samples=samples, obs=obs, mask=_all_valid(n, 32, 32), seed=seed)


def test_rank_histogram_is_flat_for_an_ensemble_from_the_truths_distribution() -> None:
    data = _ensemble_case(spread=1.0)
    hist = torch.tensor(compute_diagnostics(data)["rank_histogram"])
    k = data.samples.shape[1]
    cells = data.mask.sum().item()
    se = math.sqrt((1 / (k + 1)) * (1 - 1 / (k + 1)) / cells)
    assert hist.numel() == k + 1
    assert hist.sum().item() == pytest.approx(1.0)
    assert (hist - 1 / (k + 1)).abs().max().item() < 4 * se
    assert _metric(data, "rank_hist_deviation") < 0.03


def test_rank_histogram_is_u_shaped_for_an_under_dispersed_ensemble() -> None:
    data = _ensemble_case(spread=0.2)
    hist = compute_diagnostics(data)["rank_histogram"]
    assert min(hist[0], hist[-1]) > 3 * max(hist[1:-1])
    assert _metric(data, "rank_hist_deviation") > 0.8


def test_rank_histogram_breaks_ties_at_random() -> None:
    # All dry: the observation ties with every sample, so each rank is equally likely.
    data = EvalData(samples=torch.zeros(8, 4, 32, 32), obs=torch.zeros(8, 32, 32), mask=_all_valid(8, 32, 32))
    hist = torch.tensor(compute_diagnostics(data)["rank_histogram"])
    assert (hist - 0.2).abs().max().item() < 0.01


def test_spread_skill_is_one_when_calibrated_and_below_when_under_dispersed() -> None:
    assert _metric(_ensemble_case(spread=1.0), "spread_skill") == pytest.approx(1.0, abs=0.03)
    assert _metric(_ensemble_case(spread=0.3), "spread_skill") < 0.5


def test_corr_gap_is_zero_when_calibrated_and_positive_when_samples_copy_each_other() -> None:
    g = _gen()
    n, k, h, w = 16, 4, 16, 16
    signal = torch.randn(n, 1, h, w, generator=g)
    obs = (signal + torch.randn(n, 1, h, w, generator=g))[:, 0]
    calibrated = signal + torch.randn(n, k, h, w, generator=g)
    copied = (signal + torch.randn(n, 1, h, w, generator=g)).expand(n, k, h, w) + 0.05 * torch.randn(
        n, k, h, w, generator=g
    )
    mask = _all_valid(n, h, w)
    m = compute_metrics(EvalData(samples=calibrated, obs=obs, mask=mask))
    assert m["corr_sample_truth"] == pytest.approx(0.5, abs=0.05)
    assert m["spatial_correlation"] == m["corr_sample_truth"]
    assert m["corr_gap"] == pytest.approx(0.0, abs=0.03)
    assert _metric(EvalData(samples=copied, obs=obs, mask=mask), "corr_gap") > 0.4


def test_correlation_with_a_constant_field_is_zero() -> None:
    g = _gen()
    obs = torch.full((3, 8, 8), 2.0)
    samples = torch.rand(3, 2, 8, 8, generator=g)
    samples[:, 1] = 0.7
    m = compute_metrics(EvalData(samples=samples, obs=obs, mask=_all_valid(3, 8, 8)))
    assert m["spatial_correlation"] == 0.0
    assert m["corr_sample_sample"] == 0.0


def _spectrum(data: EvalData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    diag = compute_diagnostics(data)
    return tuple(torch.tensor(diag[k]) for k in ("spectrum_wavenumber", "spectrum_gen", "spectrum_obs"))


def test_power_spectrum_of_white_noise_is_flat() -> None:
    g = _gen()
    n, h, w = 100, 64, 64
    obs = torch.randn(n, h, w, generator=g)
    data = EvalData(samples=torch.randn(n, 2, h, w, generator=g), obs=obs, mask=_all_valid(n, h, w))
    wavenumbers, gen, obs_power = _spectrum(data)
    assert wavenumbers.tolist() == list(range(33))
    for power in (gen[1:], obs_power[1:]):
        assert (power.max() / power.min()).item() < 1.2
        assert power.mean().item() == pytest.approx(1.0, rel=0.02)
    m = compute_metrics(data, ["small_scale_power_ratio", "spectrum_log_error"])
    assert m["small_scale_power_ratio"] == pytest.approx(1.0, abs=0.02)
    assert m["spectrum_log_error"] < 0.03


def _smooth(x: torch.Tensor, width: float) -> torch.Tensor:
    """Gaussian blur through the FFT (periodic), so the transfer function decreases with k."""
    fy = torch.fft.fftfreq(x.shape[-2], dtype=x.dtype)
    fx = torch.fft.fftfreq(x.shape[-1], dtype=x.dtype)
    transfer = torch.exp(-2 * math.pi**2 * width**2 * (fy[:, None] ** 2 + fx[None, :] ** 2))
    return torch.fft.ifft2(torch.fft.fft2(x) * transfer).real


def test_power_spectrum_of_a_smoothed_field_decreases_and_shows_the_blur() -> None:
    g = _gen()
    n, h, w = 20, 32, 32
    obs = torch.randn(n, h, w, generator=g, dtype=torch.float64)
    samples = _smooth(torch.randn(n, 2, h, w, generator=g, dtype=torch.float64), width=1.5)
    data = EvalData(samples=samples, obs=obs, mask=_all_valid(n, h, w))
    _, gen, _ = _spectrum(data)
    assert bool((gen[2:] < gen[1:-1]).all())
    assert _metric(data, "small_scale_power_ratio") < 0.01


def test_spectrum_log_error_is_zero_when_samples_equal_obs_on_a_non_square_grid() -> None:
    g = _gen()
    n, h, w = 6, 16, 40
    obs = _rain((n, h, w), g)
    mask = torch.rand(n, h, w, generator=g) > 0.1
    data = EvalData(samples=obs[:, None].expand(n, 3, h, w), obs=obs, mask=mask)
    wavenumbers, gen, obs_power = _spectrum(data)
    assert wavenumbers.tolist() == list(range(9))
    assert torch.allclose(gen, obs_power)
    m = compute_metrics(data, ["spectrum_log_error", "small_scale_power_ratio"])
    assert m["spectrum_log_error"] == pytest.approx(0.0, abs=1e-6)
    assert m["small_scale_power_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_white_noise_spectrum_is_flat_on_a_non_square_grid() -> None:
    g = _gen()
    n, h, w = 60, 32, 48
    data = EvalData(
        samples=torch.randn(n, 2, h, w, generator=g),
        obs=torch.randn(n, h, w, generator=g),
        mask=_all_valid(n, h, w),
    )
    _, gen, _ = _spectrum(data)
    assert (gen[1:].max() / gen[1:].min()).item() < 1.2


def test_quantile_errors_and_wet_fraction_on_a_constructed_case() -> None:
    g = _gen()
    n, k, h, w, thr = 4, 3, 10, 10, 1.0
    obs = _rain((n, h, w), g)
    samples = _rain((n, k, h, w), g) * 1.3
    mask = torch.rand(n, h, w, generator=g) > 0.25
    data = EvalData(samples=samples, obs=obs, mask=mask, wet_threshold=thr)
    m = compute_metrics(data)
    gen_pool, obs_pool = _scipy_pools(data)
    for name, q in (("q95_error", 0.95), ("q99_error", 0.99), ("q999_error", 0.999)):
        expected = torch.quantile(gen_pool.double(), q) - torch.quantile(obs_pool.double(), q)
        assert m[name] == pytest.approx(expected.item(), abs=1e-5)
    assert m["wet_fraction_gen"] == pytest.approx(gen_pool.numel() / (k * mask.sum().item()))
    assert m["wet_fraction_obs"] == pytest.approx(obs_pool.numel() / mask.sum().item())
    assert m["wet_fraction_error"] == pytest.approx(m["wet_fraction_gen"] - m["wet_fraction_obs"])


def test_wet_fraction_by_hand() -> None:
    obs = torch.tensor([[[0.0, 2.0], [3.0, 9.0]]])
    samples = torch.tensor([[[[0.0, 0.0], [3.0, 0.0]], [[5.0, 5.0], [5.0, 9.0]]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    m = compute_metrics(EvalData(samples=samples, obs=obs, mask=mask, wet_threshold=1.0))
    assert m["wet_fraction_obs"] == pytest.approx(2 / 3)
    assert m["wet_fraction_gen"] == pytest.approx(4 / 6)
    assert m["wet_fraction_error"] == pytest.approx(0.0)


def test_masked_cells_never_affect_any_metric() -> None:
    data = _full_case()
    invalid = ~data.mask
    poisoned = EvalData(
        samples=data.samples.masked_fill(invalid[:, None], 1e30),
        obs=data.obs.masked_fill(invalid, 1e30),
        mask=data.mask,
        recon_post=data.recon_post.masked_fill(invalid, -1e30),
        recon_prior=data.recon_prior.masked_fill(invalid, 1e30),
        mu_post=data.mu_post,
        logvar_post=data.logvar_post,
        prior_mu=data.prior_mu,
        prior_logvar=data.prior_logvar,
        wet_threshold=data.wet_threshold,
    )
    assert compute_metrics(poisoned) == pytest.approx(compute_metrics(data), rel=1e-9, abs=1e-12)
    clean_diag, poisoned_diag = compute_diagnostics(data), compute_diagnostics(poisoned)
    for name, values in clean_diag.items():
        assert poisoned_diag[name] == pytest.approx(values, rel=1e-9, abs=1e-12), name


def test_a_fully_masked_day_enters_no_metric() -> None:
    data = _full_case()
    n, k, h, w = data.samples.shape
    g = _gen(7)
    # The same days plus one whose every cell is invalid (an outage, or all ocean), holding
    # values that would count if it were averaged in.
    with_masked_day = EvalData(
        samples=torch.cat([data.samples, _rain((1, k, h, w), g)]),
        obs=torch.cat([data.obs, _rain((1, h, w), g)]),
        mask=torch.cat([data.mask, torch.zeros(1, h, w, dtype=torch.bool)]),
        recon_post=torch.cat([data.recon_post, torch.zeros(1, h, w)]),
        recon_prior=torch.cat([data.recon_prior, torch.zeros(1, h, w)]),
        wet_threshold=data.wet_threshold,
    )
    names = [m for m in METRICS if m not in ("active_units", "kl_raw", "kl_raw_min_dim", "kl_raw_median_dim")]
    expected = compute_metrics(data, names)
    assert compute_metrics(with_masked_day, names) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert compute_diagnostics(with_masked_day)["spectrum_gen"] == pytest.approx(
        compute_diagnostics(data)["spectrum_gen"], rel=1e-9
    )


def test_spectrum_log_error_of_an_all_dry_split_is_defined() -> None:
    n, k, h, w = 4, 3, 8, 8
    dry = torch.zeros(n, h, w)
    mask = _all_valid(n, h, w)
    rain = _rain((n, k, h, w), _gen())
    # Rain against a split with no rain at all: infinitely wrong, not ~300 "decades".
    assert _metric(EvalData(samples=rain, obs=dry, mask=mask), "spectrum_log_error") == math.inf
    # Dry samples of a dry split: no structure at any scale in either, so no error.
    assert _metric(EvalData(samples=torch.zeros(n, k, h, w), obs=dry, mask=mask), "spectrum_log_error") == 0.0


def _latent_case(mu: torch.Tensor, logvar: torch.Tensor, **kwargs: torch.Tensor) -> EvalData:
    n = mu.shape[0]
    return EvalData(
        samples=torch.rand(n, 2, 4, 4, generator=_gen()),
        obs=torch.rand(n, 4, 4, generator=_gen(1)),
        mask=_all_valid(n, 4, 4),
        mu_post=mu,
        logvar_post=logvar,
        **kwargs,
    )


def test_active_units_counts_dimensions_whose_posterior_mean_varies() -> None:
    g = _gen()
    n = 50
    mu = torch.cat([torch.randn(n, 3, generator=g), 0.001 * torch.randn(n, 5, generator=g)], dim=1)
    data = _latent_case(mu, torch.zeros(n, 8))
    assert _metric(data, "active_units") == 3.0


def test_raw_kl_on_constructed_posteriors() -> None:
    n = 4
    # Per dimension against N(0, 1): mu = 1 gives 0.5 nats, mu = 0 with var = 1 gives 0,
    # mu = 0 with logvar = log 4 gives (log(1/4) + 4 - 1) / 2.
    mu = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3)
    logvar = torch.tensor([[0.0, 0.0, math.log(4.0)]]).expand(n, 3)
    third = 0.5 * (-math.log(4.0) + 3.0)
    m = compute_metrics(_latent_case(mu, logvar), ["kl_raw", "kl_raw_min_dim", "kl_raw_median_dim"])
    assert m["kl_raw"] == pytest.approx(0.5 + third)
    assert m["kl_raw_min_dim"] == pytest.approx(0.0)
    assert m["kl_raw_median_dim"] == pytest.approx(0.5)
    assert compute_diagnostics(_latent_case(mu, logvar))["kl_per_dim"] == pytest.approx([0.5, 0.0, third])


def test_raw_kl_against_a_learned_prior_matches_torch_distributions() -> None:
    g = _gen()
    n, d = 6, 5
    mu, logvar = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    p_mu, p_logvar = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(p_mu, (0.5 * p_logvar).exp())
    expected = torch.distributions.kl_divergence(q, p).sum(dim=1).mean().item()
    data = _latent_case(mu, logvar, prior_mu=p_mu, prior_logvar=p_logvar)
    assert _metric(data, "kl_raw") == pytest.approx(expected, rel=1e-6)


def test_z_usage() -> None:
    g = _gen()
    obs = _rain((3, 8, 8), g)
    samples = _rain((3, 2, 8, 8), g)
    mask = _all_valid(3, 8, 8)
    ignored = EvalData(
        samples=samples, obs=obs, mask=mask, recon_post=samples[:, 0], recon_prior=samples[:, 0]
    )
    used = EvalData(samples=samples, obs=obs, mask=mask, recon_post=obs.clone(), recon_prior=samples[:, 0])
    perfect = EvalData(samples=samples, obs=obs, mask=mask, recon_post=obs.clone(), recon_prior=obs.clone())
    assert _metric(ignored, "z_usage") == 0.0
    assert _metric(used, "z_usage") > 0.5
    assert _metric(perfect, "z_usage") == 0.0


def test_mass_bias_of_scaled_samples() -> None:
    g = _gen()
    obs = _rain((4, 8, 8), g) + 0.5
    mask = torch.rand(4, 8, 8, generator=g) > 0.3
    data = EvalData(samples=1.1 * obs[:, None].expand(4, 3, 8, 8), obs=obs, mask=mask)
    assert _metric(data, "mass_bias") == pytest.approx(0.1, abs=1e-6)


def test_compute_metrics_returns_every_registered_metric_as_a_finite_float() -> None:
    m = compute_metrics(_full_case())
    assert list(m) == list(METRICS)
    for name, value in m.items():
        assert isinstance(value, float) and math.isfinite(value), name


def test_compute_metrics_skips_metrics_without_inputs_and_computes_only_what_is_asked() -> None:
    g = _gen()
    data = EvalData(samples=_rain((2, 2, 6, 6), g), obs=_rain((2, 6, 6), g), mask=_all_valid(2, 6, 6))
    m = compute_metrics(data)
    assert "z_usage" not in m and "kl_raw" not in m and "active_units" not in m
    assert "kl_per_dim" not in compute_diagnostics(data)
    assert list(compute_metrics(data, names=["diversity"])) == ["diversity"]
    with pytest.raises(ValueError, match="recon_post"):
        compute_metrics(data, ["z_usage"])


def test_get_metric_names_the_known_metrics() -> None:
    assert get_metric("crps").direction == "minimize"
    with pytest.raises(KeyError, match="diversity"):
        get_metric("nope")
    with pytest.raises(KeyError, match="nope"):
        compute_metrics(_full_case(), ["nope"])


def test_registry_names_are_snake_case_and_directions_valid() -> None:
    for name, metric in METRICS.items():
        assert name == metric.name and name.isidentifier() and name == name.lower()
        assert metric.direction in ("maximize", "minimize", None)
        assert metric.description


def test_collapse_probe_agrees_with_compute_metrics() -> None:
    data = _full_case()
    assert data.recon_post is not None and data.recon_prior is not None
    probe = collapse_probe(data.samples, data.obs, data.mask, data.recon_post, data.recon_prior)
    assert probe == pytest.approx(compute_metrics(data, ["spread_norm", "z_usage"]))


def test_eval_data_rejects_a_single_sample_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="K >= 2"):
        EvalData(samples=torch.zeros(2, 1, 4, 4), obs=torch.zeros(2, 4, 4), mask=_all_valid(2, 4, 4))
    with pytest.raises(ValueError, match="EvalData.obs"):
        EvalData(samples=torch.zeros(2, 3, 4, 4), obs=torch.zeros(2, 4, 5), mask=_all_valid(2, 4, 4))
    with pytest.raises(ValueError, match="bool"):
        EvalData(samples=torch.zeros(2, 3, 4, 4), obs=torch.zeros(2, 4, 4), mask=torch.ones(2, 4, 4))
