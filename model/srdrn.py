"""SRDRN, the downstream super-resolution network (Wang et al. 2021, Water Resources Research).

Architecture: a 3x3 convolutional stem on the standardised coarse predictors, ``n_res_blocks``
residual blocks (conv-BN-ReLU-conv-BN plus the block's skip) followed by conv-BN, a global
skip from the stem around the whole stack, upsampling to the fine grid, then the static fine
fields (if any) concatenated and an output head (conv-ReLU-conv) ending in a softplus, so
every output is a non-negative amount in mm/day. Upsampling by any integer factor:

    pixel_shuffle:  one conv(C -> C p^2) + PixelShuffle(p) + ReLU stage per prime factor p
                    (12 = 2 * 2 * 3: three stages)
    resize_conv:    nearest-neighbour resize by the factor, then conv + ReLU

Losses, with ``m`` the mask (valid cells), ``y`` the observed field and ``q_k`` head k, both
in mm/day; masked cells are replaced before any arithmetic, so they reach no term or gradient:

    weighted_mae:  sum(m * w * |q_1 - y|) / max(sum(m), 1),  w = intensity_weights(y)  (the cVAE's formula,
                   with downstream.weight_min, weight_max and tail_boost)
    pinball:       mean_k sum(m * rho_tau_k(y - q_k)) / max(sum(m), 1),
                   rho_tau(e) = max(tau * e, (tau - 1) * e)

It knows nothing of Optuna, like the rest of ``model``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from model.config import Config, LossConfig, Normalization
from model.data import Dataset, Split
from model.evaluate import autocast
from model.losses import intensity_weights
from model.trainer import TrainingDiverged, _compiled

__all__ = [
    "UPSAMPLE_MODES",
    "GeneratedPairs",
    "SRDRN",
    "SRDRNFit",
    "build_srdrn",
    "predict",
    "srdrn_loss",
    "train_srdrn",
]

_log = logging.getLogger(__name__)

UPSAMPLE_MODES = ("pixel_shuffle", "resize_conv")

# Independent random streams derived from one seed: weights, real batches, generated batches.
_INIT, _REAL, _GENERATED = 0, 1, 2


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            _conv(channels, channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _upsampler(channels: int, factor: int, mode: str) -> nn.Sequential:
    if mode == "resize_conv":
        if factor == 1:
            return nn.Sequential()
        return nn.Sequential(
            nn.Upsample(scale_factor=factor, mode="nearest"), _conv(channels, channels), nn.ReLU(inplace=True)
        )
    stages: list[nn.Module] = []
    for p in _prime_factors(factor):
        stages += [_conv(channels, channels * p * p), nn.PixelShuffle(p), nn.ReLU(inplace=True)]
    return nn.Sequential(*stages)


class SRDRN(nn.Module):
    """Coarse predictors (and static fine fields) to fine precipitation in mm/day.

    Args:
        n_predictors: P, channels of the coarse input.
        n_static: S, static fine fields concatenated after upsampling (0 for none).
        factor: Fine cells per coarse cell along each axis (any integer >= 1).
        channels: Filters of every convolution before the head's last.
        n_res_blocks: Residual blocks (0 leaves the stem, its global skip and one conv-BN).
        upsample: ``pixel_shuffle`` or ``resize_conv`` (see the module docstring).
        n_outputs: Output heads: 1, or one per quantile of the pinball loss.
    """

    def __init__(
        self,
        n_predictors: int,
        n_static: int,
        factor: int,
        channels: int,
        n_res_blocks: int,
        upsample: str = "pixel_shuffle",
        n_outputs: int = 1,
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(
                f"downstream.upsample: expected one of {', '.join(UPSAMPLE_MODES)}, got {upsample!r}"
            )
        for name, value, lo in (
            ("n_predictors", n_predictors, 1),
            ("n_static", n_static, 0),
            ("factor", factor, 1),
            ("channels", channels, 1),
            ("n_res_blocks", n_res_blocks, 0),
            ("n_outputs", n_outputs, 1),
        ):
            if value < lo:
                raise ValueError(f"SRDRN: {name}: expected an integer >= {lo}, got {value}")
        self.factor = factor
        self.n_static = n_static
        self.n_outputs = n_outputs
        self.stem = nn.Sequential(_conv(n_predictors, channels), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            *(_ResBlock(channels) for _ in range(n_res_blocks)),
            _conv(channels, channels),
            nn.BatchNorm2d(channels),
        )
        self.upsample = _upsampler(channels, factor, upsample)
        self.head = nn.Sequential(
            _conv(channels + n_static, channels), nn.ReLU(inplace=True), _conv(channels, n_outputs)
        )

    def forward(self, coarse: Tensor, static: Tensor | None) -> Tensor:
        """Fine fields for a batch of coarse inputs.

        Args:
            coarse: [B, P, h, w] standardised predictors (``Split.coarse``).
            static: [S, H, W] standardised static fields (``Dataset.static``; S may be 0), or ``None``.

        Returns:
            [B, n_outputs, h * factor, w * factor] precipitation in mm/day, >= 0.
        """
        x = self.stem(coarse)
        x = self.upsample(x + self.blocks(x))
        if self.n_static > 0:
            if static is None or static.shape != (self.n_static, *x.shape[-2:]):
                got = None if static is None else tuple(static.shape)
                raise ValueError(f"SRDRN: static: expected shape {(self.n_static, *x.shape[-2:])}, got {got}")
            x = torch.cat([x, static.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        return nn.functional.softplus(self.head(x))


def _quantiles(cfg: Config) -> list[float]:
    qs = cfg.downstream.quantiles
    if not qs or not all(0.0 < q < 1.0 for q in qs):
        raise ValueError(f"downstream.quantiles: expected a non-empty list of values in (0, 1), got {qs}")
    return qs


def build_srdrn(cfg: Config, data: Dataset) -> SRDRN:
    """The SRDRN of ``cfg.downstream`` on ``data``'s grid (one head per quantile for ``pinball``)."""
    d = cfg.downstream
    return SRDRN(
        n_predictors=data.n_predictors,
        n_static=data.n_static,
        factor=data.factor,
        channels=d.channels,
        n_res_blocks=d.n_res_blocks,
        upsample=d.upsample,
        n_outputs=len(_quantiles(cfg)) if d.loss == "pinball" else 1,
    )


