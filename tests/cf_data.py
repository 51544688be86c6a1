"""A CF-style NetCDF laid out as users' downscaling archives are, written with the netCDF4
library rather than xarray, so that the loader reads a file it did not shape.

The archive: dims ``time``/``lat``/``lon`` and the coarse ``lat_c``/``lon_c``; daily ``pr`` in
mm/day stored with a ``_FillValue`` of 1e20 over an ocean mask (NaN once decoded); latitudes
north to south, as many archives store them; ``orog`` (surface altitude, missing over the
ocean); three coarse predictors on their own grid (``pr_gcm`` in mm/day, ``tas_gcm`` in K,
``psl_gcm`` in Pa), present over the ocean as a GCM's are; a CF time axis in days since a
reference date; and the global attributes ``Conventions: CF-1.8``, ``title``,
``institution`` and ``history``.

``write_cf_archive(path, with_target=False)`` writes a GCM's file: the coarse predictors alone
(no fine grid at all), e.g. for a future period.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["CF_DATA", "CF_TITLE", "cf_config", "ocean_mask", "write_cf_archive"]

CF_TITLE = "Daily precipitation and GCM predictors, regridded (test archive)"
CF_DATA: dict[str, Any] = {
    "source": "file",
    "target_var": "pr",
    "predictor_vars": ["pr_gcm", "tas_gcm", "psl_gcm"],
    "static_vars": ["orog"],
    "mass_var": "pr_gcm",
    "time_dim": "time",
    "fine_dims": ["lat", "lon"],
    "coarse_dims": ["lat_c", "lon_c"],
}
"""The data section naming the archive's variables and dims (add ``path``, ``upscale_factor``)."""
_FILL = 1.0e20


def ocean_mask(shape: tuple[int, int]) -> np.ndarray:
    """[H, W] True over the archive's ocean: a coast running diagonally across the south-west."""
    h, w = shape
    rows = (np.arange(h)[:, None] + 0.5) / h  # 0 at the northern edge (latitudes descend)
    cols = (np.arange(w)[None, :] + 0.5) / w
    return rows - cols > 0.35


def write_cf_archive(
    path: str | Path,
    *,
    n_days: int = 96,
    shape: tuple[int, int] = (16, 16),
    factor: int = 4,
    start: str = "1990-01-01",
    calendar: str = "standard",
    with_target: bool = True,
    title: str = CF_TITLE,
    seed: int = 0,
) -> Path:
    """Write the archive and return its path.

    Args:
        path: The NetCDF file to write.
        n_days: Days from ``start``.
        shape: The fine grid (lat, lon); each a multiple of ``factor``.
        factor: Fine cells per coarse cell along each axis.
        start: The first day; also the time axis's reference date.
        calendar: The CF calendar of the time axis (``standard``, ``noleap``).
        with_target: Whether to write ``pr`` and ``orog`` on the fine grid; without, the file
            holds the coarse predictors alone.
        title: The global ``title``.
        seed: Seed of the random fields.
    """
    import netCDF4

    rng = np.random.default_rng(seed)
    h, w = shape
    ch, cw = h // factor, w // factor
    lat = 50.0 - 0.25 * (np.arange(h) + 0.5)
    lon = 5.0 + 0.25 * (np.arange(w) + 0.5)
    ocean = ocean_mask(shape)

    # Rain: the upper half of a smooth random field each day, heavier in its cores.
    field = gaussian_filter(rng.standard_normal((n_days, h, w)), sigma=(0, 2.0, 2.0))
    field /= field.std(axis=(1, 2), keepdims=True)
    wet = rng.uniform(0.3, 0.6, n_days)
    threshold = np.array([np.quantile(f, 1.0 - q) for f, q in zip(field, wet, strict=True)])[:, None, None]
    pr = np.where(field > threshold, 4.0 * np.expm1(0.8 * (field - threshold)), 0.0).astype(np.float32)
    blocks = pr.reshape(n_days, ch, factor, cw, factor).mean(axis=(2, 4))
    orog = np.where(ocean, np.nan, 300.0 + 1200.0 * np.linspace(0.0, 1.0, w)[None, :] ** 2)

    with netCDF4.Dataset(path, "w", format="NETCDF4") as nc:
        nc.Conventions = "CF-1.8"
        nc.title = title
        nc.institution = "cvae-search tests"
        nc.history = "2024-03-01T00:00:00Z: written by tests/cf_data.py"
        nc.createDimension("time", None)
        nc.createDimension("lat_c", ch)
        nc.createDimension("lon_c", cw)
        time = nc.createVariable("time", "f8", ("time",))
        time.units = f"days since {start} 00:00:00"
        time.calendar = calendar
        time.standard_name = "time"
        time.axis = "T"
        time[:] = np.arange(n_days, dtype=np.float64)
        _coordinate(nc, "lat_c", lat.reshape(ch, factor).mean(axis=1), "latitude", "degrees_north", "Y")
        _coordinate(nc, "lon_c", lon.reshape(cw, factor).mean(axis=1), "longitude", "degrees_east", "X")
        if with_target:
            nc.createDimension("lat", h)
            nc.createDimension("lon", w)
            _coordinate(nc, "lat", lat, "latitude", "degrees_north", "Y")
            _coordinate(nc, "lon", lon, "longitude", "degrees_east", "X")
            var = nc.createVariable("pr", "f4", ("time", "lat", "lon"), fill_value=_FILL, zlib=True)
            var.units = "mm/day"
            var.long_name = "daily precipitation amount"
            var.cell_methods = "time: sum"
            var[:] = np.ma.masked_array(pr, np.broadcast_to(ocean, pr.shape))
            var = nc.createVariable("orog", "f4", ("lat", "lon"), fill_value=_FILL)
            var.units = "m"
            var.standard_name = "surface_altitude"
            var[:] = np.ma.masked_invalid(orog)
        noise = rng.standard_normal((3, n_days, ch, cw))
        predictors = {
            "pr_gcm": (blocks * rng.uniform(0.8, 1.2, blocks.shape), "mm/day", "precipitation (GCM)"),
            "tas_gcm": (285.0 - 2.0 * np.log1p(blocks) + noise[1], "K", "near-surface air temperature"),
            "psl_gcm": (101325.0 - 150.0 * np.log1p(blocks) + 80.0 * noise[2], "Pa", "sea level pressure"),
        }
        for name, (values, units, long_name) in predictors.items():
            var = nc.createVariable(name, "f4", ("time", "lat_c", "lon_c"), fill_value=_FILL)
            var.units = units
            var.long_name = long_name
            var[:] = values.astype(np.float32)
    return Path(path)


def _coordinate(nc: Any, name: str, values: np.ndarray, standard_name: str, units: str, axis: str) -> None:
    var = nc.createVariable(name, "f8", (name,))
    var.standard_name = standard_name
    var.units = units
    var.axis = axis
    var[:] = values


def cf_config(
    path: str | Path, *, factor: int = 4, epochs: int = 2, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A tiny training config (as YAML data) on the archive at ``path``, with dotted ``overrides``."""
    from tests.conftest import tiny_config_dict

    cfg = tiny_config_dict(epochs)
    cfg["data"] = {**CF_DATA, "path": str(path), "upscale_factor": factor}
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg
