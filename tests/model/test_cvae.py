from __future__ import annotations

import io
import json
import math

import pytest
import torch
from scipy.stats import kstest, truncnorm

from model.config import LossConfig, ModelConfig, Normalization
from model.cvae import CVAE, DecoderOutput, correlated_noise
from model.losses import compute_losses
from model.transform import Normalizer

DRY = -0.7
# (height, width, factor): square, and non-square with the real data's factor of 12.
GRIDS = [(16, 16, 4), (24, 36, 12)]


def _model(
    height: int = 16,
    width: int = 16,
    factor: int = 4,
    *,
    output: str = "regression",
    prior: str = "standard",
    n_static: int = 2,
    seed: int = 0,
    wet_value: float | None = None,
) -> CVAE:
    torch.manual_seed(seed)
    cfg = ModelConfig(latent_dim=6, channels=8, n_res_blocks=1, output=output, prior=prior)
    return CVAE(
        cfg,
        height=height,
        width=width,
        factor=factor,
        n_predictors=2,
        n_static=n_static,
        dry_value=DRY,
        wet_value=wet_value,
    )


def _inputs(
    model: CVAE, batch: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    fine = torch.randn(batch, 1, model.height, model.width, generator=g)
    coarse = torch.randn(batch, 2, model.coarse_height, model.coarse_width, generator=g)
    static = torch.randn(model.n_static, model.height, model.width, generator=g) if model.n_static else None
    return fine, coarse, static


@pytest.mark.parametrize("prior", ["standard", "learned"])
@pytest.mark.parametrize("output", ["regression", "hurdle", "copula"])
@pytest.mark.parametrize("grid", GRIDS)
def test_shapes(grid: tuple[int, int, int], output: str, prior: str) -> None:
    h, w, f = grid
    model = _model(h, w, f, output=output, prior=prior)
    fine, coarse, static = _inputs(model)
    out = model(fine, coarse, static, generator=torch.Generator().manual_seed(0))
    for t in (out.mu, out.logvar, out.prior_mu, out.prior_logvar, out.z):
        assert t.shape == (3, 6) and t.dtype == torch.float32
    assert out.decoded.field.shape == out.decoded.mean.shape == (3, 1, h, w)
    assert (out.decoded.wet_logit is None) == (output == "regression")
    if output != "regression":
        assert out.decoded.wet_logit.shape == (3, 1, h, w)
    assert (out.decoded.log_sigma is None) == (output != "copula")
    assert model.sample(coarse, static, 4).shape == (3, 4, h, w)
    assert model.reconstruct_mean(fine, coarse, static).shape == (3, 1, h, w)


@pytest.mark.parametrize(
    ("height", "width", "factor", "pooled"),
    [
        (16, 16, 2, (2, 2)),  # the stages leave 2x2: a finer coarse grid would repeat features
        (16, 16, 4, (2, 2)),
        (16, 16, 8, (2, 2)),
        (16, 16, 16, (1, 1)),  # a coarser coarse grid is pooled to
        (20, 12, 4, (3, 2)),
        (24, 36, 12, (2, 3)),
    ],
)
def test_the_grid_encoder_pools_to_the_coarser_of_its_own_grid_and_the_coarse_grid(
    height: int, width: int, factor: int, pooled: tuple[int, int]
) -> None:
    model = _model(height, width, factor)
    pool = next(m for m in model.encoder if isinstance(m, torch.nn.AdaptiveAvgPool2d))
    assert tuple(pool.output_size) == pooled
    fine, coarse, static = _inputs(model)
    assert model(fine, coarse, static).mu.shape == (3, 6)


def test_without_static_fields() -> None:
    model = _model(n_static=0)
    fine, coarse, static = _inputs(model)
    assert static is None
    assert model(fine, coarse, None).decoded.field.shape == (3, 1, 16, 16)
    assert model.sample(coarse, torch.zeros(0, 16, 16), 2).shape == (3, 2, 16, 16)


def test_static_fields_reach_the_output() -> None:
    model = _model()
    fine, coarse, static = _inputs(model)
    z = torch.randn(3, 6)
    a = model.decode(z, coarse, static).field
    b = model.decode(z, coarse, static + 1.0).field
    assert not torch.allclose(a, b)


def test_standard_prior_is_zero_and_parameter_free() -> None:
    model = _model(prior="standard")
    _, coarse, static = _inputs(model)
    mu, logvar = model.prior(coarse, static)
    assert torch.all(mu == 0) and torch.all(logvar == 0)
    learned = _model(prior="learned")
    n_std = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in learned.parameters()) > n_std


