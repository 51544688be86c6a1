"""Training data from NetCDF or Zarr through xarray: validated, split by time, normalised.

Every input problem is found here, before any training, and raised as a one-line
:class:`DataError` naming the file, the variable or config field and what was expected (and,
for bad values, how many there are and the first date). Statistics are fitted on the training
split only, and no NaN reaches a tensor:

- the target's NaN cells, and cells outside ``mask_var``, are invalid: masked out of every
  loss and metric, and 0 in model space;
- an infinite value in the target, a predictor or a static field is an error;
- a predictor's NaN over a coarse cell that covers no valid target cell that day (an ocean
  block) is not needed and takes the predictor's training mean (0 after standardising); over
  a cell that covers one it is an error, or, with ``data.missing_predictors: fill``, takes
  the training mean with a warning that counts the values filled;
- a static field's NaN is 0 after standardising;
- a ``[start, end]`` split period must lie within the data's dates.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr

from model.config import DataConfig, Normalization, SplitConfig
from model.synthetic import synthetic_path, synthetic_skeleton, write_synthetic
from model.transform import Normalizer

__all__ = [
    "WET_THRESHOLD",
    "DataError",
    "Dataset",
    "FineGrid",
    "Inputs",
    "Split",
    "check_data",
    "load_data",
    "load_inputs",
]

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
        coarse: [N, P, h, w] standardised predictors; missing values hold 0.0 (the training mean).
        coarse_mass: [N, 1, h, w] the mass predictor in mm/day (missing: its training mean), or None.
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
class FineGrid:
    """The fine grid a model generates on: everything but a day's coarse inputs that is needed
    to run it and to write its fields. Checkpoints carry it, so that a file of coarse inputs
    alone (a GCM's predictors, a period without observations) can be sampled.

    Attributes:
        coords: Coordinate values of the two fine dims, keyed by dim name.
        coord_attrs: Their attributes (units, standard_name), keyed by dim name.
        mask: [H, W] True where the target is valid on at least one day read (and inside
            ``mask_var``): the cells a field is written on.
        static: [S, H, W] standardised static fields (S may be 0).
        target_attrs: The target variable's attributes (units, long_name).
    """

    coords: dict[str, np.ndarray]
    coord_attrs: dict[str, dict[str, Any]]
    mask: torch.Tensor
    static: torch.Tensor
    target_attrs: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def to(self, device: torch.device | str) -> FineGrid:
        """A copy with the tensors on ``device``."""
        return dataclasses.replace(self, mask=self.mask.to(device), static=self.static.to(device))

    def to_plain(self) -> dict[str, Any]:
        """Tensors and plain values only, as ``torch.load(weights_only=True)`` reads them back."""
        return {
            "coords": {k: _plain(np.asarray(v)) for k, v in self.coords.items()},
            "coord_attrs": {k: _plain_attrs(v) for k, v in self.coord_attrs.items()},
            "mask": self.mask.detach().cpu(),
            "static": self.static.detach().cpu().float(),
            "target_attrs": _plain_attrs(self.target_attrs),
        }

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> FineGrid:
        """The grid :meth:`to_plain` wrote."""
        return cls(
            coords={
                k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                for k, v in data["coords"].items()
            },
            coord_attrs={k: dict(v) for k, v in data["coord_attrs"].items()},
            mask=data["mask"].bool(),
            static=data["static"].float(),
            target_attrs=dict(data["target_attrs"]),
        )


@dataclass
class Dataset:
    """The three splits, the fine grid and what is needed to map back to mm/day and to the file."""

    train: Split
    val: Split
    test: Split
    grid: FineGrid
    normalizer: Normalizer
    stats: Normalization
    factor: int
    source: str
    attrs: dict[str, Any]
    """The file's global attributes (Conventions, title, history)."""

    @property
    def static(self) -> torch.Tensor:
        """[S, H, W] standardised static fields (S may be 0)."""
        return self.grid.static

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
            grid=self.grid.to(device),
        )


