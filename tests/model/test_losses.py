from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import truncnorm
from torch.distributions import Normal, kl_divergence

from model.config import LossConfig, Normalization
from model.cvae import DecoderOutput, ForwardOutput
from model.losses import (
    compute_losses,
    gradient_loss,
    intensity_weights,
    kl_per_dim,
    kl_term,
    kl_warmup_factor,
    mass_loss,
)
from model.transform import Normalizer

STATS = Normalization(target_mean=0.6, target_std=0.9, wet_mean_intensity=5.0, tail_threshold=20.0)
NORM = Normalizer(STATS, "log1p")
CFG = LossConfig(scale=20.0, w_min=0.1, w_max=3.0, tail_boost=2.0, lambda_grad=0.5, lambda_mass=0.01)
FACTOR = 4


def _forward_output(
    mean: torch.Tensor,
    wet_logit: torch.Tensor | None = None,
    latent: int = 3,
    log_sigma: torch.Tensor | None = None,
) -> ForwardOutput:
    b = mean.shape[0]
    g = torch.Generator().manual_seed(7)
    mu = torch.randn(b, latent, generator=g)
    logvar = torch.randn(b, latent, generator=g)
    zeros = torch.zeros(b, latent)
    field = mean if wet_logit is None else torch.where(wet_logit > 0, mean, NORM.zero)
    return ForwardOutput(
        decoded=DecoderOutput(field=field, mean=mean, wet_logit=wet_logit, log_sigma=log_sigma),
        mu=mu,
        logvar=logvar,
        prior_mu=zeros,
        prior_logvar=zeros.clone(),
        z=mu,
    )


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine field (model space), mask with an invalid corner, coarse mass (mm/day)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(2, 1, 8, 8, generator=g) * 30.0 * (torch.rand(2, 1, 8, 8, generator=g) > 0.4)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, :3, :3] = False
    coarse_mass = torch.rand(2, 1, 2, 2, generator=g) * 10.0
    return NORM.to_model(y), mask, coarse_mass


# --- KL -------------------------------------------------------------------------------------------


def test_kl_per_dim_standard_prior_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 7, generator=g) * 2, torch.randn(5, 7, generator=g) * 2
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_per_dim(mu, logvar), expected, atol=1e-5, rtol=1e-5)


def test_kl_per_dim_diagonal_prior_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    mu, logvar, pm, plv = (torch.randn(5, 7, generator=g) * 2 for _ in range(4))
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(pm, (0.5 * plv).exp()))
    torch.testing.assert_close(kl_per_dim(mu, logvar, pm, plv), expected, atol=1e-5, rtol=1e-5)


def test_kl_per_dim_is_float32_for_bf16_inputs() -> None:
    mu = torch.randn(2, 3).bfloat16()
    assert kl_per_dim(mu, torch.zeros_like(mu)).dtype == torch.float32


def test_kl_per_dim_rejects_half_a_prior() -> None:
    with pytest.raises(ValueError, match="prior_mu and prior_logvar"):
        kl_per_dim(torch.zeros(1, 2), torch.zeros(1, 2), prior_mu=torch.zeros(1, 2))


def test_kl_term_values_on_a_constructed_case() -> None:
    kl = torch.tensor([[0.1, 2.0], [0.3, 0.0]])
    assert kl_term(kl, "plain", 0.5).item() == pytest.approx(1.2)  # (2.1 + 0.3) / 2
    assert kl_term(kl, "free_bits_sample", 0.5).item() == pytest.approx(1.75)  # (2.5 + 1.0) / 2
    assert kl_term(kl, "free_bits_batch", 0.5).item() == pytest.approx(1.5)  # max(0.2, .5) + max(1, .5)


def test_kl_term_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="kl_mode"):
        kl_term(torch.zeros(1, 1), "free_bits", 0.5)


