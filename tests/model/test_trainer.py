from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from model.config import Config, config_from_dict, load_config
from model.data import load_data
from model.evaluate import evaluate
from model.metrics import METRICS
from model.trainer import DeviceUnavailable, EpochReport, TrainingDiverged, TrainResult, build_model, train
from tests.conftest import tiny_config_dict

LOSS_TERMS = {"total", "recon", "kl", "kl_raw", "grad", "mass"}


def tiny_config(**overrides: Any) -> Config:
    """About a second of training on the CPU: a 16x16 synthetic grid, factor 4, two epochs."""
    return config_from_dict(tiny_config_dict(2, overrides), "tiny")


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal to the last bit, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a.values(), b.values(), strict=True)
    )


@dataclass
class Trained:
    result: TrainResult
    out: Path
    reports: list[EpochReport]


@pytest.fixture(scope="module")
def trained(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    out = tmp_path_factory.mktemp("run")
    reports: list[EpochReport] = []

    def record(report: EpochReport) -> None:
        reports.append(report)

    return Trained(train(tiny_config(), out_dir=out, callbacks=[record]), out, reports)


def test_checkpoint_rebuilds_the_trained_model(trained: Trained) -> None:
    path = trained.out / "checkpoint.pt"
    assert trained.result.checkpoint == path
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT

    model, cfg, _ = load_checkpoint(path)
    assert cfg == trained.result.config
    # Evaluation draws its samples from a generator seeded by eval.seed: the rebuilt model gives
    # the trained model's samples, hence its metrics, exactly.
    data = load_data(cfg.data, cfg.normalization)
    rebuilt = evaluate(model, data, cfg.eval).metrics
    assert same(rebuilt, trained.result.metrics)


def test_metrics_file_holds_every_metric_history_timings_and_device(trained: Trained) -> None:
    assert trained.result.metrics_file == trained.out / "metrics.json"
    written = json.loads((trained.out / "metrics.json").read_text())
    assert set(written["metrics"]) == set(METRICS)
    assert set(trained.result.metrics) == set(METRICS)
    assert [h["epoch"] for h in written["history"]] == [1, 2]
    assert all(LOSS_TERMS | {"beta", "samples_per_s"} <= set(h) for h in written["history"])
    assert {"train_s", "eval_s", "samples_per_s"} <= set(written["timings"])
    assert written["device"] == "cpu" and written["precision"] == "fp32"
    assert written["epochs_run"] == 2 and written["stopped"] is None
    assert {"torch", "python", "cvae_search"} <= set(written["versions"])


def test_sample_figure_is_a_png(trained: Trained) -> None:
    assert trained.result.figure == trained.out / "samples.png"
    assert (trained.out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_written_config_is_the_trained_one_with_its_normalization(trained: Trained) -> None:
    cfg = load_config(trained.out / "config.yaml")
    assert cfg == trained.result.config
    assert cfg.normalization is not None and cfg.normalization.target_std > 0
    assert len(cfg.normalization.predictor_mean) == len(cfg.data.predictor_vars)


def test_callbacks_see_one_report_per_epoch(trained: Trained) -> None:
    assert [r.epoch for r in trained.reports] == [1, 2]
    assert all(r.epochs == 2 for r in trained.reports)
    assert all(set(r.losses) == LOSS_TERMS for r in trained.reports)
    assert [r.losses for r in trained.reports] == [
        {k: h[k] for k in LOSS_TERMS} for h in trained.result.history
    ]
    probe = trained.reports[-1].probe()
    assert {"spread_norm", "z_usage"} <= set(probe)


def test_same_seed_repeats_to_the_last_bit(trained: Trained) -> None:
    again = train(tiny_config())
    assert same(again.metrics, trained.result.metrics)
    assert again.history == [
        {**h, "samples_per_s": again.history[i]["samples_per_s"]}
        for i, h in enumerate(trained.result.history)
    ]


def test_another_seed_gives_other_metrics(trained: Trained) -> None:
    other = train(tiny_config(**{"train.seed": 1}))
    assert not same(other.metrics, trained.result.metrics)


def test_a_callback_stops_training(cache: Path) -> None:
    seen: list[int] = []

    def stop_after_two(report: EpochReport) -> str | None:
        seen.append(report.epoch)
        return "enough" if report.epoch == 2 else None

    result = train(tiny_config(**{"train.epochs": 5}), callbacks=[stop_after_two])
    assert seen == [1, 2]
    assert result.stopped == "enough"
    assert result.epochs_run == 2 and len(result.history) == 2
    assert set(result.metrics) == set(METRICS)


def test_a_huge_learning_rate_diverges_naming_the_epoch(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match=r"not finite at epoch 1: total=nan"):
        train(tiny_config(**{"train.lr": 1e6}), out_dir=tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_kl_warmup_ramps_beta_linearly(cache: Path) -> None:
    cfg = tiny_config(**{"train.epochs": 4, "loss.kl_warmup_epochs": 4, "loss.beta_kl": 0.2})
    result = train(cfg)
    assert [h["beta"] for h in result.history] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    # The ramped beta is the one the loss used: epoch means are linear in the terms.
    for h in result.history:
        expected = h["recon"] + h["beta"] * h["kl"] + cfg.loss.lambda_mass * h["mass"]
        assert h["total"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_clear_error(cache: Path) -> None:
    with pytest.raises(
        DeviceUnavailable, match=r"train.device: expected auto or cpu .*got 'cuda'.*no CUDA device"
    ):
        train(tiny_config(**{"train.device": "cuda"}))


@pytest.mark.slow
@pytest.mark.parametrize("output", ["regression", "copula"])
def test_compiled_step_trains_on_the_cpu(output: str, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.trainer"):
        result = train(tiny_config(**{"train.compile": True, "train.epochs": 1, "model.output": output}))
    assert not [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert all(math.isfinite(result.history[0][k]) for k in LOSS_TERMS)
    assert set(result.metrics) == set(METRICS)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.output": "hurdle", "model.prior": "learned"},
        {"model.output": "copula", "data.synthetic.with_mask": True},
        {"data.synthetic.with_mask": True},
    ],
    ids=["hurdle-learned-prior", "copula-masked", "masked"],
)
def test_variants_train_with_finite_losses_and_metrics(cache: Path, overrides: dict[str, Any]) -> None:
    cfg = tiny_config(**overrides)
    data = load_data(cfg.data)
    masked = not bool(data.train.mask.all())
    assert masked == cfg.data.synthetic.with_mask
    result = train(cfg, data=data)
    assert all(math.isfinite(h[k]) for h in result.history for k in LOSS_TERMS)
    bad = {k: v for k, v in result.metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    assert set(result.metrics) == set(METRICS)


def test_the_copula_field_is_not_counted_as_use_of_z(cache: Path) -> None:
    cfg = tiny_config(**{"model.output": "copula"})
    data = load_data(cfg.data)
    model = build_model(cfg, data)
    with torch.no_grad():  # a decoder that ignores z: only the copula's field varies the samples
        model.z_to_map.weight.zero_()
        model.z_to_map.bias.zero_()
    metrics = evaluate(model, data, cfg.eval).metrics
    assert metrics["diversity"] > 0.0
    assert metrics["z_usage"] == 0.0