@dataclass
class Inputs:
    """Coarse inputs to generate fine fields from, and where to write them.

    Attributes:
        coarse: [N, P, h, w] standardised predictors (missing: 0.0, the training mean).
        mask: [N, 1, H, W] cells to write: where the target is valid that day, or, for a file
            without the target, the grid's mask on every day.
        times: [N] datetime64[ns] dates.
        grid: The fine grid: the file's when it has the target, else the one given.
        attrs: The file's global attributes.
        source: The file read.
    """

    coarse: torch.Tensor
    mask: torch.Tensor
    times: np.ndarray
    grid: FineGrid
    attrs: dict[str, Any]
    source: str

    def __len__(self) -> int:
        return self.coarse.shape[0]


@dataclass
class _Layout:
    """A file's variables as the config names them, checked for dims and grids (no values read)."""

    target: xr.DataArray | None
    predictors: list[xr.DataArray]
    statics: list[xr.DataArray]
    mask: xr.DataArray | None
    times: np.ndarray


def load_data(cfg: DataConfig, normalization: Normalization | None = None) -> Dataset:
    """Load, validate, split and normalise the data named by ``cfg``.

    Args:
        cfg: The data section. ``source: synthetic`` generates the built-in set on first use
            and then reads it like any user file.
        normalization: Statistics to apply as they are (from a checkpoint or an exported
            config); ``None`` fits them on the training split.

    Returns:
        The splits as tensors on the CPU, with the fine grid and the normaliser.

    Raises:
        DataError: The file, a variable, a grid, the time axis, a split or a value is not as
            expected.
    """
    path = _path(cfg, generate=True)
    with _open(path, _engine(cfg, path)) as ds:
        return _load(ds, cfg, str(path), normalization)


def load_inputs(
    cfg: DataConfig,
    normalization: Normalization,
    grid: FineGrid | None = None,
    *,
    split: Literal["train", "val", "test", "all"] = "all",
) -> Inputs:
    """The coarse inputs of the file named by ``cfg``, standardised with ``normalization``.

    The file may lack the target (and the static and mask fields): a GCM's predictors, or a
    period without observations. The fine grid is then ``grid``, and the fields are written
    on its mask.

    Args:
        cfg: The data section the model was trained with, ``path`` pointing at the file.
        normalization: The training statistics.
        grid: The model's fine grid (from its checkpoint); required for a file without the
            target, and otherwise checked against the file's.
        split: ``all`` for every day of the file, else that configured split of it.

    Raises:
        DataError: As :func:`load_data`, or the file's grid is not the model's.
    """
    path = _path(cfg, generate=True)
    with _open(path, _engine(cfg, path)) as ds:
        return _inputs(ds, cfg, str(path), _checked(normalization, cfg), grid, split)


def check_data(cfg: DataConfig) -> str:
    """Check the data named by ``cfg`` as training will read it, without training.

    A file is read whole, with every check of :func:`load_data` (values included). A synthetic
    source is checked against the layout its generator writes (variables, dims, grid, dates)
    without generating it: its values are finite by construction, and the first trial that
    needs the set generates it.

    Returns:
        One line saying what was checked: the source, days per split and the grids.

    Raises:
        DataError: What :func:`load_data` would raise.
        ValueError: A synthetic grid that is not a multiple of the upscale factor.
    """
    if cfg.source == "synthetic":
        src = f"synthetic set {synthetic_path(cfg)}"
        layout = _layout(synthetic_skeleton(cfg.synthetic, cfg.upscale_factor), cfg, src)
        slices, _ = _split_slices(layout.times, cfg.split, src)
        assert layout.target is not None
        fine, coarse = layout.target.shape[1:], layout.predictors[0].shape[1:]
        lengths = [slices[n].stop - slices[n].start for n in _SPLITS]
        days = len(layout.times)
        n_static = len(layout.statics)
        src += " (generated by the first trial that needs it)"
    else:
        data = load_data(cfg)
        src, fine, coarse = data.source, (data.height, data.width), (data.coarse_height, data.coarse_width)
        lengths = [len(data.train), len(data.val), len(data.test)]
        days, n_static = sum(lengths), data.n_static
    return (
        f"{src}: {days} days ({', '.join(f'{n} {s}' for n, s in zip(lengths, _SPLITS, strict=True))}), "
        f"fine {fine[0]}x{fine[1]}, coarse {coarse[0]}x{coarse[1]}, "
        f"{len(cfg.predictor_vars)} predictors, {n_static} static fields"
    )


