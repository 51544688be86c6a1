"""Training data from NetCDF or Zarr through xarray: validated, split by time, normalised.

Every input problem is found here, before any training, and raised as a one-line
:class:`DataError` naming the file, the variable or config field and what was expected.
Statistics are fitted on the training split only, and no NaN reaches a tensor: invalid fine
cells are masked (and set to 0 in model space), missing predictor values become 0 after
standardising.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from model.config import DataConfig, Normalization, SplitConfig
from model.synthetic import synthetic_path, write_synthetic
from model.transform import Normalizer

__all__ = ["WET_THRESHOLD", "DataError", "Dataset", "Split", "load_data"]

logger = logging.getLogger(__name__)

WET_THRESHOLD = 0.1
"""mm/day above which a cell counts as wet for the fitted intensity statistics."""
_STD_FLOOR = 1e-6
_SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The data do not match the configuration: a missing file, variable, dimension or period."""


@dataclass
class Split:
    """One chronological split, as tensors.

    Attributes:
        fine: [N, 1, H, W] target in model space; invalid cells hold 0.0.
        mask: [N, 1, H, W] True where the target is valid (finite and inside the static mask).
        coarse: [N, P, h, w] standardised predictors; missing values hold 0.0.
        coarse_mass: [N, 1, h, w] the mass predictor in mm/day (missing: 0.0), or None.
        times: [N] datetime64[ns] dates.
    """

    fine: torch.Tensor
    mask: torch.Tensor
    coarse: torch.Tensor
    coarse_mass: torch.Tensor | None
    times: np.ndarray

    def __len__(self) -> int:
        return self.fine.shape[0]

    def to(self, device: torch.device | str) -> Split:
        """A copy with the tensors on ``device``."""
        return Split(
            fine=self.fine.to(device),
            mask=self.mask.to(device),
            coarse=self.coarse.to(device),
            coarse_mass=None if self.coarse_mass is None else self.coarse_mass.to(device),
            times=self.times,
        )


@dataclass
class Dataset:
    """The three splits, the static fields and what is needed to map back to mm/day and to the file."""

    train: Split
    val: Split
    test: Split
    static: torch.Tensor
    """[S, H, W] standardised static fields (S may be 0)."""
    normalizer: Normalizer
    stats: Normalization
    factor: int
    fine_coords: dict[str, np.ndarray]
    """Coordinate values of the two fine dims, keyed by dim name."""
    target_attrs: dict[str, Any]
    source: str

    @property
    def height(self) -> int:
        return self.static.shape[-2]

    @property
    def width(self) -> int:
        return self.static.shape[-1]

    @property
    def coarse_height(self) -> int:
        return self.train.coarse.shape[-2]

    @property
    def coarse_width(self) -> int:
        return self.train.coarse.shape[-1]

    @property
    def n_predictors(self) -> int:
        return self.train.coarse.shape[1]

    @property
    def n_static(self) -> int:
        return self.static.shape[0]

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
            static=self.static.to(device),
        )


def load_data(cfg: DataConfig, normalization: Normalization | None = None) -> Dataset:
    """Load, validate, split and normalise the data named by ``cfg``.

    Args:
        cfg: The data section. ``source: synthetic`` generates the built-in set on first use
            and then reads it like any user file.
        normalization: Statistics to apply as they are (from a checkpoint or an exported
            config); ``None`` fits them on the training split.

    Returns:
        The splits as tensors on the CPU, with the static fields and the normaliser.

    Raises:
        DataError: The file, a variable, a grid, the time axis or a split is not as expected.
    """
    if cfg.source == "synthetic":
        path = synthetic_path(cfg)
        if not path.exists():
            write_synthetic(cfg.synthetic, cfg.upscale_factor, path)
    else:
        if not cfg.path:
            raise DataError("data.path: expected a NetCDF or Zarr path when data.source is 'file', got None")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or directory (data.path)")
    with _open(path, _engine(cfg, path)) as ds:
        return _load(ds, cfg, str(path), normalization)


def _engine(cfg: DataConfig, path: Path) -> str | None:
    if cfg.engine:
        return cfg.engine
    if path.suffix == ".zarr" or path.is_dir():
        return "zarr"
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _open(path: Path, engine: str | None) -> xr.Dataset:
    available = xr.backends.list_engines()
    if engine is not None and engine not in available:
        raise DataError(
            f"{path}: data.engine: xarray engine {engine!r} is not available "
            f"(available: {', '.join(sorted(available))}); install its package or choose another"
        )
    try:
        return xr.open_dataset(path, engine=engine)
    except ImportError as e:
        raise DataError(
            f"{path}: data.engine: xarray engine {engine or '(auto)'} cannot run: {_one_line(e)}"
        ) from e
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path}: cannot open with xarray engine {engine or '(auto)'}: {_one_line(e)}") from e