def _kl_grads(mode: str, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``mode`` and of the plain term; dim 0 is far above the floor, dim 1 below it."""
    base_mu = torch.tensor([[2.0, 0.05], [1.5, -0.05], [-2.5, 0.02]])
    base_logvar = torch.tensor([[0.3, 0.1], [-0.2, -0.1], [0.1, 0.05]])
    grads = []
    for m in (mode, "plain"):
        mu, logvar = base_mu.clone().requires_grad_(), base_logvar.clone().requires_grad_()
        kl_term(kl_per_dim(mu, logvar), m, floor).backward()
        grads += [mu.grad, logvar.grad]
    return grads[0], grads[1], grads[2], grads[3]


@pytest.mark.parametrize("mode", ["free_bits_sample", "free_bits_batch"])
def test_free_bits_zero_gradient_below_floor_and_plain_gradient_above(mode: str) -> None:
    g_mu, g_lv, plain_mu, plain_lv = _kl_grads(mode, floor=0.5)
    assert torch.all(g_mu[:, 1] == 0) and torch.all(g_lv[:, 1] == 0)
    assert torch.all(plain_mu[:, 1] != 0)
    torch.testing.assert_close(g_mu[:, 0], plain_mu[:, 0])
    torch.testing.assert_close(g_lv[:, 0], plain_lv[:, 0])


def test_plain_kl_never_clamps() -> None:
    g_mu, g_lv, plain_mu, plain_lv = _kl_grads("plain", floor=100.0)
    assert torch.all(g_mu != 0)
    torch.testing.assert_close(g_mu, plain_mu)
    torch.testing.assert_close(g_lv, plain_lv)


def test_kl_warmup_factor_is_linear_and_capped() -> None:
    assert kl_warmup_factor(0.0, 4) == 0.0
    assert kl_warmup_factor(1.0, 4) == pytest.approx(0.25)
    assert kl_warmup_factor(6.0, 4) == 1.0
    assert kl_warmup_factor(0.0, 0) == 1.0


# --- reconstruction -------------------------------------------------------------------------------


def test_intensity_weights_for_dry_typical_heavy_and_tail_cells() -> None:
    y = torch.tensor([0.0, 5.0, 12.0, 18.0, 25.0])
    expected = torch.tensor([0.1, 1.0, 0.1 + 0.9 * 12.0 / 5.0, 3.0, 6.0])
    torch.testing.assert_close(intensity_weights(y, CFG, STATS), expected)


def test_regression_recon_is_the_weighted_masked_squared_error() -> None:
    fine = NORM.to_model(torch.tensor([0.0, 5.0, 25.0, 1.0]).view(1, 1, 2, 2))
    mask = torch.tensor([True, True, True, False]).view(1, 1, 2, 2)
    mean = fine + torch.tensor([0.5, -1.0, 2.0, 9.0]).view(1, 1, 2, 2)
    terms = compute_losses(
        _forward_output(mean), fine, mask, None, cfg=CFG, normalizer=NORM, factor=2, beta=0.0
    )
    expected = 20.0 * (0.1 * 0.25 + 1.0 * 1.0 + 6.0 * 4.0) / 3
    assert terms.recon.item() == pytest.approx(expected, rel=1e-5)


def test_hurdle_recon_is_bce_plus_wet_cell_intensity_error() -> None:
    fine = NORM.to_model(torch.tensor([0.0, 5.0, 25.0, 1.0]).view(1, 1, 2, 2))
    mask = torch.tensor([True, True, True, False]).view(1, 1, 2, 2)
    mean = fine + torch.tensor([0.5, -1.0, 2.0, 9.0]).view(1, 1, 2, 2)
    logit = torch.tensor([-1.0, 2.0, 0.5, 3.0]).view(1, 1, 2, 2)
    terms = compute_losses(
        _forward_output(mean, logit), fine, mask, None, cfg=CFG, normalizer=NORM, factor=2, beta=0.0
    )
    target = torch.tensor([0.0, 1.0, 1.0])
    bce = F.binary_cross_entropy_with_logits(logit.flatten()[:3], target)
    intensity = (1.0 * 1.0 + 6.0 * 4.0) / 2
    assert terms.recon.item() == pytest.approx(20.0 * (bce.item() + intensity), rel=1e-5)


def test_copula_recon_is_bce_plus_the_truncated_gaussian_likelihood_of_wet_cells() -> None:
    rain = [0.0, 5.0, 25.0, 0.05, 1.0]
    fine = NORM.to_model(torch.tensor(rain).view(1, 1, 1, 5))
    mask = torch.tensor([True, True, True, True, False]).view(1, 1, 1, 5)
    mean = fine + torch.tensor([0.5, -1.0, 2.0, 0.3, 9.0]).view(1, 1, 1, 5)
    logit = torch.tensor([-1.0, 2.0, 0.5, 0.2, 3.0]).view(1, 1, 1, 5)
    log_sigma = torch.tensor([0.1, -0.5, 0.3, 0.0, 1.0]).view(1, 1, 1, 5)
    terms = compute_losses(
        _forward_output(mean, logit, log_sigma=log_sigma),
        fine,
        mask,
        None,
        cfg=CFG,
        normalizer=NORM,
        factor=1,
        beta=0.0,
        wet_threshold=0.1,
    )
    bce = F.binary_cross_entropy_with_logits(logit.flatten()[:4], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    t = NORM.to_model(torch.tensor(0.1)).item()
    nll = [
        -truncnorm.logpdf(fine.flatten()[i].item(), (t - m) / s, math.inf, loc=m, scale=s)
        for i in (1, 2)
        for m, s in [(mean.flatten()[i].item(), math.exp(log_sigma.flatten()[i].item()))]
    ]
    # The likelihood omits log(sqrt(2 pi)), a constant.
    expected = 20.0 * (bce.item() + sum(nll) / 2 - 0.5 * math.log(2 * math.pi))
    assert terms.recon.item() == pytest.approx(expected, rel=1e-5)


def test_copula_mass_uses_the_expected_amount_of_its_intensity_distribution() -> None:
    mean, sigma = torch.full((1, 1, 4, 4), 0.8), torch.full((1, 1, 4, 4), 0.6)
    draws = NORM.to_mm(
        mean + sigma * torch.randn(400_000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    )
    expected = NORM.expected_mm(mean, sigma)
    assert expected[0, 0, 0, 0].item() == pytest.approx(draws.mean().item(), rel=0.01)
    logit = torch.zeros(1, 1, 4, 4)  # wet probability 0.5
    t = compute_losses(
        _forward_output(mean, logit, log_sigma=sigma.log()),
        mean,
        torch.ones(1, 1, 4, 4, dtype=torch.bool),
        0.5 * expected[..., :1, :1],
        cfg=CFG,
        normalizer=NORM,
        factor=4,
        beta=0.0,
    )
    assert t.mass.item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("hurdle", [False, True])
def test_masked_cells_change_no_loss_term(hurdle: bool) -> None:
    fine, mask, coarse_mass = _batch()
    g = torch.Generator().manual_seed(3)
    mean = fine + torch.randn(fine.shape, generator=g)
    logit = torch.randn(fine.shape, generator=g) if hurdle else None

    def terms(mean: torch.Tensor, logit: torch.Tensor | None, fine: torch.Tensor) -> list[float]:
        t = compute_losses(
            _forward_output(mean, logit),
            fine,
            mask,
            coarse_mass,
            cfg=CFG,
            normalizer=NORM,
            factor=FACTOR,
            beta=0.1,
        )
        return [t.total.item(), t.recon.item(), t.grad.item(), t.mass.item()]

    before = terms(mean, logit, fine)
    mean2, fine2 = mean.clone(), fine.clone()
    mean2[~mask] = 50.0
    fine2[~mask] = float("nan")
    logit2 = None
    if logit is not None:
        logit2 = logit.clone()
        logit2[~mask] = 20.0
    assert terms(mean2, logit2, fine2) == pytest.approx(before, rel=1e-6)
    mean3 = mean.clone()
    mean3[mask] += 0.5
    assert terms(mean3, logit, fine) != pytest.approx(before, rel=1e-6)


def test_masked_cells_get_no_gradient_even_when_the_target_is_nan() -> None:
    fine, mask, coarse_mass = _batch()
    fine = fine.clone()
    fine[~mask] = float("nan")
    mean = torch.zeros_like(fine, requires_grad=True)
    terms = compute_losses(
        _forward_output(mean), fine, mask, coarse_mass, cfg=CFG, normalizer=NORM, factor=FACTOR, beta=0.1
    )
    terms.total.backward()
    assert torch.isfinite(mean.grad).all()
    assert torch.all(mean.grad[~mask] == 0)
    assert torch.any(mean.grad[mask] != 0)


# --- gradient and mass ----------------------------------------------------------------------------


def test_gradient_loss_zero_for_a_perfect_prediction_and_positive_otherwise() -> None:
    fine, mask, _ = _batch()
    assert gradient_loss(fine, fine, mask).item() == 0.0
    bumped = fine.clone()
    bumped[0, 0, 5, 5] += 1.0
    # One cell off by 1 spoils its four neighbouring pairs; each image has 2 * (3*4 + 5*7) valid pairs.
    assert gradient_loss(bumped, fine, mask).item() == pytest.approx(4.0 / 188)


def test_gradient_loss_ignores_pairs_with_an_invalid_cell() -> None:
    fine, mask, _ = _batch()
    bumped = fine.clone()
    bumped[0, 0, 0, 0] += 1.0
    assert gradient_loss(bumped, fine, mask).item() == 0.0


def _mass_terms(
    mean: torch.Tensor, fine: torch.Tensor, mask: torch.Tensor, coarse_mass: torch.Tensor, **kw
) -> float:
    cfg = dataclasses.replace(CFG, **kw)
    t = compute_losses(
        _forward_output(mean), fine, mask, coarse_mass, cfg=cfg, normalizer=NORM, factor=FACTOR, beta=0.0
    )
    return t.mass.item()


def test_mass_zero_when_block_means_equal_coarse_mass_and_positive_otherwise() -> None:
    fine, mask, _ = _batch()
    g = torch.Generator().manual_seed(5)
    gen_mm = torch.rand(fine.shape, generator=g) * 20.0
    m = mask.float()
    block_mean = F.avg_pool2d(m * gen_mm, FACTOR) / F.avg_pool2d(m, FACTOR)
    mean = NORM.to_model(gen_mm)
    assert _mass_terms(mean, fine, mask, block_mean) == pytest.approx(0.0, abs=1e-8)
    assert _mass_terms(mean, fine, mask, block_mean + 2.0) == pytest.approx(4.0, rel=1e-4)


def test_mass_does_not_depend_on_the_observed_fine_field() -> None:
    fine, mask, coarse_mass = _batch()
    mean = fine + 0.3
    other_fine, _, _ = _batch(seed=9)
    a = _mass_terms(mean, fine, mask, coarse_mass)
    assert a > 0
    assert _mass_terms(mean, other_fine, mask, coarse_mass) == a


def test_mass_zero_without_weight_or_coarse_mass() -> None:
    fine, mask, coarse_mass = _batch()
    assert _mass_terms(fine + 1.0, fine, mask, coarse_mass, lambda_mass=0.0) == 0.0
    assert _mass_terms(fine + 1.0, fine, mask, None) == 0.0


def test_hurdle_mass_uses_the_expected_amount() -> None:
    gen_mm = torch.full((1, 1, 4, 4), 8.0)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    logit = torch.zeros(1, 1, 4, 4)  # wet probability 0.5: the expected amount is 4 mm/day
    out = _forward_output(NORM.to_model(gen_mm), logit)
    t = compute_losses(
        out,
        NORM.to_model(gen_mm),
        mask,
        torch.full((1, 1, 1, 1), 4.0),
        cfg=CFG,
        normalizer=NORM,
        factor=4,
        beta=0.0,
    )
    assert t.mass.item() == pytest.approx(0.0, abs=1e-8)


def test_mass_loss_skips_coarse_cells_without_valid_fine_cells() -> None:
    gen = torch.ones(1, 1, 4, 8)
    mask = torch.ones(1, 1, 4, 8, dtype=torch.bool)
    mask[..., :4] = False
    coarse_mass = torch.tensor([[[[float("nan"), 3.0]]]])
    gen.requires_grad_()
    loss = mass_loss(gen, coarse_mass, mask, 4)
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    assert torch.all(gen.grad[..., :4] == 0)
    torch.testing.assert_close(gen.grad[..., 4:], torch.full((1, 1, 4, 4), 2 * (1.0 - 3.0) / 16))


# --- total ----------------------------------------------------------------------------------------


def test_total_combines_the_terms_and_kl_per_dim_is_detached() -> None:
    fine, mask, coarse_mass = _batch()
    out = _forward_output(fine + torch.randn(fine.shape, generator=torch.Generator().manual_seed(2)))
    out.mu.requires_grad_()
    t = compute_losses(out, fine, mask, coarse_mass, cfg=CFG, normalizer=NORM, factor=FACTOR, beta=0.3)
    assert t.grad.item() > 0 and t.mass.item() > 0
    expected = t.recon + 0.3 * t.kl + CFG.lambda_grad * t.grad + CFG.lambda_mass * t.mass
    torch.testing.assert_close(t.total, expected)
    assert t.kl.item() >= t.kl_raw.item()
    torch.testing.assert_close(t.kl_per_dim.sum(), t.kl_raw.detach())
    assert not t.kl_per_dim.requires_grad and t.kl_per_dim.shape == (3,)
    assert all(v.dim() == 0 for v in (t.total, t.recon, t.kl, t.kl_raw, t.grad, t.mass))


@pytest.mark.parametrize("transform", ["log1p", "none"])
def test_the_scalar_model_values_agree_with_to_model(transform: str) -> None:
    norm = Normalizer(STATS, transform)
    mm = [0.0, 0.1, 2.5, 40.0]
    expected = norm.to_model(torch.tensor(mm, dtype=torch.float64)).tolist()
    assert [norm.model_value(x) for x in mm] == pytest.approx(expected)
    assert norm.zero == pytest.approx(expected[0])
