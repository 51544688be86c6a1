from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.config import Config, config_from_dict
from model.data import Dataset, load_data
from model.evaluate import evaluate
from model.fused import architecture_key, train_fused
from model.trainer import LOSS_TERMS, EpochReport, TrainingDiverged, TrainResult, train
from tests.conftest import tiny_config_dict

# Members differing in everything a member owns: loss weights and mode, lr, weight decay,
# clipping, seed, epochs and noise length.
MEMBERS: list[dict[str, Any]] = [
    {},
    {"loss.beta_kl": 0.5, "loss.lambda_grad": 0.3, "train.lr": 3e-3, "train.seed": 1},
    {
        "loss.kl_mode": "plain",
        "loss.scale": 5.0,
        "train.weight_decay": 0.1,
        "train.seed": 2,
        "train.epochs": 1,
    },
    {"loss.free_bits": 0.0, "loss.lambda_mass": 0.0, "train.grad_clip": 0.0, "model.noise_length": 3.0},
]


def tiny(**overrides: Any) -> Config:
    return config_from_dict(tiny_config_dict(2, overrides), "tiny")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data(cache: Path) -> Dataset:
    return load_data(tiny().data)


def assert_same_run(fused: TrainResult | TrainingDiverged, solo: TrainResult) -> None:
    """Per-epoch losses and final metrics equal to float tolerance; the same stop."""
    assert isinstance(fused, TrainResult)
    assert fused.epochs_run == solo.epochs_run
    assert fused.stopped == solo.stopped
    losses = [[h[t] for t in LOSS_TERMS] for h in fused.history]
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor([[h[t] for t in LOSS_TERMS] for h in solo.history], dtype=torch.float64),
        rtol=1e-4,  # the stacked kernels sum in another order
        atol=1e-6,
    )
    assert fused.metrics.keys() == solo.metrics.keys()
    torch.testing.assert_close(
        torch.tensor(list(fused.metrics.values()), dtype=torch.float64),
        torch.tensor(list(solo.metrics.values()), dtype=torch.float64),
        rtol=1e-4,
        atol=1e-6,
        equal_nan=True,
    )


@pytest.mark.parametrize("k", [1, 2, 4])
def test_each_member_equals_its_solo_run(k: int, data: Dataset) -> None:
    cfgs = [tiny(**m) for m in MEMBERS[:k]]
    fused = train_fused(cfgs, data=data)
    assert len(fused) == k
    for cfg, result in zip(cfgs, fused, strict=True):
        assert_same_run(result, train(cfg, data=data))
        assert isinstance(result, TrainResult) and result.extra["fused_group"] == k


def test_a_stopped_member_is_evaluated_and_the_others_go_on(data: Dataset) -> None:
    cfgs = [tiny(**{**m, "train.epochs": 3}) for m in MEMBERS[:3]]

    def stop_after_first(report: EpochReport) -> str | None:
        return "collapsed: test" if report.epoch == 1 else None

    seen: list[int] = []

    def record(report: EpochReport) -> None:
        seen.append(report.epoch)

    fused = train_fused(cfgs, data=data, callbacks=[[record], [stop_after_first], []])
    assert seen == [1, 2, 3]
    assert fused[1].epochs_run == 1 and fused[1].stopped == "collapsed: test"
    assert_same_run(fused[0], train(cfgs[0], data=data))
    assert_same_run(fused[1], train(cfgs[1], data=data, callbacks=[stop_after_first]))
    assert_same_run(fused[2], train(cfgs[2], data=data))


def test_a_diverging_member_fails_alone(data: Dataset) -> None:
    cfgs = [tiny(), tiny(**{"train.lr": 1e6, "train.grad_clip": 0.0}), tiny(**MEMBERS[1])]
    with pytest.raises(TrainingDiverged):
        train(cfgs[1], data=data)
    fused = train_fused(cfgs, data=data)
    assert isinstance(fused[1], TrainingDiverged)
    assert "not finite" in str(fused[1])
    assert_same_run(fused[0], train(cfgs[0], data=data))
    assert_same_run(fused[2], train(cfgs[2], data=data))


def test_outputs_reload_as_the_member_trained(data: Dataset, tmp_path: Path) -> None:
    cfgs = [tiny(), tiny(**MEMBERS[1])]
    fused = train_fused(cfgs, data=data, out_dirs=[tmp_path / "a", tmp_path / "b"])
    result = fused[1]
    assert isinstance(result, TrainResult) and result.checkpoint == tmp_path / "b" / "checkpoint.pt"
    assert (tmp_path / "b" / "metrics.json").is_file() and (tmp_path / "b" / "config.yaml").is_file()
    model, cfg, _ = load_checkpoint(result.checkpoint)
    assert cfg.train.lr == cfgs[1].train.lr
    assert evaluate(model, data, cfg.eval).metrics == pytest.approx(result.metrics, nan_ok=True)


def test_architecture_key_separates_shapes_not_member_settings() -> None:
    assert (
        architecture_key(tiny())
        == architecture_key(tiny(**MEMBERS[1]))
        == architecture_key(tiny(**MEMBERS[3]))
    )
    for field, value in [("model.channels", 4), ("model.output", "hurdle"), ("train.batch_size", 8)]:
        assert architecture_key(tiny(**{field: value})) != architecture_key(tiny())


def test_mismatched_configs_are_refused_naming_the_field(data: Dataset) -> None:
    with pytest.raises(ValueError, match="config 1's model.latent_dim"):
        train_fused([tiny(), tiny(**{"model.latent_dim": 4})], data=data)
    with pytest.raises(ValueError, match="callbacks has 1 entries"):
        train_fused([tiny(), tiny()], data=data, callbacks=[[]])
