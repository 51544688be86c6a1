"""The cVAE training objective. Every formula used in training is written down here.

Notation: ``x`` the observed fine field in model space, ``y = to_mm(x)`` the same in mm/day,
``x_hat`` the decoder's differentiable prediction (``DecoderOutput.mean``), ``m`` the mask
(1 on valid cells), sums over all cells of the batch unless stated. Masked cells are replaced
by a finite value before any arithmetic, so NaN or fill values there reach no term or gradient.

KL, per sample b and latent dimension j (computed in float32):

    standard prior:  kl[b, j] = 0.5 * (mu^2 + exp(logvar) - 1 - logvar)
    diagonal prior:  kl[b, j] = 0.5 * (logvar_p - logvar + (exp(logvar) + (mu - mu_p)^2) / exp(logvar_p) - 1)

KL term (``LossConfig.kl_mode``, floor ``lambda = free_bits`` nats):

    plain:             KL = mean_b sum_j kl[b, j]
    free_bits_sample:  KL = mean_b sum_j max(kl[b, j], lambda)
    free_bits_batch:   KL = sum_j max(mean_b kl[b, j], lambda)      (Kingma et al. 2016)

A clamped entry is constant, so a dimension below the floor gets no gradient from the KL: the
encoder is not pushed to collapse it onto the prior.

Intensity weights, from the TRUE field in mm/day (``Normalization`` gives ``wet_mean_intensity``
and ``tail_threshold``):

    w = clamp(w_min + (1 - w_min) * y / wet_mean_intensity, w_min, w_max)
        * (tail_boost if y > tail_threshold else 1)

so a dry cell counts w_min, a typical wet cell about 1, heavy rain up to w_max, the tail twice
that with the default boost.

Reconstruction, squared error in model space (the weights already carry the amounts; a squared
error in mm/day would be dominated by a few extreme cells):

    regression:  recon = scale * sum(m * w * (x_hat - x)^2) / max(sum(m), 1)
    hurdle:      recon = scale * [ sum(m * BCE(wet_logit, wet)) / max(sum(m), 1)
                                   + sum(m * wet * w * (intensity - x)^2) / max(sum(m * wet), 1) ]

    copula:      recon = scale * [ sum(m * BCE(wet_logit, wet)) / max(sum(m), 1)
                                   + sum(m * wet * nll) / max(sum(m * wet), 1) ]
                 nll = 0.5 * ((x - intensity) / sigma)^2 + log(sigma) + log Phi((intensity - t) / sigma)

with ``wet = (y > wet_threshold)``, BCE the binary cross-entropy on the logit, ``sigma =
exp(log_sigma)`` and ``t`` the wet threshold in model space (the copula's intensity is a Gaussian
truncated below it). The copula's likelihood is not weighted: weights would bend the distribution
it learns towards heavy rain, where the point-estimate heads need them to keep the tail.

Gradient loss, over horizontally and vertically neighbouring pairs (i, k) that are both valid:

    grad = mean over pairs of |(x_hat_k - x_hat_i) - (x_k - x_i)|

Mass conservation, against the coarse input the sample was conditioned on (``coarse_mass``,
mm/day), never against the observed fine field: a penalty towards the truth pulls every sample
onto it and removes diversity. The generated amount in mm/day is

    regression:  g = to_mm(x_hat)
    hurdle:      g = sigmoid(wet_logit) * to_mm(intensity)      (expected amount, differentiable)
    copula:      g = sigmoid(wet_logit) * E[to_mm(N(intensity, sigma^2))]   (``Normalizer.expected_mm``)

and for each coarse cell c (a factor x factor block) with at least one valid fine cell

    block_mean_c = sum_{i in c}(m_i * g_i) / sum_{i in c} m_i
    mass = mean over such c of (block_mean_c - coarse_mass_c)^2          in (mm/day)^2

It is zero, and not computed, when ``lambda_mass == 0`` or there is no ``coarse_mass``.

Total:

    total = recon + beta * KL + lambda_grad * grad + lambda_mass * mass

where ``beta`` is ``beta_kl`` times the warm-up factor ``min(max(epoch_progress / warmup_epochs, 0), 1)``
(1 when there is no warm-up). Nothing here reads a tensor back to the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import LossConfig, Normalization
from model.cvae import ForwardOutput
from model.transform import Normalizer

__all__ = [
    "LossTerms",
    "compute_losses",
    "gradient_loss",
    "intensity_weights",
    "kl_per_dim",
    "kl_term",
    "kl_warmup_factor",
    "mass_loss",
]


@dataclass
class LossTerms:
    """The loss and its parts, all 0-dim tensors except ``kl_per_dim``.

    Attributes:
        total: ``recon + beta * kl + lambda_grad * grad + lambda_mass * mass``.
        recon: weighted reconstruction term (``scale`` included).
        kl: the KL term of ``kl_mode`` before ``beta`` (clamped under free bits).
        kl_raw: the unclamped ``mean_b sum_j kl[b, j]``.
        grad: the gradient loss.
        mass: the mass-conservation loss, (mm/day)^2.
        kl_per_dim: [D] batch-mean KL per latent dimension, detached.
    """

    total: Tensor
    recon: Tensor
    kl: Tensor
    kl_raw: Tensor
    grad: Tensor
    mass: Tensor
    kl_per_dim: Tensor


def kl_per_dim(
    mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None, prior_logvar: Tensor | None = None
) -> Tensor:
    """Closed-form KL(q || p) between diagonal Gaussians, per sample and dimension.

    Args:
        mu: [B, D] posterior mean.
        logvar: [B, D] posterior log-variance.
        prior_mu: [B, D] prior mean, or ``None`` (with ``prior_logvar``) for N(0, I).
        prior_logvar: [B, D] prior log-variance, or ``None``.

    Returns:
        [B, D] float32 KL in nats.
    """
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("kl_per_dim: give both prior_mu and prior_logvar, or neither")
    mu, logvar = mu.float(), logvar.float()
    if prior_mu is None or prior_logvar is None:
        return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    pm, plv = prior_mu.float(), prior_logvar.float()
    return 0.5 * (plv - logvar + (logvar.exp() + (mu - pm).square()) * torch.exp(-plv) - 1.0)


_KL_MODES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "plain": lambda kl, floor: kl.sum(1).mean(),
    "free_bits_sample": lambda kl, floor: kl.clamp(min=floor).sum(1).mean(),
    "free_bits_batch": lambda kl, floor: kl.mean(0).clamp(min=floor).sum(),
}


def kl_term(kl_pd: Tensor, mode: str, free_bits: float) -> Tensor:
    """The KL term of the loss (before ``beta``).

    Args:
        kl_pd: [B, D] KL per sample and dimension (``kl_per_dim``).
        mode: ``plain``, ``free_bits_sample`` or ``free_bits_batch`` (see the module docstring).
        free_bits: floor in nats per dimension (ignored by ``plain``).

    Returns:
        Scalar tensor.
    """
    try:
        fn = _KL_MODES[mode]
    except KeyError as e:
        raise ValueError(f"kl_mode: expected one of {', '.join(_KL_MODES)}, got {mode!r}") from e
    return fn(kl_pd, free_bits)


def kl_warmup_factor(epoch_progress: float, warmup_epochs: int) -> float:
    """Linear KL warm-up: 0 at the start, 1 after ``warmup_epochs`` (always 1 without warm-up).

    Args:
        epoch_progress: epochs completed so far, fractional within an epoch.
        warmup_epochs: length of the warm-up (``LossConfig.kl_warmup_epochs``).
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(max(epoch_progress / warmup_epochs, 0.0), 1.0)


