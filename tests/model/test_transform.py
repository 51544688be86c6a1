"""A dry cell is exactly 0 mm/day in every path back from model space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import Normalization, config_from_dict
from model.evaluate import evaluate
from model.trainer import build_model, train
from model.transform import Normalizer
from tests.conftest import tiny_config_dict


def _random_stats(n: int) -> list[Normalization]:
    rng = np.random.default_rng(0)
    return [
        Normalization(target_mean=float(rng.uniform(0.05, 3.0)), target_std=float(rng.uniform(0.2, 3.0)))
        for _ in range(n)
    ]


@pytest.mark.parametrize("transform", ["log1p", "none"])
def test_the_dry_value_comes_back_as_exactly_zero_whichever_way_it_was_made(transform: str) -> None:
    # The data path (to_model in float32) and the model's constant (model_value in float64,
    # then float32) round differently; both must map back to 0, in float32 and float64.
    for stats in _random_stats(300):
        norm = Normalizer(stats, transform)
        made = [norm.to_model(torch.zeros(3)), torch.full((3,), norm.zero)]
        for x in made:
            for dtype in (torch.float32, torch.float64):
                assert torch.equal(norm.to_mm(x.to(dtype)), torch.zeros(3, dtype=dtype)), (stats, dtype)


@pytest.mark.parametrize("transform", ["log1p", "none"])
def test_light_rain_and_amounts_survive_the_round_trip(transform: str) -> None:
    mm = torch.tensor([0.01, 0.1, 1.0, 25.0, 300.0])
    for stats in _random_stats(50):
        norm = Normalizer(stats, transform)
        assert norm.to_mm(norm.to_model(mm)) == pytest.approx(mm, rel=1e-4, abs=1e-5)
        assert norm.to_mm(torch.tensor([norm.zero - 1.0])).item() == 0.0  # below dry: no negative rain


@pytest.mark.slow
def test_a_calibrated_copula_ensemble_has_a_flat_rank_histogram(cache: Path) -> None:
    # Synthetic seed 2: the fitted statistics are ones where float32 rounding left the model's
    # dry cells at 6e-8 mm/day against the observations' 0, which put 0.57 of the cells in the
    # first bin of a histogram whose bins should hold 1/9 each.
    overrides = {
        "data.synthetic.n_days": 384,
        "data.synthetic.seed": 2,
        "model.output": "copula",
        "model.encoder_pool": "grid",
        "loss.kl_mode": "free_bits_batch",
        "loss.scale": 6.6,
        "loss.lambda_mass": 0.03,
        "eval.max_days": 64,
        "eval.n_samples": 8,
    }
    cfg = config_from_dict(tiny_config_dict(10, overrides))
    torch.set_num_threads(1)
    result = train(cfg)
    assert 0.8 <= result.metrics["spread_skill"] <= 1.3  # a calibrated spread, so the bins should be flat
    hist = result.diagnostics["rank_histogram"]
    assert len(hist) == 9
    assert max(abs(f - 1 / 9) for f in hist) < 0.03, hist


def test_dry_cells_of_observations_and_of_every_output_head_are_exactly_zero(cache: Path) -> None:
    from model.data import load_data

    cfg = config_from_dict(tiny_config_dict(1, {"data.synthetic.seed": 2, "data.synthetic.n_days": 384}))
    data = load_data(cfg.data)
    for output in ("hurdle", "copula"):
        model = build_model(config_from_dict(tiny_config_dict(1, {"model.output": output})), data)
        ev = evaluate(model, data, cfg.eval).data
        observed_dry = ev.mask & (ev.obs < 1e-6)  # the file's 0 mm/day cells, residue included
        assert observed_dry.sum() > 1000
        assert torch.all(ev.obs[observed_dry] == 0)
        generated = ev.samples[ev.mask[:, None].expand_as(ev.samples)]
        tiny = generated[generated < 1e-6]  # the rounding residue lay at 6e-8
        assert tiny.numel() > 0 and torch.all(tiny == 0), output
