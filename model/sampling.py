"""Generated fields as NetCDF, ready to augment SRDRN training data."""

from __future__ import annotations

import datetime
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import xarray as xr

from model.checkpoint import read_checkpoint, versions
from model.config import with_overrides
from model.cvae import CVAE
from model.data import DataError, Inputs, load_inputs
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
    """Draw ``n_samples`` prior samples per coarse input and write them as NetCDF.

    The inputs are the checkpoint's configured data, or ``data_path``: a file with the
    predictors on the coarse grid, with or without the target (a GCM's predictors, a period
    without observations; the fine grid then comes from the checkpoint).

    The output has dims ``(time, sample, <fine y>, <fine x>)``, the fine coordinates with their
    attributes and the target's attributes, in the target's units (mm/day). Cells are NaN where
    the target is invalid that day, or, for a file without the target, outside the
    checkpoint's mask. The input file's global attributes (``Conventions``, ``title``) are
    kept, with a line appended to its ``history``; ``source_checkpoint`` and
    ``source_checkpoint_sha256`` name the checkpoint by absolute path and digest.

    Args:
        checkpoint: A ``checkpoint.pt`` written by ``train``.
        out: NetCDF file to write.
        n_samples: Samples per coarse input.
        split: ``all`` for every day of the file, else that configured split of it.
        temperature: Prior temperature, > 0 (1 samples the learned distribution as trained).
        data_path: Read coarse inputs from this file instead of the configured one; the
            checkpoint's normalisation is applied unchanged.
        seed: Seed of the sampling generator.
        batch_size: Days per generation batch.
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        ValueError: A bad argument, or ``out`` is a folder.
        CheckpointError: ``checkpoint`` is not a cvae-search checkpoint.
        DataError: The inputs do not fit the checkpoint's config and grid.
    """
    out = Path(out)
    if n_samples < 1:
        raise ValueError(f"n_samples: expected a positive integer, got {n_samples}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature}")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; expected the NetCDF file to write, e.g. {out / 'samples.nc'}")
    dev = resolve_device(device, "device")
    ckpt = read_checkpoint(checkpoint, dev)
    cfg = ckpt.config
    if data_path is not None:
        cfg = with_overrides(cfg, {"data.source": "file", "data.path": data_path}, "--data")
    assert cfg.normalization is not None  # a checkpoint always carries it
    inputs = load_inputs(cfg.data, cfg.normalization, ckpt.grid, split=split)
    _check_fits(ckpt.model, inputs)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        values = _generate(
            ckpt.model,
            inputs,
            inputs.grid.static.to(dev),
            n_samples,
            temperature,
            gen,
            batch_size,
            ckpt.normalizer.to_mm,
        )

    grid, data = inputs.grid, cfg.data
    y_dim, x_dim = data.fine_dims
    history = (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}: cvae-search {versions()['cvae_search']} "
        f"sample: {n_samples} prior samples per day (temperature {temperature:g}, seed {seed}) from "
        f"checkpoint {ckpt.path} (sha256 {ckpt.sha256}) on {inputs.source}"
    )
    earlier = str(inputs.attrs.get("history", "")).rstrip("\n")
    ds = xr.Dataset(
        {
            data.target_var: (
                (data.time_dim, "sample", y_dim, x_dim),
                values,
                {**grid.target_attrs, "description": "cVAE samples drawn from the prior"},
            )
        },
        coords={
            data.time_dim: inputs.times,
            "sample": np.arange(n_samples),
            y_dim: (y_dim, grid.coords[y_dim], grid.coord_attrs.get(y_dim, {})),
            x_dim: (x_dim, grid.coords[x_dim], grid.coord_attrs.get(x_dim, {})),
        },
        attrs={
            **inputs.attrs,
            "history": f"{earlier}\n{history}" if earlier else history,
            "source_checkpoint": str(ckpt.path),
            "source_checkpoint_sha256": ckpt.sha256,
            "source_data": inputs.source,
            "temperature": temperature,
            "seed": seed,
            **{f"version_{k}": v for k, v in versions().items()},
        },
    )
    _write(ds, out)
    _log.info("wrote %d x %d samples to %s", values.shape[0], n_samples, out)
    return out


def _check_fits(model: CVAE, inputs: Inputs) -> None:
    grid = (model.height, model.width)
    if inputs.grid.shape != grid:
        raise DataError(
            f"{inputs.source}: fine grid {inputs.grid.shape[0]}x{inputs.grid.shape[1]} is not the model's "
            f"{grid[0]}x{grid[1]}"
        )


def _write(ds: xr.Dataset, out: Path) -> None:
    """Write ``ds`` to ``out`` under a temporary name first, so a failed write leaves no half file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _generate(
    model: CVAE,
    inputs: Inputs,
    static: torch.Tensor,
    n_samples: int,
    temperature: float,
    gen: torch.Generator,
    batch_size: int,
    to_mm: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    dev = static.device
    chunks = []
    for start in range(0, len(inputs), batch_size):
        coarse = inputs.coarse[start : start + batch_size].to(dev)
        draws = model.sample(coarse, static, n_samples, temperature=temperature, generator=gen)
        mm = to_mm(draws.float())
        mask = inputs.mask[start : start + batch_size].to(dev)  # [B,1,H,W]
        chunks.append(torch.where(mask, mm, torch.nan).cpu().numpy().astype(np.float32))
    if not chunks:
        return np.empty((0, n_samples, *inputs.grid.shape), np.float32)
    return np.concatenate(chunks)
