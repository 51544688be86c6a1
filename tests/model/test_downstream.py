from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from model.config import Config, config_from_dict, with_overrides
from model.cvae import CVAE
from model.data import Dataset, load_data
from model.downstream import (
    DOWNSTREAM_FILES,
    DownstreamResult,
    augmented_days,
    comparison_table,
    downstream_for_checkpoint,
    downstream_metric_names,
    generate_pairs,
    run_downstream,
)
from model.trainer import build_model, train
from tests.conftest import tiny_config_dict


def tiny_config(**overrides: Any) -> Config:
    """A 16x16 grid (factor 4) with an ocean mask; a tiny SRDRN trained for a few steps."""
    base = {
        "data.synthetic.with_mask": True,
        "data.mask_var": "mask",
        "data.synthetic.storm_days": 0.1,
        "downstream.channels": 4,
        "downstream.n_res_blocks": 1,
        "downstream.batch_size": 8,
        "downstream.steps": 12,
        "downstream.val_checks": 2,
        "downstream.seeds": [0, 1],
        "downstream.n_generated": 2,
    }
    return config_from_dict(tiny_config_dict(1, {**base, **overrides}), "tiny")


@pytest.fixture(scope="module")
def data(cache: Path) -> Dataset:
    return load_data(tiny_config().data)


@pytest.fixture(scope="module")
def cvae(data: Dataset) -> CVAE:
    torch.manual_seed(0)
    return build_model(tiny_config(), data)


def test_k_zero_gives_an_augmented_arm_equal_to_the_unaugmented_one(data: Dataset, cvae: CVAE) -> None:
    result = run_downstream(cvae, tiny_config(**{"downstream.n_generated": 0}), data, source="test")
    assert result.settings["generated_pairs"] == 0
    assert result.scores["with"] == result.scores["without"]
    assert set(result.verdicts().values()) == {"within noise"}
    # With pairs, the arms differ: the equality above is not a property of the setup.
    lines: list[str] = []
    other = run_downstream(cvae, tiny_config(), data, source="test", progress=lines.append)
    assert other.scores["with"] != other.scores["without"]
    # The unaugmented arm does not depend on the cVAE or the augmentation: trained once.
    assert other.scores["without"] == result.scores["without"]
    assert lines[0] == "SRDRN without, seeds [0, 1]: the same runs as earlier in this process, reused"
    assert sum("SRDRN with " in line for line in lines) == 2


def test_generated_pairs_are_drawn_from_their_own_days_coarse_input(data: Dataset, cvae: CVAE) -> None:
    cfg = tiny_config(**{"downstream.temperature": 1e-6}).downstream
    days = torch.tensor([3, 7, 11])
    pairs = generate_pairs(cvae, data, days, cfg, seed=0)
    assert pairs.day.tolist() == [3, 3, 7, 7, 11, 11]
    mask = data.train.mask[:, 0]
    for i, day in enumerate(pairs.day.tolist()):
        own = data.normalizer.to_mm(
            cvae.sample(data.train.coarse[day : day + 1], data.static, 1, temperature=1e-6)
        )
        own = torch.where(mask[day], own[0, 0], 0.0)
        assert torch.allclose(pairs.fine_mm[i], own, atol=1e-4)
        other = (day + 1) % len(data.train)
        wrong = data.normalizer.to_mm(
            cvae.sample(data.train.coarse[other : other + 1], data.static, 1, temperature=1e-6)
        )
        assert not torch.allclose(pairs.fine_mm[i], torch.where(mask[day], wrong[0, 0], 0.0), atol=1e-4)
        assert torch.all(pairs.fine_mm[i][~mask[day]] == 0)


