"""Does the cVAE's generated data make SRDRN better? Both arms, scored on held-out days.

For each seed of ``downstream.seeds``, SRDRN (:mod:`model.srdrn`) trains twice from the same
initial weights and on the same batches of real pairs: once on the real training split
(*without*), once with generated pairs added to every batch (*with*): K fields drawn from the
cVAE's prior for each augmented training day, each paired with that day's own coarse input.
Both arms are scored on the test split, real data only, in mm/day
(:mod:`model.downstream_metrics`); the gain of a score is *with* minus *without*, signed so
that positive is better, and its verdict is a paired test over the seeds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import read_checkpoint
from model.config import Config, DownstreamConfig, config_to_dict
from model.cvae import CVAE
from model.data import Dataset, load_data
from model.downstream_metrics import (
    format_table,
    gain,
    heavy_thresholds,
    score_definitions,
    score_fields,
    threshold_labels,
    verdict,
)
from model.evaluate import autocast
from model.srdrn import GeneratedPairs, predict, train_srdrn
from model.trainer import cpu_threads, resolve_device, train, use_bf16

__all__ = [
    "ARMS",
    "DOWNSTREAM_FILES",
    "RESULT_FILE",
    "DownstreamResult",
    "augmented_days",
    "comparison_table",
    "downstream_for_checkpoint",
    "downstream_for_config",
    "downstream_metric_names",
    "generate_pairs",
    "run_downstream",
]

ARMS = ("without", "with")
RESULT_FILE = "downstream.json"
DOWNSTREAM_FILES = (RESULT_FILE, "downstream_heavy_day.png", "downstream_curves.png")
"""What :func:`run_downstream` writes: the result, one heavy test day, both arms' curves."""