def srdrn_weighting(cfg: Config) -> LossConfig:
    """The intensity weighting of SRDRN's weighted MAE: ``downstream``'s, not the cVAE's ``loss``
    (which a study searches), so every trial's SRDRN trains on one loss."""
    d = cfg.downstream
    return LossConfig(w_min=d.weight_min, w_max=d.weight_max, tail_boost=d.tail_boost)


def _loss_sum(
    pred_mm: Tensor, obs_mm: Tensor, mask: Tensor, cfg: Config, stats: Normalization
) -> tuple[Tensor, Tensor]:
    """The loss summed over valid cells (averaged over heads), and the number of valid cells."""
    # Both replaced by 0 on invalid cells before any arithmetic: their terms are 0 and no NaN
    # there can reach a gradient (as it would through a product taken before the selection).
    pred = torch.where(mask.unsqueeze(1), pred_mm.float(), 0.0)
    y = torch.where(mask, obs_mm.float(), 0.0).unsqueeze(1)
    n_valid = mask.sum()
    if cfg.downstream.loss == "weighted_mae":
        if pred.shape[1] != 1:
            raise ValueError(f"srdrn_loss: weighted_mae expects one output head, got {pred.shape[1]}")
        return (intensity_weights(y, srdrn_weighting(cfg), stats) * (pred - y).abs()).sum(), n_valid
    qs = _quantiles(cfg)
    if pred.shape[1] != len(qs):
        raise ValueError(
            f"srdrn_loss: pinball expects {len(qs)} heads (downstream.quantiles), got {pred.shape[1]}"
        )
    total = pred.new_zeros(())
    for k, tau in enumerate(qs):  # Python floats: no tensor built on the host per step
        err = y[:, 0] - pred[:, k]
        total = total + torch.maximum(tau * err, (tau - 1.0) * err).sum()
    return total / len(qs), n_valid


