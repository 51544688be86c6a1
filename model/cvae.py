"""The conditional VAE: q(z | fine, coarse, static), p(z | coarse, static) and p(fine | z, coarse, static).

Shapes: ``fine`` [B, 1, H, W] in model space, ``coarse`` [B, P, h, w] standardised coarse
predictors with ``H = h * factor`` and ``W = w * factor``, ``static`` [S, H, W] standardised
high-resolution fields shared by every sample (``None`` when S is 0), ``z`` [B, D].

Encoder: the fine field, the coarse predictors (nearest-upsampled to the fine grid) and the
static fields -> conv stem -> three strided stages of residual blocks -> average pool to the
coarse grid (``encoder_pool: grid``; the stages' own 1/8 grid where that is coarser) or to one
cell (``global``) -> linear -> ``mu``, ``logvar``.

Decoder: coarse predictors -> conv features on the coarse grid; ``z`` -> linear -> a
``channels x h x w`` map, so the latent can place structure in space rather than only shift
the whole field; both -> residual blocks -> bilinear interpolation to exactly H x W (any
integer factor, 12 included) -> conv -> concatenate static -> residual blocks -> output head.

Output heads (``ModelConfig.output``):

* ``regression``: one channel, the model-space field.
* ``hurdle``: a wet-probability logit and a model-space intensity. The generated field is
  ``where(sigmoid(logit) > 0.5, intensity, dry_value)``. Occurrence is thresholded rather
  than drawn per cell: independent Bernoulli draws per cell would scatter salt-and-pepper
  rain, while the sample-to-sample variability belongs in ``z``, which moves whole rain areas.
* ``copula``: a wet-probability logit, and the mean and log standard deviation of a Gaussian
  model-space intensity, per cell. A sample draws one Gaussian field ``u`` with unit variance
  and correlation length ``noise_length`` (a Gaussian filter applied to white noise on the
  periodic grid) and reads both occurrence and intensity from it, a Gaussian copula:

      wet where Phi(u) > 1 - p;   intensity = F^-1((Phi(u) - (1 - p)) / p)

  with ``F`` the intensity's distribution: a Gaussian(mean, sigma) truncated below the wet
  threshold (``wet_value``), which lets it pile up light rain just above the threshold as a
  gamma-like intensity does in log space;
  each cell's draw follows its own predicted distribution, rain comes in coherent patches,
  and the light rain lies at the patches' edges with the heaviest in their cores, as observed.
  ``z`` still places the rain areas; the field adds the fine-scale detail a coarse cell leaves
  open, which a decoder trained on a mean cannot draw (it smooths it into drizzle). Without a
  generator (``reconstruct_mean``, training) the field is the median: ``mean`` where p > 0.5.

Priors (``ModelConfig.prior``): ``standard`` is N(0, I); ``learned`` is a small network on
the coarse (and pooled static) inputs giving a diagonal Gaussian p(z | coarse) (Sohn et al.
2015), so samples at test time come from the same distribution the KL trained against.

Latent statistics (``mu``, ``logvar``, ``z``) are float32 even under bf16 autocast, and
``logvar`` is clamped to [-30, 20] so that ``exp`` stays finite. All randomness comes from
an optional ``torch.Generator`` on the model's device, so evaluation can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ConfigError, ModelConfig, config_from_dict

__all__ = ["CVAE", "DecoderOutput", "ForwardOutput", "correlated_noise"]

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
LOG_SIGMA_MIN = -7.0
LOG_SIGMA_MAX = 3.0
_N_ENCODER_STAGES = 3


@dataclass
class DecoderOutput:
    """What the decoder produces for a batch of latents.

    Attributes:
        field: [B, 1, H, W] the generated model-space field.
        mean: [B, 1, H, W] differentiable model-space prediction for the reconstruction loss
            (the regression output, or the hurdle intensity).
        wet_logit: [B, 1, H, W] wet-probability logit (hurdle and copula, else ``None``).
        log_sigma: [B, 1, H, W] log standard deviation of the intensity (copula, else ``None``).
    """

    field: Tensor
    mean: Tensor
    wet_logit: Tensor | None
    log_sigma: Tensor | None = None


@dataclass
class ForwardOutput:
    """A training pass: the posterior, the prior, the sampled latent and its decoding.

    Attributes:
        decoded: the decoder's output for ``z``.
        mu: [B, D] posterior mean (float32).
        logvar: [B, D] posterior log-variance (float32, clamped).
        prior_mu: [B, D] prior mean (zeros for the standard prior).
        prior_logvar: [B, D] prior log-variance (zeros for the standard prior).
        z: [B, D] reparameterised sample ``mu + exp(logvar / 2) * eps``.
    """

    decoded: DecoderOutput
    mu: Tensor
    logvar: Tensor
    prior_mu: Tensor
    prior_logvar: Tensor
    z: Tensor


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)


class _ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv) twice, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            _conv(channels, channels),
            _norm(channels),
            nn.SiLU(),
            _conv(channels, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _res_stack(channels: int, n_blocks: int) -> nn.Sequential:
    return nn.Sequential(*[_ResBlock(channels) for _ in range(n_blocks)])


def correlated_noise(
    shape: torch.Size | tuple[int, ...],
    length: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Gaussian fields with unit variance and a Gaussian correlation of standard deviation
    ``length`` cells over the last two dimensions, periodic at the edges (filtered in Fourier
    space, so the variance is exactly one everywhere)."""
    white = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    ky = torch.fft.fftfreq(shape[-2], device=device)[:, None]
    kx = torch.fft.fftfreq(shape[-1], device=device)[None, :]
    gain = torch.exp(-2.0 * math.pi**2 * length**2 * (ky.square() + kx.square()))
    gain = gain / gain.square().mean().sqrt()
    return torch.fft.ifft2(torch.fft.fft2(white) * gain).real