@dataclass
class DownstreamResult:
    """Both arms' scores per seed, the settings that produced them and the training curves.

    Attributes:
        source: What was evaluated (a checkpoint, a config, a study's trial).
        settings: ``downstream`` as plain data, plus ``steps_per_arm``, ``thresholds``
            (label: mm/day), ``heads``, ``augmented_days`` and ``generated_pairs``.
        scores: arm (``without``, ``with``) -> score key -> one value per seed. A key is the
            score's name, prefixed by the head (``q90_csi_p99``) for the pinball loss.
        curves: arm -> one validation curve per seed (``step``, ``epoch``, ``train_loss``,
            ``val_loss`` per check).
    """

    source: str
    settings: dict[str, Any]
    scores: dict[str, dict[str, list[float]]]
    curves: dict[str, list[list[dict[str, float]]]] = field(default_factory=dict)

    def _score_name(self, key: str) -> str:
        for head in self.settings["heads"]:
            if key.startswith(f"{head}_"):
                return key[len(head) + 1 :]
        return key

    def gains_per_seed(self) -> dict[str, list[float]]:
        """Score key -> the gain of each seed (with against without), signed so positive is better."""
        defs = score_definitions(list(self.settings["thresholds"]))
        return {
            key: [
                gain(defs[self._score_name(key)], a, b)
                for a, b in zip(self.scores["without"][key], values, strict=True)
            ]
            for key, values in self.scores["with"].items()
        }

    def gains(self) -> dict[str, float]:
        """``downstream_<key>_gain``: the mean gain over seeds; positive means augmentation helped."""
        return {
            f"downstream_{key}_gain": float(np.mean(values)) for key, values in self.gains_per_seed().items()
        }

    def verdicts(self) -> dict[str, str]:
        """The same keys as :meth:`gains`: ``better``, ``worse`` or ``within noise``."""
        return {
            f"downstream_{key}_gain": verdict(values).verdict for key, values in self.gains_per_seed().items()
        }

    def table(self) -> str:
        """The comparison table, under a line saying what both arms trained on."""
        rows = []
        for key, per_seed in self.gains_per_seed().items():
            v = verdict(per_seed)
            rows.append(
                (
                    key,
                    float(np.mean(self.scores["without"][key])),
                    float(np.mean(self.scores["with"][key])),
                    v.mean,
                    v.spread,
                    v.verdict,
                )
            )
        return f"{self.budget_line()}\n{format_table(rows)}"

    def budget_line(self) -> str:
        """What both arms trained on: the same seeds, steps and real batches."""
        s = self.settings
        extra = round(s["ratio"] * s["batch_size"]) if s["generated_pairs"] else 0
        budget = (
            f"the same {s['steps_per_arm']} optimiser steps"
            if s["budget"] == "steps"
            else f"the same {s['epochs']} epochs of real pairs ({s['steps_per_arm']} steps)"
        )
        return (
            f"SRDRN ({s['loss']}), seeds {s['seeds']}: both arms take {budget} on the same batches of "
            f"{s['batch_size']} real pairs; 'with' adds {extra} generated pairs per batch "
            f"(K={s['n_generated']} per day on {s['augmented_days']} training days, "
            f"{s['generated_pairs']} pairs); scored on {s['test_days']} test days, mm/day"
        )

    def summary(self) -> dict[str, Any]:
        """What a study records with an evaluated trial: gains, verdicts, the table, when."""
        return {
            "gains": self.gains(),
            "verdicts": self.verdicts(),
            "table": self.table(),
            "at": self.settings["at"],
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``downstream.json``; :meth:`from_dict` reads it back."""
        return {
            "source": self.source,
            "settings": self.settings,
            "scores": self.scores,
            "gains": self.gains(),
            "verdicts": self.verdicts(),
            "curves": self.curves,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DownstreamResult:
        return cls(
            source=data["source"],
            settings=data["settings"],
            scores=data["scores"],
            curves=data.get("curves", {}),
        )


def comparison_table(results: dict[str, DownstreamResult]) -> str:
    """Several cVAEs' augmented arms beside the one unaugmented arm they share.

    Args:
        results: Label -> result, all from the same data, seeds and SRDRN settings (so their
            unaugmented arms are the same runs).

    Raises:
        ValueError: The results' unaugmented arms differ: they are not comparable.
    """
    first = next(iter(results.values()))
    for label, result in results.items():
        if result.scores["without"] != first.scores["without"]:
            raise ValueError(f"{label}: its unaugmented arm differs from the others'; not comparable")
    labels = list(results)
    head = ["metric", "no augmentation"] + [f"{lab}: with, gain ± spread, verdict" for lab in labels]
    rows = [head]
    per_seed = {label: r.gains_per_seed() for label, r in results.items()}
    for key, without in first.scores["without"].items():
        row = [key, f"{np.mean(without):.4g}"]
        for label, result in results.items():
            v = verdict(per_seed[label][key])
            row.append(
                f"{np.mean(result.scores['with'][key]):.4g}, {v.mean:+.3g} ± {v.spread:.2g}, {v.verdict}"
            )
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{first.budget_line()}\n" + "\n".join(lines)


def augmented_days(obs_mm: torch.Tensor, mask: torch.Tensor, cfg: DownstreamConfig) -> torch.Tensor:
    """Training days to draw generated fields for: all, or those whose domain-mean precipitation
    is above ``heavy_quantile`` of the training split's daily domain means (days with no valid
    cell never count).

    Args:
        obs_mm: [N, H, W] the training split, mm/day.
        mask: [N, H, W] its valid cells.
    """
    cells = mask.sum(dim=(1, 2))
    valid = cells > 0
    if cfg.augment_days == "all":
        return torch.nonzero(valid).flatten()
    means = torch.where(mask, obs_mm, 0.0).sum(dim=(1, 2), dtype=torch.float64) / cells.clamp_min(1)
    cut = torch.quantile(means[valid], cfg.heavy_quantile)
    return torch.nonzero(valid & (means > cut)).flatten()


@torch.no_grad()
def generate_pairs(
    cvae: CVAE,
    data: Dataset,
    days: torch.Tensor,
    cfg: DownstreamConfig,
    *,
    seed: int,
    bf16: bool = False,
) -> GeneratedPairs:
    """``n_generated`` prior draws for each of ``days`` (training-split indices), each from that
    day's own coarse input, in mm/day; exactly 0 where the day's target is invalid."""
    train_split = data.train
    k = cfg.n_generated
    device = train_split.fine.device
    fields = torch.zeros((len(days) * k, data.height, data.width), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = cvae.training
    cvae.eval()
    with autocast(device, bf16):
        for start in range(0, len(days) if k > 0 else 0, cfg.batch_size_eval):
            idx = days[start : start + cfg.batch_size_eval]
            draws = cvae.sample(
                train_split.coarse[idx], data.static, k, temperature=cfg.temperature, generator=gen
            )
            mm = data.normalizer.to_mm(draws.float())
            mm = torch.where(train_split.mask[idx], mm, 0.0)  # [B, K, H, W]: mask [B, 1, H, W] broadcasts
            fields[start * k : (start + len(idx)) * k] = mm.flatten(0, 1)
    cvae.train(was_training)
    return GeneratedPairs(day=days.repeat_interleave(k), fine_mm=fields)


def _heads(cfg: DownstreamConfig) -> list[str]:
    """Score-key prefixes: none for the weighted MAE's one head, ``q50``, ``q99p5``... per quantile."""
    if cfg.loss == "weighted_mae":
        return [""]
    return [f"q{q * 100:g}".replace(".", "p") for q in cfg.quantiles]


