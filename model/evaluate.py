"""Evaluation on a held-out split: K prior samples per coarse input, then every metric.

All generation happens on the model's device into preallocated tensors; the metrics
come back to the host once, at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from model.config import EvalConfig
from model.cvae import CVAE
from model.data import Dataset, Split
from model.metrics import METRICS, EvalData, collapse_probe, compute_diagnostics, compute_metrics

__all__ = ["Evaluation", "autocast", "evaluate", "evaluate_validation", "generate", "probe_collapse"]


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[object]:
    """The one precision context for training and evaluation: bf16 autocast or nothing."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class Evaluation:
    metrics: dict[str, float]
    diagnostics: dict[str, list[float]]
    data: EvalData


def _limit(split: Split, max_days: int | None) -> Split:
    if max_days is None or max_days >= len(split):
        return split
    return Split(
        fine=split.fine[:max_days],
        mask=split.mask[:max_days],
        coarse=split.coarse[:max_days],
        coarse_mass=None if split.coarse_mass is None else split.coarse_mass[:max_days],
        times=split.times[:max_days],
    )


@torch.no_grad()
def generate(
    model: CVAE,
    data: Dataset,
    split: Split,
    cfg: EvalConfig,
    *,
    n_samples: int,
    bf16: bool = False,
    with_latents: bool = True,
) -> EvalData:
    """Draw ``n_samples`` prior samples per day of ``split`` and gather what the metrics need."""
    device = split.fine.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    to_mm = data.normalizer.to_mm
    samples, recon_post, recon_prior, mu, logvar, prior_mu, prior_logvar = [], [], [], [], [], [], []
    was_training = model.training
    model.eval()
    with autocast(device, bf16):
        for start in range(0, len(split), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            fine, coarse = split.fine[sl], split.coarse[sl]
            draws, medians = model.sample_with_medians(
                coarse, data.static, n_samples, temperature=cfg.temperature, generator=gen
            )
            samples.append(to_mm(draws.float()))
            if with_latents:
                m, lv = model.encode(fine, coarse, data.static)
                pm, plv = model.prior(coarse, data.static)
                mu.append(m.float())
                logvar.append(lv.float())
                prior_mu.append(pm.float())
                prior_logvar.append(plv.float())
                recon_post.append(to_mm(model.reconstruct_mean(fine, coarse, data.static).float())[:, 0])
                # The copula's field is noise the decoder does not choose: z's use is judged without it.
                recon_prior.append(to_mm(medians[:, 0].float()))
    model.train(was_training)
    obs = to_mm(split.fine[:, 0])
    mask = split.mask[:, 0]
    all_samples = torch.cat(samples)

    def cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.cat(parts) if with_latents else None

    return EvalData(
        samples=all_samples,
        obs=obs,
        mask=mask,
        recon_post=cat(recon_post),
        recon_prior=cat(recon_prior),
        mu_post=cat(mu),
        logvar_post=cat(logvar),
        prior_mu=cat(prior_mu),
        prior_logvar=cat(prior_logvar),
        wet_threshold=cfg.wet_threshold,
        active_unit_threshold=cfg.active_unit_threshold,
        seed=cfg.seed,
    )


def evaluate(model: CVAE, data: Dataset, cfg: EvalConfig, *, bf16: bool = False) -> Evaluation:
    """Every registered metric on ``cfg.split`` (at most ``cfg.max_days`` days)."""
    split = _limit(getattr(data, cfg.split), cfg.max_days)
    ev = generate(model, data, split, cfg, n_samples=cfg.n_samples, bf16=bf16)
    return Evaluation(compute_metrics(ev), compute_diagnostics(ev), ev)


def probe_collapse(
    model: CVAE, data: Dataset, cfg: EvalConfig, *, days: int = 16, bf16: bool = False
) -> dict[str, float]:
    """Cheap collapse signals (sample spread, decoder's use of z) on a few validation days."""
    split = _limit(data.val, days)
    ev = generate(model, data, split, cfg, n_samples=4, bf16=bf16)
    assert ev.recon_post is not None and ev.recon_prior is not None
    return collapse_probe(ev.samples, ev.obs, ev.mask, ev.recon_post, ev.recon_prior)


def evaluate_validation(
    model: CVAE,
    data: Dataset,
    cfg: EvalConfig,
    names: Sequence[str] | None = None,
    *,
    days: int | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Metrics ``names`` (every metric when ``None``) on the first ``days`` validation days.

    ``cfg.n_samples`` prior draws per day, seeded by ``cfg.seed``, so the same model always
    gets the same values; ``days=None`` takes ``cfg.max_days``, which with ``cfg.split ==
    "val"`` is exactly what :func:`evaluate` reports. The latents and reconstructions are
    drawn only when a named metric needs them.
    """
    split = _limit(data.val, cfg.max_days if days is None else days)
    with_latents = names is None or any(METRICS[n].requires for n in names if n in METRICS)
    ev = generate(model, data, split, cfg, n_samples=cfg.n_samples, bf16=bf16, with_latents=with_latents)
    return compute_metrics(ev, names)