def _gaussian_params(h: Tensor) -> tuple[Tensor, Tensor]:
    """Split a [B, 2D] linear output into float32 ``mu`` and clamped ``logvar``."""
    mu, logvar = h.float().chunk(2, dim=1)
    return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class CVAE(nn.Module):
    """Conditional VAE for high-resolution precipitation given coarse predictors.

    Args:
        cfg: widths, depth, latent size, output head and prior.
        height: fine-grid rows H.
        width: fine-grid columns W.
        factor: integer ratio between the fine and the coarse grid.
        n_predictors: coarse predictor channels P.
        n_static: static high-resolution channels S (may be 0).
        dry_value: model-space value of 0 mm/day (``Normalizer.zero``), the hurdle's dry cells.
        wet_value: model-space value of the wet threshold, below which the copula's intensity
            is truncated (``None``: not truncated).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        height: int,
        width: int,
        factor: int,
        n_predictors: int,
        n_static: int,
        dry_value: float,
        wet_value: float | None = None,
    ) -> None:
        super().__init__()
        if factor < 1 or height % factor or width % factor:
            raise ValueError(f"CVAE: factor {factor} must be a positive divisor of the grid {height}x{width}")
        if n_predictors < 1 or n_static < 0:
            raise ValueError(
                f"CVAE: expected n_predictors >= 1 and n_static >= 0, got {n_predictors}, {n_static}"
            )
        self.cfg = cfg
        self.height, self.width, self.factor = height, width, factor
        self.coarse_height, self.coarse_width = height // factor, width // factor
        self.n_predictors, self.n_static = n_predictors, n_static
        self.dry_value = float(dry_value)
        self.wet_value = None if wet_value is None else float(wet_value)
        c, d, n_res = cfg.channels, cfg.latent_dim, cfg.n_res_blocks

        enc: list[nn.Module] = [_conv(1 + n_predictors + n_static, c)]
        c_in = c
        for _ in range(_N_ENCODER_STAGES):
            enc += [_conv(c_in, 2 * c, stride=2), _res_stack(2 * c, n_res)]
            c_in = 2 * c
        pooled = (1, 1) if cfg.encoder_pool == "global" else self._grid_pool(height, width)
        enc += [
            _norm(2 * c),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
            nn.Linear(2 * c * pooled[0] * pooled[1], 2 * d),
        ]
        self.encoder = nn.Sequential(*enc)

        self.coarse_features = _conv(n_predictors, 2 * c)
        self.z_to_map = nn.Linear(d, c * self.coarse_height * self.coarse_width)
        self.coarse_trunk = nn.Sequential(_conv(3 * c, 2 * c), _res_stack(2 * c, n_res))
        self.up_conv = _conv(2 * c, c)
        self.fine_trunk = nn.Sequential(_conv(c + n_static, c), _res_stack(c, n_res))
        n_out = {"regression": 1, "hurdle": 2, "copula": 3}[cfg.output]
        self.head = nn.Sequential(_norm(c), nn.SiLU(), _conv(c, n_out))

        self.prior_net: nn.Sequential | None = None
        if cfg.prior == "learned":
            last = nn.Linear(2 * c, 2 * d)
            # Zero init: the learned prior starts as N(0, I) and moves only as the KL asks it to.
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.prior_net = nn.Sequential(
                _conv(n_predictors + n_static, c),
                _norm(c),
                nn.SiLU(),
                _conv(c, 2 * c, stride=2),
                _norm(2 * c),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                last,
            )

    def _grid_pool(self, height: int, width: int) -> tuple[int, int]:
        """The grid encoder's pooled size: the coarse grid, or the stages' own grid where that
        is coarser (factor < 8), since pooling up to a finer grid would only repeat features."""
        for _ in range(_N_ENCODER_STAGES):  # stride-2, padding-1 convolutions
            height, width = (height + 1) // 2, (width + 1) // 2
        return min(self.coarse_height, height), min(self.coarse_width, width)

    # --- construction from a checkpoint ---------------------------------------------------------

    def model_args(self) -> dict[str, Any]:
        """Plain JSON-able constructor arguments; ``CVAE.from_args`` rebuilds the same model."""
        return {
            "model": dataclasses.asdict(self.cfg),
            "height": self.height,
            "width": self.width,
            "factor": self.factor,
            "n_predictors": self.n_predictors,
            "n_static": self.n_static,
            "dry_value": self.dry_value,
            "wet_value": self.wet_value,
        }

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> CVAE:
        """Build an (untrained) model from ``model_args()``; load the weights with ``load_state_dict``."""
        args = dict(args)
        try:
            cfg = config_from_dict({"model": args.pop("model")}, source="model_args").model
            return cls(cfg, **args)
        except KeyError as e:
            raise ValueError(f"model_args: missing key {e}") from e
        except (TypeError, ConfigError) as e:
            raise ValueError(f"model_args: not valid CVAE arguments ({e})") from e

    # --- conditioning ----------------------------------------------------------------------------

    def _check(self, coarse: Tensor, static: Tensor | None) -> None:
        expected = (self.n_predictors, self.coarse_height, self.coarse_width)
        if coarse.dim() != 4 or tuple(coarse.shape[1:]) != expected:
            raise ValueError(
                f"coarse: expected [B, {', '.join(map(str, expected))}], got {list(coarse.shape)}"
            )
        if self.n_static == 0:
            if static is not None and static.shape[0] != 0:
                raise ValueError(
                    f"static: the model was built without static fields, got {list(static.shape)}"
                )
        elif static is None or tuple(static.shape) != (self.n_static, self.height, self.width):
            got = None if static is None else list(static.shape)
            raise ValueError(f"static: expected [{self.n_static}, {self.height}, {self.width}], got {got}")

    def _static_batch(self, static: Tensor | None, batch: int) -> Tensor | None:
        if self.n_static == 0 or static is None:
            return None
        return static.unsqueeze(0).expand(batch, -1, -1, -1)

    # --- the three distributions -----------------------------------------------------------------

    def encode(self, fine: Tensor, coarse: Tensor, static: Tensor | None) -> tuple[Tensor, Tensor]:
        """Posterior q(z | fine, coarse, static): ``mu`` and ``logvar`` [B, D], float32."""
        self._check(coarse, static)
        if tuple(fine.shape[1:]) != (1, self.height, self.width):
            raise ValueError(f"fine: expected [B, 1, {self.height}, {self.width}], got {list(fine.shape)}")
        parts = [fine, F.interpolate(coarse, size=(self.height, self.width), mode="nearest")]
        s = self._static_batch(static, fine.shape[0])
        if s is not None:
            parts.append(s)
        return _gaussian_params(self.encoder(torch.cat(parts, dim=1)))

    def prior(self, coarse: Tensor, static: Tensor | None) -> tuple[Tensor, Tensor]:
        """Prior p(z | coarse, static): ``mu`` and ``logvar`` [B, D], float32 (zeros if standard)."""
        self._check(coarse, static)
        if self.prior_net is None:
            zeros = torch.zeros(coarse.shape[0], self.cfg.latent_dim, device=coarse.device)
            return zeros, zeros.clone()
        parts = [coarse]
        s = self._static_batch(static, coarse.shape[0])
        if s is not None:
            parts.append(F.avg_pool2d(s, self.factor))
        return _gaussian_params(self.prior_net(torch.cat(parts, dim=1)))

    def decode(self, z: Tensor, coarse: Tensor, static: Tensor | None) -> DecoderOutput:
        """Likelihood p(fine | z, coarse, static): the generated field and its differentiable mean."""
        self._check(coarse, static)
        b = coarse.shape[0]
        z_map = self.z_to_map(z).view(b, self.cfg.channels, self.coarse_height, self.coarse_width)
        h = self.coarse_trunk(torch.cat([self.coarse_features(coarse), z_map], dim=1))
        h = F.interpolate(h, size=(self.height, self.width), mode="bilinear", align_corners=False)
        h = self.up_conv(h)
        s = self._static_batch(static, b)
        if s is not None:
            h = torch.cat([h, s.to(h.dtype)], dim=1)
        # float32 outputs: the losses and metrics downstream convert to mm/day with exp.
        out = self.head(self.fine_trunk(h)).float()
        if self.cfg.output == "regression":
            return DecoderOutput(field=out, mean=out, wet_logit=None)
        wet_logit, intensity = out[:, :1], out[:, 1:2]
        dry = torch.full_like(intensity, self.dry_value)
        field = torch.where(torch.sigmoid(wet_logit) > 0.5, intensity, dry)
        log_sigma = out[:, 2:].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX) if self.cfg.output == "copula" else None
        return DecoderOutput(field=field, mean=intensity, wet_logit=wet_logit, log_sigma=log_sigma)

    def draw(self, decoded: DecoderOutput, generator: torch.Generator | None = None) -> Tensor:
        """A random field from the decoder's per-cell distributions (``copula``; see the module
        docstring); the other heads' field as it is.

        Returns:
            [B, 1, H, W] model-space fields.
        """
        if decoded.log_sigma is None or decoded.wet_logit is None:
            return decoded.field
        u = correlated_noise(decoded.mean.shape, self.cfg.noise_length, generator, decoded.mean.device)
        p = torch.sigmoid(decoded.wet_logit)
        cdf = torch.special.ndtr(u)
        # The wet part of the uniform, rescaled to (0, 1): the intensity's quantile.
        q = ((cdf - (1.0 - p)) / p.clamp_min(1e-6)).clamp(1e-6, 1.0 - 1e-6)
        sigma = decoded.log_sigma.exp()
        # Upper tail mass of the untruncated Gaussian above the threshold; quantiles are taken
        # from the top (1 - q of it), which stays accurate when the mean is far below.
        tail = (
            torch.ones_like(q)
            if self.wet_value is None
            else torch.special.ndtr((decoded.mean - self.wet_value) / sigma)
        )
        intensity = decoded.mean - sigma * torch.special.ndtri(((1.0 - q) * tail).clamp_min(1e-30))
        return torch.where(cdf > 1.0 - p, intensity, torch.full_like(intensity, self.dry_value))

    # --- training and generation -----------------------------------------------------------------

    def forward(
        self,
        fine: Tensor,
        coarse: Tensor,
        static: Tensor | None,
        *,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ForwardOutput:
        """Encode, draw ``z = mu + exp(logvar / 2) * eps`` and decode it; also return the prior.

        ``eps`` [B, D] may be drawn by the caller (outside a compiled region); otherwise it is
        drawn here from ``generator``.
        """
        mu, logvar = self.encode(fine, coarse, static)
        prior_mu, prior_logvar = self.prior(coarse, static)
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        return ForwardOutput(
            decoded=self.decode(z, coarse, static),
            mu=mu,
            logvar=logvar,
            prior_mu=prior_mu,
            prior_logvar=prior_logvar,
            z=z,
        )

    @torch.no_grad()
    def sample(
        self,
        coarse: Tensor,
        static: Tensor | None,
        n_samples: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw K fields per coarse input from the prior, decoded in one batch.

        Args:
            coarse: [B, P, h, w] coarse predictors.
            static: [S, H, W] static fields, or ``None`` when S is 0.
            n_samples: K, samples per coarse input.
            temperature: scale of the prior's standard deviation, ``z = mu_p + t * sigma_p * eps``.
            generator: source of ``eps`` (and of the copula's field), on the model's device, for
                repeatable samples.

        Returns:
            [B, K, H, W] generated model-space fields.
        """
        return self.sample_with_medians(
            coarse, static, n_samples, temperature=temperature, generator=generator
        )[0]

    @torch.no_grad()
    def sample_with_medians(
        self,
        coarse: Tensor,
        static: Tensor | None,
        n_samples: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``sample``, and for each draw its latent's decoding without the copula's field: what
        ``z`` alone makes of the input (the same tensor for the other heads).

        Returns:
            The draws and their medians, each [B, K, H, W] model-space fields.
        """
        if n_samples < 1:
            raise ValueError(f"sample: n_samples must be >= 1, got {n_samples}")
        prior_mu, prior_logvar = self.prior(coarse, static)
        mu = prior_mu.repeat_interleave(n_samples, dim=0)
        sigma = torch.exp(0.5 * prior_logvar).repeat_interleave(n_samples, dim=0)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + temperature * sigma * eps
        decoded = self.decode(z, coarse.repeat_interleave(n_samples, dim=0), static)
        shape = (coarse.shape[0], n_samples, self.height, self.width)
        return self.draw(decoded, generator).view(shape), decoded.field.view(shape)

    @torch.no_grad()
    def reconstruct_mean(self, fine: Tensor, coarse: Tensor, static: Tensor | None) -> Tensor:
        """Decode the posterior mean: [B, 1, H, W] model-space fields (no sampling)."""
        mu, _ = self.encode(fine, coarse, static)
        return self.decode(mu, coarse, static).field
