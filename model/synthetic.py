"""A built-in synthetic data set: zero-inflated, heavy-tailed, spatially correlated daily rain.

Each day is a Gaussian random field with a power-law spectrum. Its upper quantile is the wet
area, and a rank transform maps the wet values onto a gamma distribution, so the heaviest rain
sits in the storm cores. Optionally (``storm_days``) rare compact convective storms add heavy
rain that the coarse block means only hint at. The per-day wet fraction and intensity vary,
and fine-scale structure is only partly fixed by the coarse block means: the detail a cVAE
has to generate is genuinely uncertain given the coarse field.

The file has the layout :func:`model.data.load_data` reads from users' files, so the
synthetic set exercises the same loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import scipy.fft
import xarray as xr
from scipy.special import expit, gammaincinv, logit

from model.config import DataConfig, SyntheticConfig

__all__ = ["synthetic_path", "synthetic_skeleton", "write_synthetic"]

logger = logging.getLogger(__name__)

_GENERATOR_VERSION = 1
"""Part of the cache key: a change to the generator must not reuse files made by the old one."""
_WET_FRACTION_CONCENTRATION = 30.0
"""Beta concentration of the per-day wet fraction (its standard deviation is about 0.09 at 0.45)."""
_INTENSITY_SCALE_SHAPE = 4.0
"""Gamma shape of the per-day intensity multiplier (mean 1, standard deviation 0.5)."""
_OROGRAPHIC_GAIN = 0.25
_OCEAN_CORNER = 1.45
"""Cells with normalised row + column above this are ocean: about 15% of the grid."""
_STORM_FIELDS = ("storm_days", "storm_intensity", "storm_radius")
_STORM_PEAK_SHAPE = 2.0
_STORM_FLOOR_MM = 0.1
_CHUNK_CELLS = 2**21
"""Days are generated in chunks of about this many cells, to bound memory."""


def synthetic_path(data: DataConfig) -> Path:
    """Where the synthetic set for ``data`` lives.

    Args:
        data: The data section; ``data.path`` wins when set.

    Returns:
        ``data.path``, or ``$CVAE_SEARCH_CACHE`` (default ``~/.cache/cvae-search``) /
        ``synthetic-<hash>.nc``, the hash taken over the generator's settings and the upscale
        factor, so every process agrees on it.
    """
    if data.path:
        return Path(data.path).expanduser()
    key = dataclasses.asdict(data.synthetic)
    if not data.synthetic.storm_days:  # sets made before storms existed keep their file
        for name in _STORM_FIELDS:
            del key[name]
    key["upscale_factor"] = data.upscale_factor
    key["generator_version"] = _GENERATOR_VERSION
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("CVAE_SEARCH_CACHE", "~/.cache/cvae-search")).expanduser()
    return cache / f"synthetic-{digest}.nc"


def write_synthetic(cfg: SyntheticConfig, factor: int, path: Path) -> Path:
    """Generate the synthetic set and write it as NetCDF, atomically.

    The file is written under a temporary name in the same folder and renamed into place, so
    processes generating the same file at once never read a half-written one.

    Args:
        cfg: The generator's settings; ``cfg.seed`` makes the output deterministic.
        factor: Upscale factor between the fine and the coarse grid.
        path: Destination file; its folder is created if missing.

    Returns:
        ``path``.

    Raises:
        ValueError: The grid is not a multiple of ``factor``.
    """
    _check_factor(cfg, factor)
    path = Path(path)
    ds = _generate(cfg, factor)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine=_netcdf_engine())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info(
        "wrote synthetic set %s (%d days, %dx%d, factor %d)", path, cfg.n_days, cfg.height, cfg.width, factor
    )
    return path


def _check_factor(cfg: SyntheticConfig, factor: int) -> None:
    if factor < 1 or cfg.height % factor or cfg.width % factor:
        raise ValueError(
            f"upscale_factor: expected a divisor of the synthetic grid {cfg.height}x{cfg.width}, got {factor}"
        )


def _netcdf_engine() -> str:
    """h5netcdf where its HDF5 backend (h5py) is installed, else netCDF4: both write NetCDF-4."""
    if importlib.util.find_spec("h5netcdf") and importlib.util.find_spec("h5py"):
        return "h5netcdf"
    if importlib.util.find_spec("netCDF4"):
        return "netcdf4"
    raise ImportError("writing the synthetic set needs h5netcdf with h5py, or netCDF4; install one of them")


def _generate(cfg: SyntheticConfig, factor: int) -> xr.Dataset:
    rng = np.random.default_rng(cfg.seed)
    h, w = cfg.height, cfg.width
    elevation = _elevation(rng, h, w)
    z = (elevation - elevation.mean()) / max(float(elevation.std()), 1e-6)
    orographic = np.exp(_OROGRAPHIC_GAIN * z)
    orographic /= orographic.mean()

    wet_fraction = rng.beta(
        cfg.wet_fraction * _WET_FRACTION_CONCENTRATION,
        (1.0 - cfg.wet_fraction) * _WET_FRACTION_CONCENTRATION,
        size=cfg.n_days,
    )
    intensity_scale = rng.gamma(_INTENSITY_SCALE_SHAPE, 1.0 / _INTENSITY_SCALE_SHAPE, size=cfg.n_days)
    amplitude = _spectrum_amplitude(h, w, cfg.spectral_slope)
    quantile = _GammaQuantile(cfg.tail_shape, h * w)
    chunk = max(1, _CHUNK_CELLS // (h * w))
    pr = np.empty((cfg.n_days, h, w), dtype=np.float32)
    for start in range(0, cfg.n_days, chunk):
        days = slice(start, min(start + chunk, cfg.n_days))
        field = _random_fields(rng, amplitude, days.stop - days.start, h, w)
        pr[days] = _rain(field, wet_fraction[days], quantile) * (
            cfg.mean_intensity * intensity_scale[days, None, None] * orographic
        )

    if cfg.storm_days:
        _add_storms(cfg, pr)

    # Covariates are drawn from the unmasked field: like GCM fields, they exist over the ocean.
    pr_coarse_full = _block_mean(pr, factor)
    mask = _land_mask(h, w) if cfg.with_mask else np.ones((h, w), dtype=bool)
    if cfg.with_mask:
        pr[:, ~mask] = np.nan
    pr_coarse = _block_mean(pr, factor)
    signal = np.log1p(pr_coarse_full)
    signal_std = max(float(signal.std()), 1e-6)

    covariates = []
    for i in range(1, cfg.n_extra_predictors + 1):
        weight = rng.uniform(0.5, 1.5)
        noise = rng.standard_normal(signal.shape) * (0.3 * i * signal_std)
        covariates.append((weight * signal + noise).astype(np.float32))
    return _assemble(cfg, factor, pr, pr_coarse, elevation.astype(np.float32), covariates, mask)


def _add_storms(cfg: SyntheticConfig, pr: np.ndarray) -> None:
    """Add one Gaussian storm cell to a ``storm_days`` fraction of days, in place.

    A generator of its own keeps the rest of the set identical to the set without storms.
    """
    rng = np.random.default_rng([cfg.seed, 1])
    n, h, w = pr.shape
    days = np.flatnonzero(rng.random(n) < cfg.storm_days)
    peaks = rng.gamma(_STORM_PEAK_SHAPE, cfg.storm_intensity / _STORM_PEAK_SHAPE, size=len(days))
    centres = rng.uniform((0, 0), (h, w), size=(len(days), 2))
    rows, cols = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    for day, peak, (cy, cx) in zip(days, peaks, centres, strict=True):
        d2 = (rows - cy) ** 2 + (cols - cx) ** 2
        storm = peak * np.exp(-d2 / (2 * cfg.storm_radius**2))
        # The Gaussian's far tail would leave traces of rain on every dry cell of the day.
        pr[day] += np.where(storm >= _STORM_FLOOR_MM, storm, 0.0).astype(np.float32)


def synthetic_skeleton(cfg: SyntheticConfig, factor: int) -> xr.Dataset:
    """The synthetic set's variables, dims, coordinates and dates, every value 0 and held in no
    memory: what a config is checked against without generating the set.

    Raises:
        ValueError: The grid is not a multiple of ``factor``.
    """
    _check_factor(cfg, factor)
    n, h, w = cfg.n_days, cfg.height, cfg.width

    def zeros(*shape: int) -> np.ndarray:
        return np.broadcast_to(np.float32(0.0), shape)

    coarse = zeros(n, h // factor, w // factor)
    mask = np.ones((h, w), dtype=bool)
    return _assemble(
        cfg, factor, zeros(n, h, w), coarse, zeros(h, w), [coarse] * cfg.n_extra_predictors, mask
    )


def _assemble(
    cfg: SyntheticConfig,
    factor: int,
    pr: np.ndarray,
    pr_coarse: np.ndarray,
    elevation: np.ndarray,
    covariates: list[np.ndarray],
    mask: np.ndarray,
) -> xr.Dataset:
    h, w = cfg.height, cfg.width
    lat, lon = _fine_coords(h, w)
    times = (np.datetime64(cfg.start, "D") + np.arange(cfg.n_days)).astype("datetime64[ns]")
    coarse_dims = ("time", "lat_coarse", "lon_coarse")
    data_vars: dict[str, tuple] = {
        "pr": (
            ("time", "lat", "lon"),
            pr,
            {"units": "mm/day", "long_name": "daily precipitation (synthetic)"},
        ),
        "pr_coarse": (
            coarse_dims,
            pr_coarse,
            {"units": "mm/day", "long_name": f"block mean of pr over {factor}x{factor} cells"},
        ),
        "elevation": (("lat", "lon"), elevation, {"units": "m", "long_name": "elevation"}),
    }
    for i, values in enumerate(covariates, start=1):
        data_vars[f"x{i}_coarse"] = (
            coarse_dims,
            values,
            {"units": "1", "long_name": f"noisy covariate {i} of log1p(coarse precipitation)"},
        )
    if cfg.with_mask:
        data_vars["mask"] = (("lat", "lon"), mask.astype(np.int8), {"long_name": "land mask (1 = land)"})
    settings = dataclasses.asdict(cfg)
    return xr.Dataset(
        data_vars,
        coords={
            "time": times,
            "lat": ("lat", lat, {"units": "degrees_north"}),
            "lon": ("lon", lon, {"units": "degrees_east"}),
            "lat_coarse": ("lat_coarse", lat.reshape(-1, factor).mean(axis=1), {"units": "degrees_north"}),
            "lon_coarse": ("lon_coarse", lon.reshape(-1, factor).mean(axis=1), {"units": "degrees_east"}),
        },
        attrs={
            "title": "cvae-search synthetic precipitation",
            "generator": f"model.synthetic version {_GENERATOR_VERSION}",
            "synthetic_config": json.dumps(settings, sort_keys=True),
            "upscale_factor": factor,
        },
    )


def _spectrum_amplitude(h: int, w: int, slope: float) -> np.ndarray:
    """Square root of P(k) ∝ k^-slope on the ``rfft2`` grid, with no mean (k = 0) component."""
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = 1.0
    amplitude = k ** (-slope / 2.0)
    amplitude[0, 0] = 0.0
    return amplitude.astype(np.float32)


def _random_fields(rng: np.random.Generator, amplitude: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    shape = (n, *amplitude.shape)
    coeffs = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)
    return scipy.fft.irfft2(coeffs * amplitude, s=(h, w))


class _GammaQuantile:
    """The unit-scale gamma quantile function, tabulated: ``gammaincinv`` is too slow for millions of cells.

    log(ppf) is smooth and nearly linear in logit(u) at both ends, so linear interpolation on
    that scale is accurate to about 1e-5 relative.
    """

    def __init__(self, shape: float, n_cells: int) -> None:
        self.shape = shape
        edge = float(logit(0.5 / n_cells)) - 0.1
        self.grid = np.linspace(edge, -edge, 4097)
        self.log_ppf = np.log(np.maximum(gammaincinv(shape, expit(self.grid)), 1e-300))

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """Gamma quantiles with mean 1 at probabilities ``u`` in (0, 1)."""
        return np.exp(np.interp(logit(u), self.grid, self.log_ppf)) / self.shape


def _rain(field: np.ndarray, wet_fraction: np.ndarray, quantile: _GammaQuantile) -> np.ndarray:
    """Unit-mean rain from latent fields [n, h, w]: the upper ``wet_fraction`` of each day, gamma by rank."""
    n, h, w = field.shape
    cells = h * w
    order = np.argsort(field.reshape(n, cells), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(cells), (n, cells)), axis=1)
    n_wet = np.clip(np.rint(wet_fraction * cells), 1, cells)[:, None]
    first_wet = cells - n_wet
    wet = ranks >= first_wet
    u = np.where(wet, (ranks - first_wet + 0.5) / n_wet, 0.5)
    return np.where(wet, quantile(u), 0.0).reshape(n, h, w)


def _block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """Mean over the valid (non-NaN) cells of each factor x factor block; NaN where none is valid."""
    n, h, w = x.shape
    blocks = x.reshape(n, h // factor, factor, w // factor, factor).astype(np.float64)
    valid = np.isfinite(blocks)
    total = np.where(valid, blocks, 0.0).sum(axis=(2, 4))
    count = valid.sum(axis=(2, 4))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _elevation(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth terrain in metres: a steep-spectrum random field plus a ridge rising to one side."""
    field = _random_fields(rng, _spectrum_amplitude(h, w, 5.0), 1, h, w)[0].astype(np.float64)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-12)
    ridge = np.linspace(0.0, 1.0, w)[None, :] ** 2
    return 1500.0 * (0.7 * field + 0.3 * ridge)


def _land_mask(h: int, w: int) -> np.ndarray:
    rows = (np.arange(h)[:, None] + 0.5) / h
    cols = (np.arange(w)[None, :] + 0.5) / w
    return (rows + cols) <= _OCEAN_CORNER


def _fine_coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre latitudes and longitudes of a regular grid, finer for larger grids."""
    res = min(0.25, 60.0 / max(h, w))
    lat = 25.0 + res * (np.arange(h) + 0.5)
    lon = -105.0 + res * (np.arange(w) + 0.5)
    return lat, lon
