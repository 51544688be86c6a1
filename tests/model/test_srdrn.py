from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from model.config import Config, LossConfig, Normalization, config_from_dict
from model.data import Dataset, load_data
from model.srdrn import (
    SRDRN,
    GeneratedPairs,
    _Batches,
    _gather,
    build_srdrn,
    predict,
    srdrn_loss,
    train_srdrn,
)
from tests.conftest import tiny_config_dict

CPU = torch.device("cpu")
STATS = Normalization(wet_mean_intensity=5.0, tail_threshold=20.0)


def tiny_config(**overrides: Any) -> Config:
    """A 16x16 synthetic grid (factor 4) with a land mask and a static field; a tiny SRDRN."""
    base = {
        "data.synthetic.with_mask": True,
        "data.mask_var": "mask",
        "data.static_vars": ["elevation"],
        "downstream.channels": 8,
        "downstream.n_res_blocks": 2,
        "downstream.batch_size": 8,
        "downstream.steps": 30,
        "downstream.val_checks": 5,
        "downstream.lr": 3e-3,
    }
    return config_from_dict(tiny_config_dict(1, {**base, **overrides}), "tiny")


@pytest.fixture(scope="module")
def data(cache: Path) -> Dataset:
    return load_data(tiny_config().data)


def pool_of(data: Dataset, m: int = 20) -> GeneratedPairs:
    """Generated-like pairs: observed fields of random training days, scaled and noised."""
    g = torch.Generator().manual_seed(3)
    day = torch.randint(len(data.train), (m,), generator=g)
    obs = data.normalizer.to_mm(data.train.fine[day, 0])
    return GeneratedPairs(day=day, fine_mm=obs * 1.5 + torch.rand(obs.shape, generator=g))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the network ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3, 4, 8, 12])
@pytest.mark.parametrize("upsample", ["pixel_shuffle", "resize_conv"])
@pytest.mark.parametrize("n_static", [0, 2])
def test_output_shape_for_any_factor_on_non_square_grids(factor: int, upsample: str, n_static: int) -> None:
    h, w = 2, 3
    net = SRDRN(3, n_static, factor, channels=4, n_res_blocks=1, upsample=upsample, n_outputs=2)
    static = torch.randn(n_static, h * factor, w * factor)
    out = net(torch.randn(5, 3, h, w), static if n_static else None)
    assert out.shape == (5, 2, h * factor, w * factor)


def test_pixel_shuffle_has_one_stage_per_prime_factor() -> None:
    net = SRDRN(1, 0, 12, channels=4, n_res_blocks=0)
    shuffles = [m.upscale_factor for m in net.modules() if isinstance(m, nn.PixelShuffle)]
    assert sorted(shuffles) == [2, 2, 3]


def test_output_is_non_negative_even_for_a_very_negative_head() -> None:
    net = SRDRN(2, 0, 4, channels=4, n_res_blocks=1)
    with torch.no_grad():
        net.head[-1].bias.fill_(-30.0)
        net.head[-1].weight.mul_(50.0)
    out = net(torch.randn(4, 2, 3, 5) * 10, None)
    assert (out >= 0).all()


def test_static_fields_enter_the_output_and_must_fit_the_grid() -> None:
    torch.manual_seed(0)
    net = SRDRN(2, 1, 4, channels=4, n_res_blocks=1).eval()
    coarse = torch.randn(2, 2, 3, 5)
    a = net(coarse, torch.zeros(1, 12, 20))
    b = net(coarse, torch.ones(1, 12, 20) * 3)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="static: expected shape"):
        net(coarse, torch.zeros(1, 12, 12))
    with pytest.raises(ValueError, match="static: expected shape"):
        net(coarse, None)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="downstream.upsample"):
        SRDRN(2, 0, 4, channels=4, n_res_blocks=1, upsample="bicubic")
    with pytest.raises(ValueError, match="factor"):
        SRDRN(2, 0, 0, channels=4, n_res_blocks=1)


def test_build_srdrn_follows_the_config(data: Dataset) -> None:
    net = build_srdrn(
        tiny_config(**{"downstream.loss": "pinball", "downstream.upsample": "resize_conv"}), data
    )
    assert net.n_outputs == 3 and net.n_static == 1 and net.factor == 4
    assert sum(isinstance(m, nn.Upsample) for m in net.modules()) == 1
    assert build_srdrn(tiny_config(), data).n_outputs == 1
    with pytest.raises(ValueError, match="downstream.quantiles"):
        build_srdrn(tiny_config(**{"downstream.loss": "pinball", "downstream.quantiles": [0.5, 1.0]}), data)


# --- the losses ----------------------------------------------------------------------------------


def test_weighted_mae_against_a_hand_computation() -> None:
    cfg = tiny_config()
    # SRDRN's weighting is its own: the cVAE's (searched) loss section does not change it.
    cfg.loss = LossConfig(w_min=0.5, w_max=1.0, tail_boost=5.0)
    obs = torch.tensor([[[0.0, 5.0, 10.0, 30.0, 7.0]]])  # [1, 1, 5]
    pred = torch.tensor([[[[1.0, 3.0, 10.0, 20.0, 0.0]]]])
    mask = torch.tensor([[[True, True, True, True, False]]])
    # w = clamp(0.1 + 0.9 * y / 5, 0.1, 3) * (2 if y > 20 else 1)
    weights = [0.1, 1.0, 1.9, 3.0 * 2.0]
    errors = [1.0, 2.0, 0.0, 10.0]
    expected = sum(w * e for w, e in zip(weights, errors, strict=True)) / 4
    assert srdrn_loss(pred, obs, mask, cfg, STATS).item() == pytest.approx(expected, rel=1e-6)
    cfg.downstream.tail_boost = 1.0
    weights[3] = 3.0
    expected = sum(w * e for w, e in zip(weights, errors, strict=True)) / 4
    assert srdrn_loss(pred, obs, mask, cfg, STATS).item() == pytest.approx(expected, rel=1e-6)


def test_pinball_loss_against_a_hand_computation_and_its_gradient_sign() -> None:
    cfg = tiny_config(**{"downstream.loss": "pinball", "downstream.quantiles": [0.5, 0.9]})
    obs = torch.tensor([[[4.0, 1.0, 9.0]]])
    pred = torch.tensor([[[[2.0, 3.0, 0.0]], [[5.0, 0.5, 0.0]]]], requires_grad=True)  # [1, 2, 1, 3]
    mask = torch.tensor([[[True, True, False]]])
    # tau 0.5: e = 2, -2 -> 1, 1; tau 0.9: e = -1, 0.5 -> 0.1, 0.45
    expected = ((1.0 + 1.0) / 2 + (0.1 + 0.45) / 2) / 2
    loss = srdrn_loss(pred, obs, mask, cfg, STATS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert pred.grad is not None
    g = pred.grad[0, :, 0]
    # Under the observation the loss falls as the prediction rises, more steeply for a high tau.
    assert g[0, 0] < 0 and g[1, 1] < 0 and g[1, 1] < g[0, 0]
    assert g[0, 1] > 0 and g[1, 0] > 0  # above it, it rises
    assert torch.equal(g[:, 2], torch.zeros(2))


@pytest.mark.parametrize("loss", ["weighted_mae", "pinball"])
def test_masked_cells_change_neither_the_loss_nor_its_gradient(loss: str) -> None:
    cfg = tiny_config(**{"downstream.loss": loss})
    q = 3 if loss == "pinball" else 1
    g = torch.Generator().manual_seed(1)
    obs = torch.rand(2, 4, 5, generator=g) * 20
    pred = torch.rand(2, q, 4, 5, generator=g) * 20
    mask = torch.rand(2, 4, 5, generator=g) > 0.3
    assert not mask.all()

    def loss_and_grad(p: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = p.clone().requires_grad_(True)
        value = srdrn_loss(p, o, mask, cfg, STATS)
        value.backward()
        assert p.grad is not None
        return value.detach(), p.grad

    base, grad = loss_and_grad(pred, obs)
    invalid = ~mask
    obs2 = obs.masked_fill(invalid, float("nan"))
    pred2 = pred.masked_fill(invalid.unsqueeze(1), float("nan"))
    other, grad2 = loss_and_grad(pred2, obs2)
    assert torch.equal(base, other)
    assert torch.equal(grad, grad2)
    assert torch.equal(grad[invalid.unsqueeze(1).expand_as(grad)], torch.zeros(int(invalid.sum()) * q))


def test_loss_checks_the_number_of_heads() -> None:
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="one output head"):
        srdrn_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), mask, tiny_config(), STATS)
    with pytest.raises(ValueError, match="downstream.quantiles"):
        pinball = tiny_config(**{"downstream.loss": "pinball"})
        srdrn_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2), mask, pinball, STATS)