def _path(cfg: DataConfig, *, generate: bool) -> Path:
    if cfg.source == "synthetic":
        path = synthetic_path(cfg)
        if generate and not path.exists():
            write_synthetic(cfg.synthetic, cfg.upscale_factor, path)
        return path
    if not cfg.path:
        raise DataError("data.path: expected a NetCDF or Zarr path when data.source is 'file', got None")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (data.path)")
    return path


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


def _layout(ds: xr.Dataset, cfg: DataConfig, src: str, *, fine: bool = True) -> _Layout:
    """The variables ``cfg`` names, checked; with ``fine`` False only the predictors and dates."""
    fine_dims = (cfg.time_dim, *cfg.fine_dims)
    coarse_dims = (cfg.time_dim, *cfg.coarse_dims)
    target = _variable(ds, src, cfg.target_var, "data.target_var", fine_dims) if fine else None
    predictors = [_variable(ds, src, name, "data.predictor_vars", coarse_dims) for name in cfg.predictor_vars]
    statics, mask_da = [], None
    if fine:
        statics = [
            _variable(ds, src, name, "data.static_vars", tuple(cfg.fine_dims)) for name in cfg.static_vars
        ]
        if cfg.mask_var is not None:
            mask_da = _variable(ds, src, cfg.mask_var, "data.mask_var", tuple(cfg.fine_dims))
    if cfg.mass_var is not None and cfg.mass_var not in cfg.predictor_vars:
        raise DataError(
            f"{src}: data.mass_var: expected one of data.predictor_vars {cfg.predictor_vars}, "
            f"got {cfg.mass_var!r}"
        )
    if target is not None:
        _check_grids(src, cfg, target, predictors[0])
    return _Layout(target, predictors, statics, mask_da, _times(ds, src, cfg.time_dim))


def _load(ds: xr.Dataset, cfg: DataConfig, src: str, normalization: Normalization | None) -> Dataset:
    layout = _layout(ds, cfg, src)
    assert layout.target is not None
    times = layout.times
    slices, labels = _split_slices(times, cfg.split, src)
    # One read of the days from the first split's start to the last one's end; the checks
    # count only the days some split uses.
    lo = min(s.start for s in slices.values())
    hi = max(s.stop for s in slices.values())
    used = np.zeros(hi - lo, dtype=bool)
    for s in slices.values():
        used[s.start - lo : s.stop - lo] = True
    days, read_times = slice(lo, hi), times[lo:hi]

    static_mask = _static_mask(layout.mask, layout.target.shape[1:])
    pr, valid = _read_target(src, cfg, layout.target, days, read_times, used, static_mask)
    needed = _coarse_cover(valid & used[:, None, None], cfg.upscale_factor)
    x = _read_predictors(src, cfg, layout.predictors, days, read_times, used, needed)
    static_raw = _read_static(src, cfg, layout.statics, static_mask.shape)

    train = slice(slices["train"].start - lo, slices["train"].stop - lo)
    train_valid = valid[train]
    if not train_valid.any():
        raise DataError(
            f"{src}: {cfg.target_var} (data.target_var) has no valid cell in the training split "
            f"({labels['train']})"
        )
    if normalization is None:
        stats = _fit(src, cfg, pr[train][train_valid], x[train], static_raw)
    else:
        stats = _checked(normalization, cfg)
    normalizer = Normalizer(stats, cfg.transform)

    mass_index = None if cfg.mass_var is None else cfg.predictor_vars.index(cfg.mass_var)
    splits = {}
    for name in _SPLITS:
        part = slice(slices[name].start - lo, slices[name].stop - lo)
        splits[name] = _to_split(
            pr[part], valid[part], x[part], times[slices[name]], stats, normalizer, mass_index
        )
    grid = _fine_grid(
        ds, cfg, layout.target, static_mask & valid[used].any(axis=0), _standardised_static(static_raw, stats)
    )
    logger.info(
        "loaded %s: %d/%d/%d days, fine %dx%d, coarse %dx%d, %d predictors, %d static",
        src,
        *(len(splits[n]) for n in _SPLITS),
        *layout.target.shape[1:],
        *layout.predictors[0].shape[1:],
        len(layout.predictors),
        len(layout.statics),
    )
    return Dataset(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        grid=grid,
        normalizer=normalizer,
        stats=stats,
        factor=cfg.upscale_factor,
        source=src,
        attrs=dict(ds.attrs),
    )