def srdrn_loss(pred_mm: Tensor, obs_mm: Tensor, mask: Tensor, cfg: Config, stats: Normalization) -> Tensor:
    """SRDRN's training loss, ``cfg.downstream.loss`` (formulas in the module docstring).

    Args:
        pred_mm: [B, Q, H, W] predictions in mm/day (Q = 1 for ``weighted_mae``, else one per quantile).
        obs_mm: [B, H, W] observed fields in mm/day (invalid cells: anything, NaN included).
        mask: [B, H, W] bool, True on valid cells; the others never enter.
        cfg: ``downstream.loss`` and ``quantiles``; ``loss`` for the intensity weights.
        stats: The training split's statistics (the weights' reference intensities).

    Returns:
        Scalar float32 tensor: the mean over valid cells (and heads).
    """
    total, n_valid = _loss_sum(pred_mm, obs_mm, mask, cfg, stats)
    return total / n_valid.clamp_min(1)


@dataclass
class GeneratedPairs:
    """Generated fine fields, each paired with the coarse input of the training day it came from.

    Attributes:
        day: [M] long: index into the training split of the day whose coarse input each field pairs with.
        fine_mm: [M, H, W] generated fields in mm/day (invalid cells: anything; the day's mask applies).
    """

    day: Tensor
    fine_mm: Tensor


@dataclass
class SRDRNFit:
    """A trained SRDRN and how it got there."""

    model: SRDRN
    """The selected weights (``downstream.selection``), in eval mode."""
    curve: list[dict[str, float]]
    """One entry per validation check: ``step``, ``epoch`` (real pairs seen / training days),
    ``train_loss`` (mean of the steps since the previous check) and ``val_loss``."""
    steps: int
    """Optimiser steps taken."""
    selected_step: int
    """The step whose weights ``model`` holds."""


def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class _Batches:
    """Index batches: shuffled epochs of the training split from one generator, and generated
    pairs drawn uniformly with replacement from the pool by a second, so that the real batches
    do not depend on whether, or how many, generated pairs are drawn."""

    def __init__(
        self, n_train: int, batch_size: int, n_pool: int, n_generated: int, seed: int, device: torch.device
    ) -> None:
        self.n_train, self.batch_size = n_train, batch_size
        self.n_pool, self.n_generated = n_pool, n_generated
        self.device = device
        self.real_gen = torch.Generator(device=device).manual_seed(_stream_seed(seed, _REAL))
        self.gen_gen = torch.Generator(device=device).manual_seed(_stream_seed(seed, _GENERATED))
        self.perm = torch.empty(0, dtype=torch.long, device=device)
        self.pos = n_train  # the first call starts an epoch

    def next(self) -> tuple[Tensor, Tensor | None]:
        """The next real indices (the epoch's last batch may be short) and generated ones (or ``None``)."""
        if self.pos >= self.n_train:
            self.perm = torch.randperm(self.n_train, generator=self.real_gen, device=self.device)
            self.pos = 0
        real = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        if self.n_pool == 0 or self.n_generated == 0:
            return real, None
        drawn = torch.randint(self.n_pool, (self.n_generated,), generator=self.gen_gen, device=self.device)
        return real, drawn


class _StepLoss(nn.Module):
    """One batch's loss, one module so that ``torch.compile`` sees the model and the loss together."""

    def __init__(self, model: SRDRN, static: Tensor, cfg: Config, stats: Normalization) -> None:
        super().__init__()
        self.model, self.static, self.cfg, self.stats = model, static, cfg, stats

    def forward(self, coarse: Tensor, obs_mm: Tensor, mask: Tensor) -> Tensor:
        return srdrn_loss(self.model(coarse, self.static), obs_mm, mask, self.cfg, self.stats)