def test_learned_prior_depends_on_coarse_input_after_training_step() -> None:
    model = _model(prior="learned")
    fine, coarse, static = _inputs(model)
    opt = torch.optim.SGD(model.prior_net.parameters(), lr=0.1)
    out = model(fine, coarse, static)
    cfg = LossConfig(kl_mode="plain")
    norm = Normalizer(Normalization(), "log1p")
    compute_losses(
        out, fine, torch.ones_like(fine, dtype=torch.bool), None, cfg=cfg, normalizer=norm, factor=4, beta=1.0
    ).total.backward()
    opt.step()
    mu, _ = model.prior(coarse, static)
    assert not torch.allclose(mu[0], mu[1])


def test_logvar_is_clamped() -> None:
    model = _model()
    fine, coarse, static = _inputs(model)
    with torch.no_grad():
        model.encoder[-1].bias.fill_(1e4)
    _, logvar = model.encode(fine, coarse, static)
    assert torch.all(logvar == 20.0)


def test_sample_is_repeatable_with_a_generator_and_differs_across_generators() -> None:
    model = _model(prior="learned")
    _, coarse, static = _inputs(model)
    a = model.sample(coarse, static, 3, generator=torch.Generator().manual_seed(11))
    b = model.sample(coarse, static, 3, generator=torch.Generator().manual_seed(11))
    c = model.sample(coarse, static, 3, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[:, 0], a[:, 1])


def test_sample_at_zero_temperature_decodes_the_prior_mean() -> None:
    model = _model()
    _, coarse, static = _inputs(model)
    s = model.sample(coarse, static, 3, temperature=0.0)
    torch.testing.assert_close(s[:, 0], s[:, 2])
    expected = model.decode(torch.zeros(3, 6), coarse, static).field[:, 0]
    torch.testing.assert_close(s[:, 1], expected)


def test_sample_keeps_each_coarse_input_with_its_samples() -> None:
    model = _model(prior="learned")
    torch.nn.init.normal_(model.prior_net[-1].weight)
    _, coarse, static = _inputs(model)
    both = model.sample(coarse[:2], static, 2, temperature=0.0)
    alone = model.sample(coarse[1:2], static, 2, temperature=0.0)
    torch.testing.assert_close(both[1], alone[0])


def test_forward_is_repeatable_with_a_generator() -> None:
    model = _model()
    fine, coarse, static = _inputs(model)
    a = model(fine, coarse, static, generator=torch.Generator().manual_seed(3))
    b = model(fine, coarse, static, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.z, b.z) and torch.equal(a.decoded.field, b.decoded.field)
    torch.testing.assert_close(
        a.z, a.mu + torch.exp(0.5 * a.logvar) * torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    )


def test_hurdle_field_is_dry_exactly_where_wet_probability_is_below_half() -> None:
    model = _model(output="hurdle")
    fine, coarse, static = _inputs(model)
    dec = model(fine, coarse, static).decoded
    p = torch.sigmoid(dec.wet_logit)
    dry, wet = p < 0.5, p > 0.5
    assert dry.any() and wet.any()
    assert torch.all(dec.field[dry] == DRY)
    assert torch.equal(dec.field[wet], dec.mean[wet])


def test_model_args_round_trip_through_json_and_a_weights_only_checkpoint() -> None:
    model = _model(24, 36, 12, output="copula", prior="learned", wet_value=-0.3)
    fine, coarse, static = _inputs(model)
    buf = io.BytesIO()
    torch.save({"args": json.loads(json.dumps(model.model_args())), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    rebuilt = CVAE.from_args(ckpt["args"])
    rebuilt.load_state_dict(ckpt["model"])
    assert rebuilt.model_args() == model.model_args()
    a = model.sample(coarse, static, 2, generator=torch.Generator().manual_seed(1))
    b = rebuilt.sample(coarse, static, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_from_args_rejects_bad_arguments() -> None:
    args = _model().model_args()
    with pytest.raises(ValueError, match="model_args: .*'height'"):
        CVAE.from_args({k: v for k, v in args.items() if k != "height"})
    with pytest.raises(ValueError, match="model.output"):
        CVAE.from_args({**args, "model": {**args["model"], "output": "gamma"}})


def test_constructor_and_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="divisor"):
        _model(24, 36, 7)
    model = _model()
    fine, coarse, static = _inputs(model)
    with pytest.raises(ValueError, match="coarse: expected"):
        model(fine, coarse[:, :1], static)
    with pytest.raises(ValueError, match="static: expected"):
        model(fine, coarse, None)


def test_bf16_autocast_keeps_latents_and_losses_float32() -> None:
    model = _model(24, 36, 12, output="hurdle", prior="learned")
    fine, coarse, static = _inputs(model)
    norm = Normalizer(Normalization(target_mean=0.5, target_std=0.8), "log1p")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(fine, coarse, static)
        terms = compute_losses(
            out,
            fine,
            torch.ones_like(fine, dtype=torch.bool),
            torch.rand(3, 1, 2, 3),
            cfg=LossConfig(),
            normalizer=norm,
            factor=12,
            beta=0.05,
        )
    assert out.mu.dtype == out.logvar.dtype == out.z.dtype == torch.float32
    assert out.decoded.field.dtype == out.decoded.mean.dtype == out.decoded.wet_logit.dtype == torch.float32
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("output", ["regression", "hurdle", "copula"])
def test_a_short_optimisation_lowers_the_loss(output: str) -> None:
    model = _model(output=output, prior="learned")
    g = torch.Generator().manual_seed(0)
    norm = Normalizer(
        Normalization(target_mean=0.5, target_std=0.8, wet_mean_intensity=4.0, tail_threshold=15.0), "log1p"
    )
    rain = torch.rand(6, 1, 16, 16, generator=g) * 20.0 * (torch.rand(6, 1, 16, 16, generator=g) > 0.5)
    fine = norm.to_model(rain)
    mask = torch.ones_like(fine, dtype=torch.bool)
    coarse_mm = torch.nn.functional.avg_pool2d(rain, 4)
    coarse = torch.cat([coarse_mm, torch.randn(coarse_mm.shape, generator=g)], dim=1)
    static = torch.randn(2, 16, 16, generator=g)
    cfg = LossConfig()

    def loss() -> torch.Tensor:
        out = model(fine, coarse, static, generator=torch.Generator().manual_seed(5))
        return compute_losses(
            out, fine, mask, coarse_mm, cfg=cfg, normalizer=norm, factor=4, beta=cfg.beta_kl
        ).total

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = loss().item()
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        end = loss().item()
    assert end < 0.7 * start


# --- the copula output ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1.0, 2.5])
def test_correlated_noise_has_unit_variance_and_a_gaussian_correlation(length: float) -> None:
    u = correlated_noise((64, 1, 48, 48), length, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert abs(u.var().item() - 1.0) < 0.05 and abs(u.mean().item()) < 0.05
    # A Gaussian filter of sd l gives a Gaussian correlation of sd l * sqrt(2).
    for lag in (1, 2):
        corr = (u * u.roll(lag, dims=-1)).mean().item() / u.var().item()
        assert corr == pytest.approx(math.exp(-(lag**2) / (4 * length**2)), abs=0.03)


def _copula_draw(logit: float, mean: float, log_sigma: float, wet_value: float | None) -> torch.Tensor:
    model = _model(32, 32, 4, output="copula", wet_value=wet_value)
    shape = (200, 1, 32, 32)
    decoded = DecoderOutput(
        field=torch.zeros(shape),
        mean=torch.full(shape, mean),
        wet_logit=torch.full(shape, logit),
        log_sigma=torch.full(shape, log_sigma),
    )
    return model.draw(decoded, torch.Generator().manual_seed(0))


def test_copula_draws_each_cell_from_its_truncated_distribution() -> None:
    p, mean, sigma, t = 0.3, 0.0, 0.8, -0.5
    field = _copula_draw(math.log(p / (1 - p)), mean, math.log(sigma), t)
    wet = field != DRY
    assert wet.float().mean().item() == pytest.approx(p, abs=0.02)
    values = field[wet].double()
    assert values.min().item() >= t
    expected = truncnorm((t - mean) / sigma, math.inf, loc=mean, scale=sigma)
    assert kstest(values[::7].numpy(), expected.cdf).statistic < 0.02
    # One field draws occurrence and intensity: wet neighbours are alike, and rain areas are
    # patches, not salt and pepper.
    both = wet[..., 1:] & wet[..., :-1]
    a, b = field[..., 1:][both], field[..., :-1][both]
    assert torch.corrcoef(torch.stack([a, b]))[0, 1].item() > 0.5
    assert (wet[..., 1:] == wet[..., :-1]).float().mean().item() > 0.8


def test_copula_without_a_threshold_draws_the_whole_gaussian() -> None:
    field = _copula_draw(30.0, 1.0, math.log(0.5), None)
    assert (field != DRY).all()
    assert field.mean().item() == pytest.approx(1.0, abs=0.02)
    assert field.std().item() == pytest.approx(0.5, abs=0.02)


def test_copula_samples_are_repeatable_and_differ_from_the_median_field() -> None:
    model = _model(output="copula", wet_value=-0.5)
    _, coarse, static = _inputs(model)
    draws, medians = model.sample_with_medians(coarse, static, 3, generator=torch.Generator().manual_seed(2))
    again = model.sample(coarse, static, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(draws, again)
    assert not torch.equal(draws, medians)
    hurdle = _model(output="hurdle")
    draws, medians = hurdle.sample_with_medians(coarse, static, 3)
    assert torch.equal(draws, medians)