def downstream_metric_names(cfg: DownstreamConfig) -> list[str]:
    """Every ``downstream_<key>_gain`` a run with these settings records, in table order."""
    labels = threshold_labels(cfg.threshold_quantiles, cfg.thresholds_mm)
    names = list(score_definitions(labels))
    return [
        f"downstream_{head}_{n}_gain" if head else f"downstream_{n}_gain"
        for head in _heads(cfg)
        for n in names
    ]


def run_downstream(
    cvae: CVAE,
    cfg: Config,
    data: Dataset,
    *,
    source: str,
    out_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> DownstreamResult:
    """Train SRDRN without and with ``cvae``'s generated pairs for each seed; score both on the
    test split.

    Args:
        cvae: The trained cVAE whose prior draws augment the training split.
        cfg: Its config; ``cfg.downstream`` sets SRDRN and the augmentation, ``cfg.train`` the
            device, precision and compilation, ``cfg.eval.wet_threshold`` what counts as wet.
        data: The cVAE's dataset (its training split, normalisation and test split).
        source: What is evaluated, for the result's record.
        out_dir: Where to write :data:`DOWNSTREAM_FILES`.
        progress: Called with one line per SRDRN run.
    """
    with cpu_threads(cfg.train.threads):
        return _run(cvae, cfg, data, source=source, out_dir=out_dir, progress=progress)


def _run(
    cvae: CVAE,
    cfg: Config,
    data: Dataset,
    *,
    source: str,
    out_dir: Path | None,
    progress: Callable[[str], None] | None,
) -> DownstreamResult:
    ds = cfg.downstream
    device = resolve_device(cfg.train.device)
    bf16 = use_bf16(cfg, device)
    data = data.to(device)
    cvae = cvae.to(device)
    wet = cfg.eval.wet_threshold
    train_obs, train_mask = data.normalizer.to_mm(data.train.fine[:, 0]), data.train.mask[:, 0]
    test_obs, test_mask = data.normalizer.to_mm(data.test.fine[:, 0]), data.test.mask[:, 0]
    thresholds = heavy_thresholds(train_obs, train_mask, ds.threshold_quantiles, ds.thresholds_mm, wet)
    days = augmented_days(train_obs, train_mask, ds)
    generated = generate_pairs(cvae, data, days, ds, seed=cfg.eval.seed, bf16=bf16)
    heads = _heads(ds)

    def run_arm(arm: str) -> _Arm:
        runs = _Arm()
        for seed in ds.seeds:
            fit = train_srdrn(
                cfg,
                data,
                seed=seed,
                generated=generated if arm == "with" else None,
                device=device,
                bf16=bf16,
                compile=cfg.train.compile,
            )
            runs.steps = fit.steps
            pred = predict(fit.model, data, data.test, batch_size=ds.batch_size_eval, bf16=bf16)
            for h, head in enumerate(heads):
                for name, value in score_fields(
                    pred[:, h], test_obs, test_mask, thresholds, wet_threshold=wet
                ).items():
                    runs.scores.setdefault(f"{head}_{name}" if head else name, []).append(value)
            runs.curves.append(fit.curve)
            if runs.first_pred is None:
                runs.first_pred = pred[:, -1].detach()
            if progress is not None:
                best = min((c["val_loss"] for c in fit.curve), default=math.nan)
                progress(
                    f"SRDRN {arm:<7} seed {seed}: {fit.steps} steps, best val loss {best:.4g} "
                    f"(kept step {fit.selected_step})"
                )
        return runs

    key = _unaugmented_key(cfg, data, device, bf16)
    without = _UNAUGMENTED.get(key)
    if without is None:
        without = _UNAUGMENTED[key] = run_arm("without")
        while len(_UNAUGMENTED) > _UNAUGMENTED_KEPT:
            _UNAUGMENTED.pop(next(iter(_UNAUGMENTED)))
    elif progress is not None:
        progress(f"SRDRN without, seeds {ds.seeds}: the same runs as earlier in this process, reused")
    arms = {"without": without, "with": run_arm("with")}
    scores = {arm: {k: list(v) for k, v in runs.scores.items()} for arm, runs in arms.items()}
    curves = {arm: list(runs.curves) for arm, runs in arms.items()}
    first_preds = {arm: runs.first_pred for arm, runs in arms.items() if runs.first_pred is not None}
    steps = arms["with"].steps

    settings = config_to_dict(cfg)["downstream"] | {
        "steps_per_arm": steps,
        "thresholds": thresholds,
        "heads": [h for h in heads if h],
        "augmented_days": len(days),
        "generated_pairs": len(generated.day),
        "train_days": len(data.train),
        "test_days": len(data.test),
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    result = DownstreamResult(source=source, settings=settings, scores=scores, curves=curves)
    if out_dir is not None:
        _write(result, out_dir, test_obs, test_mask, first_preds, data.test.times)
    return result


@dataclass
class _Arm:
    """One arm's SRDRN runs over the seeds: scores per key, curves, the first seed's prediction."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    curves: list[list[dict[str, float]]] = field(default_factory=list)
    first_pred: torch.Tensor | None = None
    steps: int = 0


_UNAUGMENTED: dict[str, _Arm] = {}
"""The unaugmented arm depends on the data and SRDRN's settings, not on the cVAE: a process
that evaluates several cVAEs on one data set (a study's front, the demo) trains it once."""
_UNAUGMENTED_KEPT = 4


def _unaugmented_key(cfg: Config, data: Dataset, device: torch.device, bf16: bool) -> str:
    plain = config_to_dict(cfg)
    for augmentation_only in ("n_generated", "ratio", "augment_days", "heavy_quantile", "temperature"):
        del plain["downstream"][augmentation_only]
    return json.dumps(
        {
            "source": data.source,
            "data": plain["data"],
            "stats": dataclasses.asdict(data.stats),
            "downstream": plain["downstream"],
            "grad_clip": cfg.train.grad_clip,
            "compile": cfg.train.compile,
            "threads": torch.get_num_threads(),
            "wet": cfg.eval.wet_threshold,
            "device": str(device),
            "bf16": bf16,
        },
        sort_keys=True,
        default=str,
    )


def _write(
    result: DownstreamResult,
    out_dir: Path,
    obs: torch.Tensor,
    mask: torch.Tensor,
    preds: dict[str, torch.Tensor],
    times: np.ndarray,
) -> None:
    from model.downstream_plots import plot_curves, plot_heavy_day

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1))
    cells = mask.sum(dim=(1, 2)).clamp_min(1)
    day = int((torch.where(mask, obs, 0.0).sum(dim=(1, 2)) / cells).argmax())
    plot_heavy_day(
        obs[day].cpu(),
        preds["without"][day].float().cpu(),
        preds["with"][day].float().cpu(),
        mask[day].cpu(),
        day=str(times[day])[:10],
        path=out_dir / DOWNSTREAM_FILES[1],
    )
    plot_curves(result.curves, out_dir / DOWNSTREAM_FILES[2])


def downstream_for_checkpoint(
    path: str | Path,
    *,
    out_dir: Path | None,
    downstream: DownstreamConfig | None = None,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> DownstreamResult:
    """:func:`run_downstream` of a saved cVAE on the data its config names.

    Args:
        path: A ``checkpoint.pt`` that ``train`` or a trial wrote.
        downstream: Settings to use instead of the checkpoint config's ``downstream`` section.
    """
    ckpt = read_checkpoint(path)
    cfg = ckpt.config
    if downstream is not None:
        cfg = dataclasses.replace(cfg, downstream=downstream)
    data = load_data(cfg.data, normalization=cfg.normalization)
    return run_downstream(
        ckpt.model, cfg, data, source=source or str(ckpt.path), out_dir=out_dir, progress=progress
    )


def downstream_for_config(
    cfg: Config,
    *,
    out_dir: Path | None,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> DownstreamResult:
    """Train the cVAE of ``cfg`` (its seed: an export reproduces its trial), then
    :func:`downstream_for_checkpoint` of it; the cVAE's outputs go to ``out_dir/cvae``."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_checkpoint=True))
    with tempfile.TemporaryDirectory(prefix="cvae-downstream-") as tmp:
        cvae_dir = out_dir / "cvae" if out_dir is not None else Path(tmp)
        if progress is not None:
            progress(f"training the cVAE ({cfg.train.epochs} epochs) into {cvae_dir}")
        trained = train(cfg, out_dir=cvae_dir)
        assert trained.checkpoint is not None  # save_checkpoint is on
        return downstream_for_checkpoint(
            trained.checkpoint,
            out_dir=out_dir,
            downstream=cfg.downstream,
            source=source or "config",
            progress=progress,
        )