def _inputs(
    ds: xr.Dataset,
    cfg: DataConfig,
    src: str,
    stats: Normalization,
    grid: FineGrid | None,
    split: str,
) -> Inputs:
    has_target = cfg.target_var in ds.data_vars
    if not has_target and grid is None:
        raise DataError(
            f"{src}: variable {cfg.target_var!r} (data.target_var) not found, and no fine grid is known "
            "to write on (checkpoints written before they carried the fine grid have none): "
            f"give a file that has {cfg.target_var!r} on the fine grid, or retrain"
        )
    layout = _layout(ds, cfg, src, fine=has_target)
    times = layout.times
    if not len(times):
        raise DataError(f"{src}: {cfg.time_dim} (data.time_dim) has no dates")
    days = slice(0, len(times)) if split == "all" else _split_slices(times, cfg.split, src)[0][split]
    read_times = times[days]
    used = np.ones(len(read_times), dtype=bool)
    if layout.target is not None:
        static_mask = _static_mask(layout.mask, layout.target.shape[1:])
        _, valid = _read_target(src, cfg, layout.target, days, read_times, used, static_mask)
        static_raw = _read_static(src, cfg, layout.statics, static_mask.shape)
        static = _standardised_static(static_raw, stats)
        file_grid = _fine_grid(ds, cfg, layout.target, static_mask & valid.any(axis=0), static)
        if grid is not None and file_grid.shape != grid.shape:
            raise DataError(
                f"{src}: fine grid {file_grid.shape[0]}x{file_grid.shape[1]} of {cfg.target_var!r} is not "
                f"the model's {grid.shape[0]}x{grid.shape[1]}"
            )
        grid = file_grid
    else:
        assert grid is not None
        coarse = layout.predictors[0].shape[1:]
        f = cfg.upscale_factor
        if (coarse[0] * f, coarse[1] * f) != grid.shape:
            raise DataError(
                f"{src}: coarse grid {coarse[0]}x{coarse[1]} ({'/'.join(cfg.coarse_dims)}) times "
                f"upscale_factor {f} is not the model's fine grid {grid.shape[0]}x{grid.shape[1]}; "
                f"expected predictors on {grid.shape[0] // f}x{grid.shape[1] // f}"
            )
        valid = np.broadcast_to(grid.mask.cpu().numpy(), (len(read_times), *grid.shape))
    needed = _coarse_cover(valid, cfg.upscale_factor)
    x = _read_predictors(src, cfg, layout.predictors, days, read_times, used, needed)
    return Inputs(
        coarse=torch.from_numpy(_standardised(x, stats)),
        mask=torch.from_numpy(np.ascontiguousarray(valid))[:, None],
        times=read_times,
        grid=grid,
        attrs=dict(ds.attrs),
        source=src,
    )


def _static_mask(mask_da: xr.DataArray | None, shape: tuple[int, ...]) -> np.ndarray:
    """[H, W] True inside ``mask_var`` (finite and non-zero); everywhere without one."""
    if mask_da is None:
        return np.ones(shape, dtype=bool)
    m = mask_da.values
    return np.isfinite(m) & (np.nan_to_num(m) != 0)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _day(t: np.datetime64) -> str:
    return str(np.datetime_as_string(t, unit="D"))


def _no_infinite(
    src: str,
    name: str,
    field: str,
    values: np.ndarray,
    times: np.ndarray | None = None,
    used: np.ndarray | None = None,
) -> None:
    """Refuse +-inf in ``values`` ([N, ...] on ``times``, on the ``used`` days only, when given)."""
    bad = np.isinf(values)
    if used is not None:
        bad &= used.reshape(-1, *([1] * (bad.ndim - 1)))
    n = int(np.count_nonzero(bad))
    if not n:
        return
    where = ""
    if times is not None:
        where = f", the first on {_day(times[int(bad.reshape(len(times), -1).any(axis=1).argmax())])}"
    raise DataError(
        f"{src}: variable {name!r} ({field}) has {_count(n, 'infinite value')}{where}; "
        "expected finite values, with NaN for missing cells"
    )


def _read_target(
    src: str,
    cfg: DataConfig,
    target: xr.DataArray,
    days: slice,
    times: np.ndarray,
    used: np.ndarray,
    static_mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The target on ``days`` in mm/day (NaN where invalid, negatives as 0) and its validity [N, H, W]."""
    pr = target.isel({cfg.time_dim: days}).values.astype(np.float32)
    _no_infinite(src, cfg.target_var, "data.target_var", pr, times, used)
    valid = ~np.isnan(pr) & static_mask
    negative = valid & (pr < 0) & used[:, None, None]
    n_negative = int(np.count_nonzero(negative))
    if n_negative:
        logger.warning(
            "%s: %s (data.target_var) has %d negative values (min %.3g), the first on %s; read as 0 mm/day",
            src,
            cfg.target_var,
            n_negative,
            float(pr[negative].min()),
            _day(times[int(negative.any(axis=(1, 2)).argmax())]),
        )
    pr = np.where(valid, np.maximum(pr, 0.0), np.nan).astype(np.float32)
    return pr, valid


def _coarse_cover(valid: np.ndarray, factor: int) -> np.ndarray:
    """[N, h, w] True where a coarse cell covers at least one valid fine cell of ``valid`` [N, H, W]."""
    n, h, w = valid.shape
    return valid.reshape(n, h // factor, factor, w // factor, factor).any(axis=(2, 4))


def _read_predictors(
    src: str,
    cfg: DataConfig,
    predictors: list[xr.DataArray],
    days: slice,
    times: np.ndarray,
    used: np.ndarray,
    needed: np.ndarray,
) -> np.ndarray:
    """The predictors on ``days`` [N, P, h, w], NaN where missing; refused where missing over ``needed``."""
    x = np.stack([p.isel({cfg.time_dim: days}).values.astype(np.float32) for p in predictors], axis=1)
    for i, name in enumerate(cfg.predictor_vars):
        _no_infinite(src, name, "data.predictor_vars", x[:, i], times, used)
        missing = np.isnan(x[:, i]) & needed
        n = int(np.count_nonzero(missing))
        if not n:
            continue
        first = _day(times[int(missing.any(axis=(1, 2)).argmax())])
        if cfg.missing_predictors == "fill":
            logger.warning(
                "%s: filled %d missing values (NaN) of %r (data.predictor_vars) over cells where %s is valid "
                "with its training mean (data.missing_predictors: fill), the first on %s",
                src,
                n,
                name,
                cfg.target_var,
                first,
            )
            continue
        raise DataError(
            f"{src}: variable {name!r} (data.predictor_vars) has {_count(n, 'missing value')} (NaN) over "
            f"cells where {cfg.target_var} is valid, the first on {first}; expected values there: fill the "
            "gaps in the file, or set data.missing_predictors: fill to use the training mean"
        )
    return x


def _read_static(
    src: str, cfg: DataConfig, statics: list[xr.DataArray], shape: tuple[int, ...]
) -> np.ndarray:
    """The static fields [S, H, W] as stored (NaN where missing)."""
    out = np.empty((len(statics), *shape), dtype=np.float32)
    for i, (name, field) in enumerate(zip(cfg.static_vars, statics, strict=True)):
        out[i] = field.values
        _no_infinite(src, name, "data.static_vars", out[i])
    return out


def _standardised_static(static_raw: np.ndarray, stats: Normalization) -> torch.Tensor:
    mean = np.asarray(stats.static_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(stats.static_std, dtype=np.float32).reshape(-1, 1, 1)
    return torch.from_numpy(_finite_or_zero((static_raw - mean) / std))


def _standardised(x: np.ndarray, stats: Normalization) -> np.ndarray:
    """Predictors [N, P, h, w] standardised; a missing value becomes 0.0, the training mean."""
    mean = np.asarray(stats.predictor_mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(stats.predictor_std, dtype=np.float32)[None, :, None, None]
    return _finite_or_zero((x - mean) / std)


def _fine_grid(
    ds: xr.Dataset, cfg: DataConfig, target: xr.DataArray, mask: np.ndarray, static: torch.Tensor
) -> FineGrid:
    coords, attrs = {}, {}
    for d in cfg.fine_dims:
        if d in ds.coords:
            coords[d], attrs[d] = np.asarray(ds[d].values), dict(ds[d].attrs)
        else:
            coords[d], attrs[d] = np.arange(ds.sizes[d]), {}
    return FineGrid(
        coords=coords,
        coord_attrs=attrs,
        mask=torch.from_numpy(mask),
        static=static,
        target_attrs=dict(target.attrs),
    )


def _plain(value: Any) -> Any:
    """``value`` as something ``torch.load(weights_only=True)`` accepts: tensors, lists, scalars, str."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return torch.from_numpy(value.copy())
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _plain_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {str(k): _plain(v) for k, v in attrs.items()}


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
                first, last = pd.Timestamp(period[0]), pd.Timestamp(period[1])
            except (TypeError, ValueError, KeyError) as e:
                raise DataError(
                    f"{src}: data.split.{name}: cannot read {period!r} as dates ({_one_line(e)})"
                ) from e
            slices[name] = slice(start, max(start, stop))
            labels[name] = f"{period[0]} to {period[1]}"
            # A period partly outside the data would be cut silently to the days inside it.
            held = slices[name].stop - slices[name].start
            if held and (first < index[0].normalize() or last > index[-1].normalize()):
                raise DataError(
                    f"{src}: data.split.{name}: the period {labels[name]} runs "
                    f"{'before' if first < index[0].normalize() else 'past'} the data, which cover "
                    f"{_day(times[0])} to {_day(times[-1])} (it would hold {held} of its "
                    f"{(last - first).days + 1} days); expected a period within the data"
                )
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
    mask = torch.from_numpy(np.ascontiguousarray(valid))[:, None]
    fine = normalizer.to_model(torch.from_numpy(np.where(valid, pr, 0.0).astype(np.float32)))[:, None]
    fine = fine.masked_fill(~mask, 0.0).float()
    coarse = torch.from_numpy(_standardised(x, stats))
    coarse_mass = None
    if mass_index is not None:
        mass = x[:, mass_index : mass_index + 1]
        coarse_mass = torch.from_numpy(
            np.where(np.isfinite(mass), mass, stats.predictor_mean[mass_index]).astype(np.float32)
        )
    return Split(fine=fine, mask=mask, coarse=coarse, coarse_mass=coarse_mass, times=times)