def intensity_weights(y_mm: Tensor, cfg: LossConfig, stats: Normalization) -> Tensor:
    """Per-cell reconstruction weights from the true field in mm/day (see the module docstring)."""
    w = (cfg.w_min + (1.0 - cfg.w_min) * y_mm / stats.wet_mean_intensity).clamp(cfg.w_min, cfg.w_max)
    return w * torch.where(y_mm > stats.tail_threshold, cfg.tail_boost, 1.0)


def gradient_loss(x_hat: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """Mean |finite difference of ``x_hat`` - that of ``x``| over valid neighbouring pairs.

    Args:
        x_hat: [B, 1, H, W] prediction.
        x: [B, 1, H, W] target (finite everywhere).
        mask: [B, 1, H, W] bool, True on valid cells.
    """
    m = mask.to(x_hat.dtype)
    err = x_hat - x
    pair_h = m[..., :, 1:] * m[..., :, :-1]
    pair_v = m[..., 1:, :] * m[..., :-1, :]
    diff_h = (err[..., :, 1:] - err[..., :, :-1]).abs()
    diff_v = (err[..., 1:, :] - err[..., :-1, :]).abs()
    total = (pair_h * diff_h).sum() + (pair_v * diff_v).sum()
    return total / (pair_h.sum() + pair_v.sum()).clamp_min(1.0)


def mass_loss(generated_mm: Tensor, coarse_mass: Tensor, mask: Tensor, factor: int) -> Tensor:
    """Mean squared difference between masked block means and the coarse mass, (mm/day)^2.

    Args:
        generated_mm: [B, 1, H, W] generated amount in mm/day.
        coarse_mass: [B, 1, h, w] the conditioning coarse field in mm/day.
        mask: [B, 1, H, W] bool, True on valid cells.
        factor: fine cells per coarse cell along each axis.
    """
    m = mask.to(generated_mm.dtype)
    valid_frac = F.avg_pool2d(m, factor)
    block_mean = F.avg_pool2d(m * generated_mm, factor) / valid_frac.clamp_min(1e-12)
    has_valid = valid_frac > 0
    target = torch.where(has_valid, coarse_mass, 0.0)
    sq = torch.where(has_valid, (block_mean - target).square(), 0.0)
    return sq.sum() / has_valid.sum().clamp_min(1)


def compute_losses(
    out: ForwardOutput,
    fine: Tensor,
    mask: Tensor,
    coarse_mass: Tensor | None,
    *,
    cfg: LossConfig,
    normalizer: Normalizer,
    factor: int,
    beta: float | Tensor,
    wet_threshold: float = 0.1,
) -> LossTerms:
    """All loss terms for one batch.

    Args:
        out: ``CVAE.forward`` output.
        fine: [B, 1, H, W] observed field in model space.
        mask: [B, 1, H, W] bool, True on valid cells.
        coarse_mass: [B, 1, h, w] conditioning coarse precipitation in mm/day, or ``None``.
        cfg: loss weights and KL mode.
        normalizer: model space <-> mm/day and the training split's statistics.
        factor: fine cells per coarse cell along each axis.
        beta: KL weight for this step (``beta_kl`` times the warm-up factor).
        wet_threshold: mm/day above which a cell is wet (hurdle occurrence target).

    Returns:
        The terms and their weighted total (see the module docstring).
    """
    dec = out.decoded
    mask = mask.expand_as(fine)
    m = mask.float()
    x = torch.where(mask, fine.float(), normalizer.zero)
    y_mm = normalizer.to_mm(x)
    w = intensity_weights(y_mm, cfg, normalizer.stats)
    n_valid = m.sum().clamp_min(1.0)

    if dec.wet_logit is None:
        recon = cfg.scale * (m * w * (dec.mean - x).square()).sum() / n_valid
    else:
        wet = (y_mm > wet_threshold).float() * m
        bce = F.binary_cross_entropy_with_logits(dec.wet_logit, wet, reduction="none")
        occurrence = (m * bce).sum() / n_valid
        if dec.log_sigma is None:
            per_cell = w * (dec.mean - x).square()
        else:
            inv_sigma = torch.exp(-dec.log_sigma)
            t = normalizer.model_value(wet_threshold)
            per_cell = (
                0.5 * ((x - dec.mean) * inv_sigma).square()
                + dec.log_sigma
                + torch.special.log_ndtr((dec.mean - t) * inv_sigma)
            )
        intensity = (wet * per_cell).sum() / wet.sum().clamp_min(1.0)
        recon = cfg.scale * (occurrence + intensity)

    kl_pd = kl_per_dim(out.mu, out.logvar, out.prior_mu, out.prior_logvar)
    kl = kl_term(kl_pd, cfg.kl_mode, cfg.free_bits)
    kl_raw = kl_pd.sum(1).mean()
    grad = gradient_loss(dec.mean, x, mask)
    if cfg.lambda_mass > 0 and coarse_mass is not None:
        if dec.log_sigma is None:
            generated_mm = normalizer.to_mm(dec.mean)
        else:
            generated_mm = normalizer.expected_mm(dec.mean, dec.log_sigma.exp())
        if dec.wet_logit is not None:
            generated_mm = torch.sigmoid(dec.wet_logit) * generated_mm
        mass = mass_loss(generated_mm, coarse_mass.float(), mask, factor)
    else:
        mass = torch.zeros((), device=fine.device)

    total = recon + beta * kl + cfg.lambda_grad * grad + cfg.lambda_mass * mass
    return LossTerms(
        total=total,
        recon=recon,
        kl=kl,
        kl_raw=kl_raw,
        grad=grad,
        mass=mass,
        kl_per_dim=kl_pd.detach().mean(0),
    )