def test_heavy_days_are_those_above_the_quantile_of_daily_means(data: Dataset) -> None:
    obs, mask = data.normalizer.to_mm(data.train.fine[:, 0]), data.train.mask[:, 0]
    means = (torch.where(mask, obs, 0.0).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))).double()
    cfg = tiny_config(**{"downstream.augment_days": "heavy", "downstream.heavy_quantile": 0.8}).downstream
    heavy = augmented_days(obs, mask, cfg)
    assert 0 < len(heavy) <= 0.25 * len(obs)
    assert means[heavy].min() > means[[d for d in range(len(obs)) if d not in set(heavy.tolist())]].max()
    everything = augmented_days(obs, mask, tiny_config().downstream)
    assert everything.tolist() == list(range(len(obs)))


def test_a_run_records_every_named_gain_writes_its_files_and_reads_back(
    data: Dataset, cvae: CVAE, tmp_path: Path
) -> None:
    cfg = tiny_config(**{"downstream.loss": "pinball", "downstream.quantiles": [0.5, 0.9]})
    lines: list[str] = []
    result = run_downstream(cvae, cfg, data, source="test", out_dir=tmp_path, progress=lines.append)
    assert list(result.gains()) == downstream_metric_names(cfg.downstream)
    assert "downstream_q90_csi_p99_gain" in result.gains()
    assert len(lines) == 4 and all("steps" in line for line in lines)
    assert all(len(v) == 2 for arm in result.scores.values() for v in arm.values())
    for name in DOWNSTREAM_FILES:
        assert (tmp_path / name).stat().st_size > 0
    again = DownstreamResult.from_dict(json.loads((tmp_path / DOWNSTREAM_FILES[0]).read_text()))
    assert again.gains() == result.gains() and again.table() == result.table()
    table = result.table()
    assert "the same 12 optimiser steps" in table and "seeds [0, 1]" in table
    assert "q90_csi_p99" in table and "within noise" in table


def test_equal_epochs_are_offered_and_said(data: Dataset, cvae: CVAE) -> None:
    cfg = tiny_config(**{"downstream.budget": "epochs", "downstream.epochs": 1, "downstream.seeds": [0]})
    result = run_downstream(cvae, cfg, data, source="test")
    steps = -(-len(data.train) // 8)
    assert result.settings["steps_per_arm"] == steps
    assert f"the same 1 epochs of real pairs ({steps} steps)" in result.table()


def test_a_checkpoint_is_evaluated_on_the_data_its_config_names(tmp_path: Path, cache: Path) -> None:
    cfg = tiny_config(**{"downstream.seeds": [0]})
    trained = train(with_overrides(cfg, {"train.save_checkpoint": True}, "test"), out_dir=tmp_path / "cvae")
    assert trained.checkpoint is not None
    other = with_overrides(cfg, {"downstream.steps": 5}, "test").downstream
    result = downstream_for_checkpoint(trained.checkpoint, out_dir=None, downstream=other)
    assert result.settings["steps_per_arm"] == 5
    assert result.source == str(trained.checkpoint.resolve())
    assert result.settings["train_days"] == len(load_data(cfg.data).train)


def test_the_comparison_puts_several_cvaes_beside_their_one_unaugmented_arm(
    data: Dataset, cvae: CVAE
) -> None:
    result = run_downstream(cvae, tiny_config(), data, source="test")
    doubled = DownstreamResult.from_dict(json.loads(json.dumps(result.to_dict())) | {"source": "other"})
    doubled.scores["with"] = {k: [2 * v for v in vs] for k, vs in result.scores["with"].items()}
    table = comparison_table({"a": result, "b": doubled})
    header = table.splitlines()[1]
    assert header.split()[:3] == ["metric", "no", "augmentation"]
    assert "a: with, gain ± spread, verdict" in header and "b: with, gain ± spread, verdict" in header
    rmse = next(line for line in table.splitlines() if line.startswith("rmse "))
    assert f"{sum(doubled.scores['with']['rmse']) / 2:.4g}," in rmse
    other = DownstreamResult.from_dict(json.loads(json.dumps(result.to_dict())))
    other.scores["without"]["rmse"] = [v + 1 for v in other.scores["without"]["rmse"]]
    with pytest.raises(ValueError, match="b: its unaugmented arm differs"):
        comparison_table({"a": result, "b": other})