def _check_generated(generated: GeneratedPairs, data: Dataset, device: torch.device) -> GeneratedPairs:
    day, fine = generated.day.to(device), generated.fine_mm.to(device)
    m = day.shape[0]
    if day.dim() != 1 or day.dtype != torch.long:
        raise ValueError(
            f"generated.day: expected a 1-d long tensor, got {day.dtype} of shape {tuple(day.shape)}"
        )
    if fine.shape != (m, data.height, data.width):
        raise ValueError(
            f"generated.fine_mm: expected shape {(m, data.height, data.width)}, got {tuple(fine.shape)}"
        )
    if m and not (0 <= int(day.min()) and int(day.max()) < len(data.train)):
        lo, hi = int(day.min()), int(day.max())
        raise ValueError(f"generated.day: expected indices in [0, {len(data.train)}), got {lo}..{hi}")
    return GeneratedPairs(day=day, fine_mm=fine.float())


def _gather(
    coarse: Tensor,
    obs_mm: Tensor,
    mask: Tensor,
    real: Tensor,
    pool: GeneratedPairs | None,
    drawn: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A batch's coarse inputs, fields and masks: the real days, then the drawn generated fields
    with the coarse input and the mask of their own day."""
    if pool is None or drawn is None:
        return coarse[real], obs_mm[real], mask[real]
    days = pool.day[drawn]
    return (
        torch.cat([coarse[real], coarse[days]]),
        torch.cat([obs_mm[real], pool.fine_mm[drawn]]),
        torch.cat([mask[real], mask[days]]),
    )


def _val_loss(model: SRDRN, data: Dataset, obs_mm: Tensor, mask: Tensor, cfg: Config, bf16: bool) -> Tensor:
    """Mean loss over every valid cell of the validation split, batched, on the device."""
    split, device = data.val, obs_mm.device
    total = torch.zeros((), device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad(), autocast(device, bf16):
        for start in range(0, len(split), cfg.downstream.batch_size_eval):
            sl = slice(start, start + cfg.downstream.batch_size_eval)
            s, n = _loss_sum(model(split.coarse[sl], data.static), obs_mm[sl], mask[sl], cfg, data.stats)
            total, count = total + s, count + n
    return total / count.clamp_min(1)


def _check_steps(steps: int, checks: int) -> list[int]:
    """``checks`` evenly spaced steps ending at ``steps`` (fewer when there are fewer steps)."""
    return sorted({math.ceil(k * steps / checks) for k in range(1, checks + 1)})


def train_srdrn(
    cfg: Config,
    data: Dataset,
    *,
    seed: int,
    generated: GeneratedPairs | None = None,
    device: torch.device,
    bf16: bool = False,
    compile: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SRDRNFit:
    """Train SRDRN (``cfg.downstream``) on the real training split, plus ``generated`` pairs if given.

    What the comparison of the two arms (without and with ``generated``) relies on:

    - Everything is resident on ``device`` (``data`` already is); batches are gathered there by
      index, and the host reads values back only at the validation checks.
    - ``seed`` alone fixes the weights' initialisation and the order of the real pairs: for one
      seed both arms start from the same weights and see the same real batches in the same
      order. Generated pairs are drawn from a second generator, uniformly with replacement.
    - A batch holds ``batch_size`` real pairs (shuffled epochs over the training split; an
      epoch's last batch holds the rest) and, with ``generated``, ``round(ratio * batch_size)``
      generated pairs, each with the coarse input and the mask of its own ``day``. An empty
      pool trains exactly as no pool.
    - ``budget: steps``: both arms take ``steps`` optimiser steps. ``budget: epochs``: both take
      ``epochs * ceil(n_train / batch_size)`` steps, which is ``epochs`` passes over the real
      pairs for either; the augmented arm then sees more fields per step.
    - Adam at ``lr``, gradients clipped at ``train.grad_clip`` (off at 0).
    - ``val_checks`` evenly spaced checks of the loss on the validation split (real pairs only),
      the last at the final step; ``selection: best_val`` returns the weights of the lowest
      check (the earliest on a tie), ``last`` the final ones.

    Args:
        cfg: The config (``downstream``, ``loss`` for the intensity weights, ``train.grad_clip``).
        data: The dataset, on ``device``.
        seed: Seeds the weights, the real batches and the generated draws.
        generated: Generated pairs for the augmented arm, or ``None``.
        device: Where ``data`` is and training runs.
        bf16: bf16 autocast (``model.evaluate.autocast``); the loss is computed in float32.
        compile: ``torch.compile`` the step, falling back to eager on failure.
        progress: Called with one line per validation check.

    Raises:
        ValueError: ``generated`` does not fit ``data``.
        TrainingDiverged: The training or validation loss became NaN or infinite.
    """
    d = cfg.downstream
    train_split = data.train
    n_train = len(train_split)
    if n_train == 0 or len(data.val) == 0:
        raise ValueError(
            f"{data.source}: SRDRN needs training and validation days, got {n_train} and {len(data.val)}"
        )
    obs_train, mask_train = data.normalizer.to_mm(train_split.fine[:, 0]), train_split.mask[:, 0]
    obs_val, mask_val = data.normalizer.to_mm(data.val.fine[:, 0]), data.val.mask[:, 0]
    pool = None if generated is None else _check_generated(generated, data, device)
    n_pool = 0 if pool is None else pool.day.shape[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream_seed(seed, _INIT))
        model = build_srdrn(cfg, data)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=d.lr, fused=device.type == "cuda")
    step_loss = _StepLoss(model, data.static, cfg, data.stats)
    loss_fn = _compiled(step_loss, device) if compile else step_loss

    steps = d.steps if d.budget == "steps" else d.epochs * math.ceil(n_train / d.batch_size)
    checks = _check_steps(steps, d.val_checks)
    batches = _Batches(n_train, d.batch_size, n_pool, round(d.ratio * d.batch_size), seed, device)
    curve: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    running = torch.zeros((), device=device)
    since, seen = 0, 0
    model.train()
    for step in range(1, steps + 1):
        real, drawn = batches.next()
        coarse, obs, mask = _gather(train_split.coarse, obs_train, mask_train, real, pool, drawn)
        with autocast(device, bf16):
            loss = loss_fn(coarse, obs, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        running += loss.detach()
        since += 1
        seen += real.shape[0]
        if step != checks[0]:
            continue
        checks.pop(0)
        model.eval()
        val = float(_val_loss(model, data, obs_val, mask_val, cfg, bf16))
        model.train()
        entry = {"step": step, "epoch": seen / n_train, "train_loss": float(running) / since, "val_loss": val}
        if not (math.isfinite(entry["train_loss"]) and math.isfinite(val)):
            raise TrainingDiverged(
                f"SRDRN loss is not finite at step {step}: train {entry['train_loss']}, val {val}"
            )
        curve.append(entry)
        running.zero_()
        since = 0
        if progress is not None:
            progress(f"SRDRN step {step}/{steps}: train loss {entry['train_loss']:.4g}, val loss {val:.4g}")
        if d.selection == "best_val" and (best is None or val < best[0]):
            best = (val, step, copy.deepcopy(model.state_dict()))

    selected = steps
    if best is not None:
        _, selected, state = best
        model.load_state_dict(state)
    model.eval()
    return SRDRNFit(model=model, curve=curve, steps=steps, selected_step=selected)


def predict(model: SRDRN, data: Dataset, split: Split, *, batch_size: int, bf16: bool = False) -> Tensor:
    """The model's fields for every day of ``split``, batched, without gradients.

    Returns:
        [N, Q, H, W] float32 mm/day on the split's device.
    """
    device = split.coarse.device
    out = torch.empty(len(split), model.n_outputs, data.height, data.width, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, bf16):
        for start in range(0, len(split), batch_size):
            sl = slice(start, start + batch_size)
            out[sl] = model(split.coarse[sl], data.static).float()
    model.train(was_training)
    return out
