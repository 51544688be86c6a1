"""Generated fields as NetCDF, ready to augment SRDRN training data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import xarray as xr

from model.checkpoint import load_checkpoint, versions
from model.config import with_overrides
from model.cvae import CVAE
from model.data import Split, load_data
from model.trainer import resolve_device

__all__ = ["write_samples"]

_log = logging.getLogger(__name__)

SplitName = Literal["train", "val", "test", "all"]


def write_samples(
    checkpoint: str | Path,
    out: str | Path,
    *,
    n_samples: int = 8,
    split: SplitName = "all",
    temperature: float = 1.0,
    data_path: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> Path:
    """Draw ``n_samples`` prior samples per coarse input of ``split`` and write them as NetCDF.

    The output has dims ``(time, sample, <fine y>, <fine x>)`` with the input's coordinates
    and the target variable's attributes, in the target's units (mm/day).

    Args:
        checkpoint: A ``checkpoint.pt`` written by ``train``.
        out: NetCDF file to write.
        n_samples: Samples per coarse input.
        split: Which days of the configured data to condition on.
        temperature: Prior temperature (1 samples the learned distribution as trained).
        data_path: Read coarse inputs from this file instead of the configured one; the
            checkpoint's normalisation is applied unchanged.
        seed: Seed of the sampling generator.
        batch_size: Days per generation batch.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples: expected a positive integer, got {n_samples}")
    dev = resolve_device(device)
    model, cfg, _ = load_checkpoint(checkpoint, dev)
    if data_path is not None:
        cfg = with_overrides(cfg, {"data.source": "file", "data.path": data_path}, "--data")
    data = load_data(cfg.data, cfg.normalization).to(dev)
    parts = [data.train, data.val, data.test] if split == "all" else [getattr(data, split)]
    gen = torch.Generator(device=dev).manual_seed(seed)

    fields: list[np.ndarray] = []
    times: list[np.ndarray] = []
    with torch.no_grad():
        for part in parts:
            times.append(part.times)
            fields.append(
                _generate(
                    model, part, data.static, n_samples, temperature, gen, batch_size, data.normalizer.to_mm
                )
            )
    y_dim, x_dim = cfg.data.fine_dims
    values = np.concatenate(fields)
    ds = xr.Dataset(
        {
            cfg.data.target_var: (
                (cfg.data.time_dim, "sample", y_dim, x_dim),
                values,
                {**data.target_attrs, "description": "cVAE samples drawn from the prior"},
            )
        },
        coords={
            cfg.data.time_dim: np.concatenate(times),
            "sample": np.arange(n_samples),
            y_dim: data.fine_coords[y_dim],
            x_dim: data.fine_coords[x_dim],
        },
        attrs={
            "source_checkpoint": str(checkpoint),
            "source_data": data.source,
            "temperature": temperature,
            "seed": seed,
            **{f"version_{k}": v for k, v in versions().items()},
        },
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(out, engine="h5netcdf")
    _log.info("wrote %d x %d samples to %s", values.shape[0], n_samples, out)
    return out


def _generate(
    model: CVAE,
    part: Split,
    static: torch.Tensor,
    n_samples: int,
    temperature: float,
    gen: torch.Generator,
    batch_size: int,
    to_mm: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    chunks = []
    for start in range(0, len(part), batch_size):
        coarse = part.coarse[start : start + batch_size]
        draws = model.sample(coarse, static, n_samples, temperature=temperature, generator=gen)
        mm = to_mm(draws.float())
        mask = part.mask[start : start + batch_size]  # [B,1,H,W]
        chunks.append(torch.where(mask, mm, torch.nan).cpu().numpy().astype(np.float32))
    return np.concatenate(chunks) if chunks else np.empty((0, n_samples, *part.fine.shape[-2:]), np.float32)