def _load(ds: xr.Dataset, cfg: DataConfig, src: str, normalization: Normalization | None) -> Dataset:
    fine_dims = (cfg.time_dim, *cfg.fine_dims)
    coarse_dims = (cfg.time_dim, *cfg.coarse_dims)
    target = _variable(ds, src, cfg.target_var, "data.target_var", fine_dims)
    predictors = [_variable(ds, src, name, "data.predictor_vars", coarse_dims) for name in cfg.predictor_vars]
    statics = [_variable(ds, src, name, "data.static_vars", tuple(cfg.fine_dims)) for name in cfg.static_vars]
    mask_da = None
    if cfg.mask_var is not None:
        mask_da = _variable(ds, src, cfg.mask_var, "data.mask_var", tuple(cfg.fine_dims))
    if cfg.mass_var is not None and cfg.mass_var not in cfg.predictor_vars:
        raise DataError(
            f"{src}: data.mass_var: expected one of data.predictor_vars {cfg.predictor_vars}, "
            f"got {cfg.mass_var!r}"
        )
    _check_grids(src, cfg, target, predictors[0])

    times = _times(ds, src, cfg.time_dim)
    slices, labels = _split_slices(times, cfg.split, src)

    static_mask = np.ones(target.shape[1:], dtype=bool)
    if mask_da is not None:
        m = mask_da.values
        static_mask = np.isfinite(m) & (np.nan_to_num(m) != 0)
    static_raw = np.empty((len(statics), *target.shape[1:]), dtype=np.float32)
    for i, s in enumerate(statics):
        static_raw[i] = s.values

    raw = {
        name: _read_split(src, cfg, name, target, predictors, {cfg.time_dim: slices[name]}, static_mask)
        for name in _SPLITS
    }
    train_pr, train_valid, train_x = raw["train"]
    if not train_valid.any():
        raise DataError(
            f"{src}: {cfg.target_var} (data.target_var) has no valid cell in the training split "
            f"({labels['train']})"
        )
    if normalization is None:
        stats = _fit(src, cfg, train_pr[train_valid], train_x, static_raw)
    else:
        stats = _checked(normalization, cfg)
    normalizer = Normalizer(stats, cfg.transform)

    mass_index = None if cfg.mass_var is None else cfg.predictor_vars.index(cfg.mass_var)
    splits = {
        name: _to_split(*raw[name], times[slices[name]], stats, normalizer, mass_index) for name in _SPLITS
    }
    mean = np.asarray(stats.static_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(stats.static_std, dtype=np.float32).reshape(-1, 1, 1)
    static = torch.from_numpy(_finite_or_zero((static_raw - mean) / std))

    fine_coords = {
        d: np.asarray(ds[d].values) if d in ds.coords else np.arange(ds.sizes[d]) for d in cfg.fine_dims
    }
    logger.info(
        "loaded %s: %d/%d/%d days, fine %dx%d, coarse %dx%d, %d predictors, %d static",
        src,
        *(len(splits[n]) for n in _SPLITS),
        *target.shape[1:],
        *predictors[0].shape[1:],
        len(predictors),
        len(statics),
    )
    return Dataset(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        static=static,
        normalizer=normalizer,
        stats=stats,
        factor=cfg.upscale_factor,
        fine_coords=fine_coords,
        target_attrs=dict(target.attrs),
        source=src,
    )


def _read_split(
    src: str,
    cfg: DataConfig,
    name: str,
    target: xr.DataArray,
    predictors: list[xr.DataArray],
    where: dict[str, slice],
    static_mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split's target (NaN if invalid), validity [N, H, W] and predictors [N, P, h, w] (NaN if missing)."""
    pr = target.isel(where).values.astype(np.float32)
    valid = np.isfinite(pr) & static_mask
    n_negative = int(np.count_nonzero(valid & (pr < 0)))
    if n_negative:
        logger.warning(
            "%s: %s has %d negative values in the %s split (min %.3g); read as 0 mm/day",
            src,
            cfg.target_var,
            n_negative,
            name,
            float(pr[valid].min()),
        )
    pr = np.where(valid, np.maximum(pr, 0.0), np.nan).astype(np.float32)
    x = np.stack([p.isel(where).values.astype(np.float32) for p in predictors], axis=1)
    x[~np.isfinite(x)] = np.nan
    return pr, valid, x


def _variable(ds: xr.Dataset, src: str, name: str, field: str, dims: tuple[str, ...]) -> xr.DataArray:
    """``ds[name]`` transposed to ``dims``; singleton extra dims (e.g. a height level) are dropped."""
    if name not in ds.data_vars:
        raise DataError(
            f"{src}: variable {name!r} ({field}) not found; "
            f"the file has: {', '.join(map(str, ds.data_vars)) or 'none'}"
        )
    da = ds[name]
    extra = [d for d in da.dims if d not in dims and da.sizes[d] == 1]
    if extra:
        da = da.isel({d: 0 for d in extra}, drop=True)
    if sorted(map(str, da.dims)) != sorted(dims):
        shape = "x".join(str(da.sizes[d]) for d in da.dims)
        raise DataError(
            f"{src}: variable {name!r} ({field}) has dims ({', '.join(map(str, da.dims))}) {shape}, "
            f"expected ({', '.join(dims)}) as named by data.time_dim, data.fine_dims and data.coarse_dims"
        )
    return da.transpose(*dims)


def _check_grids(src: str, cfg: DataConfig, target: xr.DataArray, predictor: xr.DataArray) -> None:
    (fh, fw), (ch, cw), f = target.shape[1:], predictor.shape[1:], cfg.upscale_factor
    if (fh, fw) != (ch * f, cw * f):
        reason = f" ({fh}x{fw} is not a multiple of {f})" if fh % f or fw % f else ""
        raise DataError(
            f"{src}: fine grid {fh}x{fw} is not coarse grid {ch}x{cw} times upscale_factor {f}{reason} "
            f"({cfg.target_var} on {'/'.join(cfg.fine_dims)}, predictors on {'/'.join(cfg.coarse_dims)}; "
            "check data.upscale_factor)"
        )


def _times(ds: xr.Dataset, src: str, time_dim: str) -> np.ndarray:
    if time_dim not in ds.coords:
        raise DataError(f"{src}: dimension {time_dim!r} (data.time_dim) has no coordinate values (dates)")
    values = np.asarray(ds.indexes[time_dim])
    if values.dtype == object:
        # Model calendars (noleap, 360_day) decode to cftime dates; days that exist in the
        # standard calendar convert, others (30 February) cannot.
        try:
            values = np.array([np.datetime64(t.isoformat(), "ns") for t in values])
        except (AttributeError, ValueError) as e:
            raise DataError(
                f"{src}: {time_dim} (data.time_dim): cannot convert to standard dates: {_one_line(e)}"
            ) from e
    if values.dtype.kind != "M":
        raise DataError(
            f"{src}: {time_dim} (data.time_dim): expected dates (a CF time coordinate with units "
            f"'days since ...'), got {values.dtype} values"
        )
    times = values.astype("datetime64[ns]")
    if np.isnat(times).any():
        raise DataError(
            f"{src}: {time_dim} (data.time_dim) has missing dates (NaT), "
            f"the first at position {int(np.isnat(times).argmax())}"
        )
    step = np.diff(times.astype(np.int64))
    if (step <= 0).any():
        i = int((step <= 0).argmax())
        what = "duplicate" if step[i] == 0 else "non-monotonic"
        raise DataError(
            f"{src}: {time_dim} (data.time_dim) must be strictly increasing: {what} date {times[i + 1]} "
            f"at position {i + 1} follows {times[i]}"
        )
    return times


def _split_slices(times: np.ndarray, split: SplitConfig, src: str) -> tuple[dict[str, slice], dict[str, str]]:
    """Positions of each split on the (validated, increasing) time axis, and how each was chosen."""
    n = len(times)
    periods = {"train": split.train, "val": split.val, "test": split.test}
    slices: dict[str, slice] = {}
    labels: dict[str, str] = {}
    if any(p is not None for p in periods.values()):
        index = pd.DatetimeIndex(times)
        for name, period in periods.items():
            if period is None or len(period) != 2:
                raise DataError(
                    f"data.split.{name}: expected [start, end] dates for every split, got {period!r}"
                )
            try:
                start, stop, _ = index.slice_indexer(period[0], period[1]).indices(n)
            except (TypeError, ValueError, KeyError) as e:
                raise DataError(
                    f"{src}: data.split.{name}: cannot read {period!r} as dates ({_one_line(e)})"
                ) from e
            slices[name] = slice(start, max(start, stop))
            labels[name] = f"{period[0]} to {period[1]}"
    else:
        bounds = np.rint(np.cumsum([0.0, *split.fractions]) * n).astype(int)
        bounds[-1] = n
        for i, name in enumerate(_SPLITS):
            slices[name] = slice(int(bounds[i]), int(bounds[i + 1]))
            labels[name] = f"fraction {split.fractions[i]:g} of {n} days"
    for name in _SPLITS:
        if slices[name].stop <= slices[name].start:
            span = f"{times[0]} to {times[-1]}" if n else "no dates"
            raise DataError(
                f"{src}: data.split.{name}: the {name} split ({labels[name]}) is empty; the data cover {span}"
            )
    if split.train is not None and not split.allow_overlap:
        for i, a in enumerate(_SPLITS):
            for b in _SPLITS[i + 1 :]:
                shared = min(slices[a].stop, slices[b].stop) - max(slices[a].start, slices[b].start)
                if shared > 0:
                    raise DataError(
                        f"{src}: data.split.{a} ({labels[a]}) and data.split.{b} ({labels[b]}) "
                        f"share {shared} days: "
                        "overlapping splits leak evaluation data into training; make the periods disjoint "
                        "or set data.split.allow_overlap"
                    )
    return slices, labels


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = values.astype(np.float64)
    return float(values.mean()), max(float(values.std()), _STD_FLOOR)


def _fit(src: str, cfg: DataConfig, pr: np.ndarray, x: np.ndarray, static: np.ndarray) -> Normalization:
    """Training-split statistics: valid target values ``pr`` (mm/day), ``x`` [N, P, h, w], ``static``."""
    t = np.log1p(pr) if cfg.transform == "log1p" else pr
    target_mean, target_std = _mean_std(t)
    wet = pr[pr > WET_THRESHOLD]
    if wet.size == 0:
        raise DataError(
            f"{src}: {cfg.target_var} (data.target_var) has no wet cell (> {WET_THRESHOLD} mm/day) "
            "in the training split"
        )
    predictor_stats = []
    for i, name in enumerate(cfg.predictor_vars):
        values = x[:, i][np.isfinite(x[:, i])]
        if values.size == 0:
            raise DataError(
                f"{src}: variable {name!r} (data.predictor_vars) has no finite value in the training split"
            )
        predictor_stats.append(_mean_std(values))
    static_stats = []
    for name, field in zip(cfg.static_vars, static, strict=True):
        values = field[np.isfinite(field)]
        if values.size == 0:
            raise DataError(f"{src}: variable {name!r} (data.static_vars) has no finite value")
        static_stats.append(_mean_std(values))
    return Normalization(
        target_mean=target_mean,
        target_std=target_std,
        predictor_mean=[m for m, _ in predictor_stats],
        predictor_std=[s for _, s in predictor_stats],
        static_mean=[m for m, _ in static_stats],
        static_std=[s for _, s in static_stats],
        wet_mean_intensity=float(wet.astype(np.float64).mean()),
        tail_threshold=float(np.percentile(wet, 95)),
    )


def _checked(stats: Normalization, cfg: DataConfig) -> Normalization:
    """``stats`` after checking that it fits these predictors and static fields."""
    for field, names, key in (
        ("predictor_mean", cfg.predictor_vars, "data.predictor_vars"),
        ("predictor_std", cfg.predictor_vars, "data.predictor_vars"),
        ("static_mean", cfg.static_vars, "data.static_vars"),
        ("static_std", cfg.static_vars, "data.static_vars"),
    ):
        values = getattr(stats, field)
        if len(values) != len(names):
            raise DataError(
                f"normalization.{field}: expected {len(names)} values (one per {key} {names}), "
                f"got {len(values)}"
            )
    stds = [stats.target_std, *stats.predictor_std, *stats.static_std]
    if not all(np.isfinite(s) and s > 0 for s in stds):
        raise DataError(f"normalization: expected positive finite standard deviations, got {stds}")
    return stats


def _finite_or_zero(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, 0.0).astype(np.float32)


def _to_split(
    pr: np.ndarray,
    valid: np.ndarray,
    x: np.ndarray,
    times: np.ndarray,
    stats: Normalization,
    normalizer: Normalizer,
    mass_index: int | None,
) -> Split:
    mask = torch.from_numpy(valid)[:, None]
    fine = normalizer.to_model(torch.from_numpy(np.where(valid, pr, 0.0).astype(np.float32)))[:, None]
    fine = fine.masked_fill(~mask, 0.0).float()
    mean = np.asarray(stats.predictor_mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(stats.predictor_std, dtype=np.float32)[None, :, None, None]
    coarse = torch.from_numpy(_finite_or_zero((x - mean) / std))
    coarse_mass = None
    if mass_index is not None:
        coarse_mass = torch.from_numpy(_finite_or_zero(x[:, mass_index : mass_index + 1]))
    return Split(fine=fine, mask=mask, coarse=coarse, coarse_mass=coarse_mass, times=times)