# --- batches -------------------------------------------------------------------------------------


def test_real_batches_do_not_depend_on_the_generated_pairs() -> None:
    def draw(n_pool: int, n_generated: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        batches = _Batches(21, 8, n_pool, n_generated, seed=5, device=CPU)
        real, drawn = zip(*(batches.next() for _ in range(10)), strict=True)
        return list(real), list(drawn)

    plain, none = draw(0, 8)
    assert all(d is None for d in none)
    for n_pool, n_generated in ((50, 8), (7, 3)):
        real, drawn = draw(n_pool, n_generated)
        assert all(torch.equal(a, b) for a, b in zip(plain, real, strict=True))
        assert all(
            d is not None and d.shape == (n_generated,) and 0 <= d.min() and d.max() < n_pool for d in drawn
        )
    # Shuffled epochs of 21 days: batches of 8, 8, 5, each epoch a permutation.
    assert [len(r) for r in plain[:6]] == [8, 8, 5, 8, 8, 5]
    assert sorted(torch.cat(plain[:3]).tolist()) == list(range(21))
    assert not torch.equal(torch.cat(plain[:3]), torch.cat(plain[3:6]))


def test_generated_fields_take_their_own_days_coarse_input_and_mask() -> None:
    coarse = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 2, 2, 3)
    obs = torch.arange(6.0).view(6, 1, 1).expand(6, 8, 12) + 100
    mask = torch.rand(6, 8, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    pool = GeneratedPairs(
        day=torch.tensor([4, 1, 1]), fine_mm=torch.full((3, 8, 12), -1.0) - torch.arange(3.0).view(3, 1, 1)
    )
    real, drawn = torch.tensor([0, 2]), torch.tensor([2, 0])
    c, o, m = _gather(coarse, obs, mask, real, pool, drawn)
    assert c[:, 0, 0, 0].tolist() == [0.0, 2.0, 1.0, 4.0]
    assert o[:, 0, 0].tolist() == [100.0, 102.0, -3.0, -1.0]
    assert torch.equal(m, mask[[0, 2, 1, 4]])


# --- training ------------------------------------------------------------------------------------


def test_steps_budget_is_exact_for_both_arms(data: Dataset) -> None:
    cfg = tiny_config(**{"downstream.steps": 13, "downstream.val_checks": 4})
    for generated in (None, pool_of(data)):
        fit = train_srdrn(cfg, data, seed=0, generated=generated, device=CPU)
        assert fit.steps == 13
        assert [e["step"] for e in fit.curve] == [4, 7, 10, 13]
        # An epoch is ceil(n / 8) steps, its last batch short: 13 steps see one epoch and 4 batches.
        n = len(data.train)
        assert math.ceil(n / 8) < 13
        assert fit.curve[-1]["epoch"] == (n + (13 - math.ceil(n / 8)) * 8) / n


def test_epochs_budget_passes_over_the_real_pairs(data: Dataset) -> None:
    cfg = tiny_config(**{"downstream.budget": "epochs", "downstream.epochs": 2, "downstream.val_checks": 2})
    expected = 2 * math.ceil(len(data.train) / 8)
    for generated in (None, pool_of(data)):
        fit = train_srdrn(cfg, data, seed=0, generated=generated, device=CPU)
        assert fit.steps == expected
        assert [e["step"] for e in fit.curve] == [expected // 2, expected]
        assert [e["epoch"] for e in fit.curve] == [1.0, 2.0]


def val_loss_of(model: SRDRN, data: Dataset, cfg: Config) -> float:
    pred = predict(model, data, data.val, batch_size=5)
    obs = data.normalizer.to_mm(data.val.fine[:, 0])
    return srdrn_loss(pred, obs, data.val.mask[:, 0], cfg, data.stats).item()


def test_best_val_returns_the_checkpoint_of_the_lowest_validation_loss(data: Dataset) -> None:
    cfg = tiny_config(**{"downstream.lr": 0.03, "downstream.steps": 24, "downstream.val_checks": 8})
    fit = train_srdrn(cfg, data, seed=0, device=CPU)
    vals = [e["val_loss"] for e in fit.curve]
    best = min(range(len(vals)), key=vals.__getitem__)
    assert fit.selected_step == fit.curve[best]["step"]
    assert fit.selected_step != fit.steps, "the test needs a curve whose best check is not the last"
    assert not fit.model.training
    assert val_loss_of(fit.model, data, cfg) == pytest.approx(vals[best], rel=1e-5)

    cfg.downstream.selection = "last"
    last = train_srdrn(cfg, data, seed=0, device=CPU)
    assert last.curve == fit.curve and last.selected_step == last.steps
    assert val_loss_of(last.model, data, cfg) == pytest.approx(vals[-1], rel=1e-5)


def test_training_reduces_the_loss(data: Dataset) -> None:
    cfg = tiny_config(**{"downstream.steps": 40, "downstream.selection": "last"})
    fit = train_srdrn(cfg, data, seed=0, device=CPU)
    torch.manual_seed(0)
    untrained = build_srdrn(cfg, data).eval()
    assert val_loss_of(fit.model, data, cfg) < 0.8 * val_loss_of(untrained, data, cfg)
    assert fit.curve[-1]["train_loss"] < fit.curve[0]["train_loss"]


def test_same_seed_same_weights_and_an_empty_pool_is_no_pool(data: Dataset) -> None:
    cfg = tiny_config(**{"downstream.steps": 6, "downstream.val_checks": 2})
    # The seed alone fixes the weights: the global random state neither matters nor moves.
    torch.manual_seed(123)
    a = train_srdrn(cfg, data, seed=1, device=CPU)
    after = torch.rand(3)
    torch.manual_seed(456)
    b = train_srdrn(cfg, data, seed=1, device=CPU)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    empty = GeneratedPairs(
        day=torch.zeros(0, dtype=torch.long), fine_mm=torch.zeros(0, data.height, data.width)
    )
    c = train_srdrn(cfg, data, seed=1, generated=empty, device=CPU)
    assert same_state(state(a.model), state(b.model)) and a.curve == b.curve
    assert same_state(state(a.model), state(c.model)) and a.curve == c.curve
    other = train_srdrn(cfg, data, seed=2, device=CPU)
    assert not same_state(state(a.model), state(other.model))
    augmented = train_srdrn(cfg, data, seed=1, generated=pool_of(data), device=CPU)
    assert not same_state(state(a.model), state(augmented.model))


def test_pinball_training_and_prediction_in_bf16(data: Dataset) -> None:
    cfg = tiny_config(**{"downstream.loss": "pinball", "downstream.steps": 3, "downstream.val_checks": 1})
    lines: list[str] = []
    fit = train_srdrn(cfg, data, seed=0, device=CPU, bf16=True, progress=lines.append)
    assert len(lines) == 1 and "step 3/3" in lines[0]
    assert all(math.isfinite(e["val_loss"]) for e in fit.curve)
    pred = predict(fit.model, data, data.test, batch_size=4, bf16=True)
    assert pred.shape == (len(data.test), 3, data.height, data.width) and pred.dtype == torch.float32
    assert (pred >= 0).all()


def test_prediction_does_not_depend_on_the_batch_size(data: Dataset) -> None:
    torch.manual_seed(0)
    net = build_srdrn(tiny_config(), data).eval()
    one = predict(net, data, data.test, batch_size=1)
    all_at_once = predict(net, data, data.test, batch_size=64)
    assert one.shape == (len(data.test), 1, data.height, data.width)
    assert torch.allclose(one, all_at_once, atol=1e-5)


def test_generated_pairs_that_do_not_fit_are_named(data: Dataset) -> None:
    cfg = tiny_config(**{"downstream.steps": 1})
    bad_day = GeneratedPairs(
        day=torch.tensor([len(data.train)]), fine_mm=torch.zeros(1, data.height, data.width)
    )
    with pytest.raises(ValueError, match="generated.day"):
        train_srdrn(cfg, data, seed=0, generated=bad_day, device=CPU)
    bad_grid = GeneratedPairs(day=torch.tensor([0]), fine_mm=torch.zeros(1, data.height, data.width + 1))
    with pytest.raises(ValueError, match="generated.fine_mm"):
        train_srdrn(cfg, data, seed=0, generated=bad_grid, device=CPU)
