"""The one typed configuration schema: data, model, loss, train and eval sections.

YAML is parsed once, here, into these dataclasses. Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` with one line naming the file, the
dotted field and what was expected. ``train``, the search and ``export`` all use
this schema; an exported trial is a :class:`Config` plus a ``provenance`` block.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DownstreamConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "Normalization",
    "SplitConfig",
    "SyntheticConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_dataclass",
    "read_yaml",
    "save_config",
    "get_field",
    "with_overrides",
]

T = TypeVar("T")

KLMode = Literal["plain", "free_bits_sample", "free_bits_batch"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """Field metadata: the inclusive (or, with ``lo_open``, exclusive) bounds of a number."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


def _num(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    return field(default=default, metadata=_range(lo, hi, lo_open=lo_open))


@dataclass
class SyntheticConfig:
    """The built-in synthetic set: zero-inflated, heavy-tailed, spatially correlated rain."""

    n_days: int = _num(730, 8)
    start: str = "2000-01-01"
    height: int = _num(32, 4)
    width: int = _num(32, 4)
    wet_fraction: float = _num(0.45, 0.01, 0.99)
    mean_intensity: float = _num(6.0, 0.0, lo_open=True)
    """Mean wet-cell intensity, mm/day."""
    tail_shape: float = _num(0.7, 0.05, 10.0)
    """Gamma shape of wet intensities; below 1 the tail is heavier than exponential."""
    spectral_slope: float = _num(3.0, 0.0, 8.0)
    """Power-law exponent of the latent random field's spectrum (larger is smoother)."""
    n_extra_predictors: int = _num(1, 0, 16)
    """Coarse predictors besides coarse precipitation (noisy covariates of it)."""
    with_mask: bool = False
    """Mark a corner of the grid as ocean (NaN) to exercise the mask-aware path."""
    seed: int = _num(0, 0)
    storm_days: float = _num(0.0, 0.0, 1.0)
    """Fraction of days with one compact convective storm added: rare heavy rain in the fine
    field that the coarse block means only hint at (diluted over factor x factor cells)."""
    storm_intensity: float = _num(80.0, 0.0, lo_open=True)
    """Mean peak of a storm, mm/day (each peak is gamma-distributed, shape 2)."""
    storm_radius: float = _num(2.0, 0.1)
    """Gaussian radius of a storm, fine cells."""


@dataclass
class SplitConfig:
    """Time-based splits: inclusive ``[start, end]`` dates, or chronological fractions."""

    train: list[str] | None = None
    val: list[str] | None = None
    test: list[str] | None = None
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    allow_overlap: bool = False
    """Accept ``[start, end]`` periods that share days (the splits then leak into each other)."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "file"] = "synthetic"
    path: str | None = None
    """NetCDF or Zarr store; for ``synthetic`` where the generated file is written
    (default: a cache folder named by the generator's settings)."""
    engine: str | None = None
    """xarray engine: ``h5netcdf``, ``scipy`` (NetCDF-3), ``netcdf4`` or ``zarr`` where their packages
    are installed; ``None`` lets xarray choose (``zarr`` for ``*.zarr`` or a folder)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    target_var: str = "pr"
    predictor_vars: list[str] = field(default_factory=lambda: ["pr_coarse", "x1_coarse"])
    static_vars: list[str] = field(default_factory=list)
    mask_var: str | None = None
    """High-resolution static field, non-zero where cells are valid (land). Without it (and
    always) the target's NaN cells are invalid."""
    mass_var: str | None = "pr_coarse"
    """Coarse predictor in the target's units that the mass term conserves."""
    missing_predictors: Literal["error", "fill"] = "error"
    """A predictor's NaN over a coarse cell that covers a valid target cell that day: an error,
    or (``fill``, for a predictor that has gaps by nature) its training mean, with a warning."""
    time_dim: str = "time"
    fine_dims: list[str] = field(default_factory=lambda: ["lat", "lon"])
    coarse_dims: list[str] = field(default_factory=lambda: ["lat_coarse", "lon_coarse"])
    upscale_factor: int = _num(4, 1)
    transform: Literal["log1p", "none"] = "log1p"
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelConfig:
    latent_dim: int = _num(128, 1)
    channels: int = _num(32, 1)
    """Base convolution width; deeper stages use twice as many."""
    n_res_blocks: int = _num(2, 0, 16)
    encoder_pool: Literal["grid", "global"] = "grid"
    """How the encoder summarises the fine field: ``grid`` pools to the coarse grid, keeping
    where fine-scale structure lies; ``global`` averages it away (a common encoder that leaves
    z little to say, and so collapses easily)."""
    output: Literal["regression", "hurdle", "copula"] = "regression"
    """``hurdle``: a wet-probability head plus an intensity head (zero-inflated output).
    ``copula``: per-cell wet probability, intensity mean and spread, drawn jointly through a
    spatially correlated Gaussian field (see ``model.cvae``)."""
    noise_length: float = _num(1.5, 0.0, lo_open=True)
    """``copula`` only: correlation length, in fine cells, of the field that draws each sample's
    fine-scale rain (the Gaussian filter's standard deviation)."""
    prior: Literal["standard", "learned"] = "standard"
    """``learned``: a conditional prior p(z | coarse) (Sohn et al. 2015)."""


@dataclass
class LossConfig:
    scale: float = _num(20.0, 0.0, lo_open=True)
    w_min: float = _num(0.1, 0.0)
    w_max: float = _num(3.0, 0.0, lo_open=True)
    tail_boost: float = _num(2.0, 1.0)
    beta_kl: float = _num(0.05, 0.0)
    kl_mode: KLMode = "free_bits_batch"
    free_bits: float = _num(0.5, 0.0)
    """Nats per latent dimension below which the KL carries no gradient."""
    kl_warmup_epochs: int = _num(0, 0)
    """Linear warm-up of ``beta_kl`` over this many epochs (0: none)."""
    lambda_grad: float = _num(0.0, 0.0)
    lambda_mass: float = _num(0.005, 0.0)


@dataclass
class TrainConfig:
    epochs: int = _num(30, 1)
    batch_size: int = _num(64, 1)
    lr: float = _num(1e-3, 0.0, lo_open=True)
    weight_decay: float = _num(0.0, 0.0)
    grad_clip: float = _num(1.0, 0.0)
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = _num(0, 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on the CPU."""
    compile: bool = False
    """``torch.compile`` the model; falls back to eager with a warning if it fails."""
    threads: int | None = _num(None, 1)
    """CPU threads for training and evaluation (``None``: the process's setting, all cores by
    default). Float sums on the CPU depend on the thread count, so an export sets the trial's."""
    save_checkpoint: bool = True


@dataclass
class EvalConfig:
    split: Literal["val", "test"] = "val"
    n_samples: int = _num(8, 2)
    """K samples per coarse input, drawn from the prior."""
    max_days: int | None = _num(None, 1)
    temperature: float = _num(1.0, 0.0, lo_open=True)
    wet_threshold: float = _num(0.1, 0.0)
    """mm/day above which a cell counts as wet."""
    active_unit_threshold: float = _num(0.01, 0.0)
    batch_size: int = _num(64, 1)
    plot_days: int = _num(3, 0)
    plot_samples: int = _num(4, 1)
    seed: int = _num(1234, 0)


@dataclass
class DownstreamConfig:
    """SRDRN (Wang et al. 2021) trained without and with cVAE-generated pairs, scored on the
    held-out test split (``cvae-search downstream``). Both arms share seeds and budget."""

    channels: int = _num(64, 1)
    n_res_blocks: int = _num(16, 0, 64)
    upsample: Literal["pixel_shuffle", "resize_conv"] = "pixel_shuffle"
    """``pixel_shuffle`` per prime factor of the upscale factor, or nearest resize + convolution."""
    loss: Literal["weighted_mae", "pinball"] = "weighted_mae"
    """``weighted_mae``: the cVAE's intensity weighting (``loss`` section) in mm/day.
    ``pinball``: one output head per entry of ``quantiles``."""
    quantiles: list[float] = field(default_factory=lambda: [0.5, 0.9, 0.99])
    weight_min: float = _num(0.1, 0.0)
    weight_max: float = _num(3.0, 0.0, lo_open=True)
    tail_boost: float = _num(2.0, 1.0)
    """``weighted_mae``: the intensity weighting of ``model.losses`` with these bounds and tail
    boost (the seed's). SRDRN's own, so that the cVAE's searched ``loss`` never changes it."""
    budget: Literal["steps", "epochs"] = "steps"
    """``steps``: both arms take ``steps`` optimiser steps (the same batches of real pairs).
    ``epochs``: both arms see the real pairs ``epochs`` times, so the augmented arm takes
    more steps; "more data" and "more steps" are then not separated."""
    steps: int = _num(2000, 1)
    epochs: int = _num(30, 1)
    batch_size: int = _num(32, 1)
    """Real pairs per batch; the augmented arm adds ``round(ratio * batch_size)`` generated ones."""
    lr: float = _num(1e-3, 0.0, lo_open=True)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_generated: int = _num(4, 0)
    """K: fields drawn from the cVAE's prior per augmented training day (0: none, and the
    augmented arm then trains exactly as the other)."""
    ratio: float = _num(1.0, 0.0, lo_open=True)
    """Generated pairs per real pair in a batch of the augmented arm."""
    augment_days: Literal["all", "heavy"] = "all"
    heavy_quantile: float = _num(0.95, 0.0, 1.0)
    """``heavy``: augment the training days whose domain-mean precipitation is above this
    quantile of the training split's daily domain means."""
    threshold_quantiles: list[float] = field(default_factory=lambda: [0.95, 0.99])
    """Heavy-rain thresholds: these quantiles of the training split's wet-cell intensities."""
    thresholds_mm: list[float] = field(default_factory=list)
    """Fixed heavy-rain thresholds, mm/day, besides the quantile ones."""
    selection: Literal["best_val", "last"] = "best_val"
    """The weights scored: the lowest validation loss seen (checked ``val_checks`` times) or the last."""
    val_checks: int = _num(10, 1)
    temperature: float = _num(1.0, 0.0, lo_open=True)
    """Prior temperature of the generated fields."""
    batch_size_eval: int = _num(64, 1)


@dataclass
class Normalization:
    """Statistics fitted on the training split only; carried with checkpoints and exports."""

    target_mean: float = 0.0
    target_std: float = 1.0
    predictor_mean: list[float] = field(default_factory=list)
    predictor_std: list[float] = field(default_factory=list)
    static_mean: list[float] = field(default_factory=list)
    static_std: list[float] = field(default_factory=list)
    wet_mean_intensity: float = 1.0
    """Mean wet-cell intensity of the training split, mm/day (the weights' reference)."""
    tail_threshold: float = 1.0
    """95th percentile of wet-cell intensity of the training split, mm/day."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    normalization: Normalization | None = None
    """Set by export (the trial's fitted statistics); ``None`` fits them on the training split."""

    def copy(self) -> Config:
        return copy.deepcopy(self)


# --- parsing -----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _fail(source: str, path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: {path}: expected {expected}, got {value!r}")


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        present = [a for a in args if a is not type(None)]
        if len(present) == 1:  # Optional[X]: X's own error is the informative one
            return _convert(present[0], value, source, path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, path)
            except ConfigError:
                continue
        raise _fail(source, path, _type_name(tp), value)
    if origin is Literal:
        if value not in get_args(tp):
            raise _fail(source, path, _type_name(tp), value)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(source, path, _type_name(tp), value)
        (item,) = get_args(tp)
        return [_convert(item, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(source, path, "a mapping", value)
        key_tp, value_tp = get_args(tp)
        return {
            _convert(key_tp, k, source, f"{path}.{k}"): _convert(value_tp, v, source, f"{path}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _fail(source, path, "a mapping", value)
        return _build(tp, value, source, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, path, "a boolean", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, path, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, path, "a string", value)
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _check_range(f: dataclasses.Field[Any], value: Any, source: str, path: str) -> None:
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    if value is None or (lo is None and hi is None):
        return
    if lo is not None and (value <= lo if f.metadata.get("lo_open") else value < lo):
        bound = f"> {lo}" if f.metadata.get("lo_open") else f">= {lo}"
        what = f"a value {bound}" + (f" and <= {hi}" if hi is not None else "")
        raise _fail(source, path, what, value)
    if hi is not None and value > hi:
        raise _fail(source, path, f"a value <= {hi}", value)


def parse_dataclass(cls: type[T], raw: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain data, checking keys, types and ranges.

    Errors name ``source`` (the file), the dotted field under ``prefix`` and what was expected.
    """
    if not isinstance(raw, Mapping):
        raise _fail(source, prefix or "<top level>", "a mapping", raw)
    return _build(cls, raw, source, prefix)


def _build(cls: type, raw: Mapping[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{source}: {where}: unknown field (expected one of: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        path = f"{prefix}.{name}" if prefix else name
        value = _convert(hints[name], raw[name], source, path)
        _check_range(f, value, source, path)
        kwargs[name] = value
    return cls(**kwargs)


def _check_consistency(cfg: Config, source: str) -> None:
    """Rules that tie several fields together."""
    d = cfg.data
    if d.source == "file" and not d.path:
        raise ConfigError(
            f"{source}: data.path: expected a NetCDF or Zarr path when data.source is 'file', got None"
        )
    for name in ("fine_dims", "coarse_dims"):
        dims = getattr(d, name)
        if len(dims) != 2:
            raise _fail(source, f"data.{name}", "two dimension names [y, x]", dims)
    if not d.predictor_vars:
        raise _fail(source, "data.predictor_vars", "at least one coarse predictor", d.predictor_vars)
    if d.mass_var is not None and d.mass_var not in d.predictor_vars:
        raise _fail(source, "data.mass_var", f"one of data.predictor_vars {d.predictor_vars}", d.mass_var)
    if cfg.loss.lambda_mass > 0 and d.mass_var is None:
        raise _fail(
            source, "data.mass_var", "a coarse precipitation predictor when loss.lambda_mass > 0", None
        )
    s = d.split
    periods = [s.train, s.val, s.test]
    if any(p is not None for p in periods):
        for name, p in zip(("train", "val", "test"), periods, strict=True):
            if p is None or len(p) != 2:
                raise _fail(source, f"data.split.{name}", "[start, end] dates for every split", p)
    if len(s.fractions) != 3 or any(x < 0 for x in s.fractions) or abs(sum(s.fractions) - 1) > 1e-6:
        raise _fail(source, "data.split.fractions", "three non-negative fractions summing to 1", s.fractions)
    ds = cfg.downstream
    if not ds.seeds or len(set(ds.seeds)) != len(ds.seeds) or any(v < 0 for v in ds.seeds):
        raise _fail(source, "downstream.seeds", "distinct non-negative seeds, at least one", ds.seeds)
    for name in ("quantiles", "threshold_quantiles"):
        qs = getattr(ds, name)
        if any(not 0 < q < 1 for q in qs) or len(set(qs)) != len(qs) or sorted(qs) != qs:
            raise _fail(source, f"downstream.{name}", "increasing distinct values in (0, 1)", qs)
    if ds.loss == "pinball" and not ds.quantiles:
        raise _fail(
            source, "downstream.quantiles", "at least one quantile for the pinball loss", ds.quantiles
        )
    if any(t <= 0 for t in ds.thresholds_mm):
        raise _fail(source, "downstream.thresholds_mm", "positive mm/day thresholds", ds.thresholds_mm)
    if ds.weight_min > ds.weight_max:
        raise _fail(
            source,
            "downstream.weight_min",
            f"a value <= downstream.weight_max ({ds.weight_max})",
            ds.weight_min,
        )
    if not ds.threshold_quantiles and not ds.thresholds_mm:
        raise _fail(source, "downstream.threshold_quantiles", "a threshold (or downstream.thresholds_mm)", [])
    if cfg.loss.w_min > cfg.loss.w_max:
        raise _fail(source, "loss.w_min", f"a value <= loss.w_max ({cfg.loss.w_max})", cfg.loss.w_min)
    syn = d.synthetic
    if d.source == "synthetic" and (syn.height % d.upscale_factor or syn.width % d.upscale_factor):
        raise _fail(
            source,
            "data.upscale_factor",
            f"a divisor of the synthetic grid {syn.height}x{syn.width}",
            d.upscale_factor,
        )


def config_from_dict(raw: Mapping[str, Any] | None, source: str = "<config>") -> Config:
    """Build and validate a :class:`Config` from plain data (e.g. parsed YAML)."""
    cfg = _build(Config, raw or {}, source, "")
    _check_consistency(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data for YAML or JSON; ``config_from_dict`` of it gives an equal config."""
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path, what: str = "file") -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty for an empty file); errors name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such {what}") from e
    except yaml.YAMLError as e:
        # PyYAML's message spans several lines (it quotes the offending text); keep one.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from e
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return dict(raw)


def load_config(path: str | Path) -> Config:
    """Load a YAML config. A top-level ``provenance`` block (from export) is ignored here."""
    raw = read_yaml(path)
    raw.pop("provenance", None)
    return config_from_dict(raw, str(path))


def save_config(cfg: Config, path: str | Path, provenance: Mapping[str, Any] | None = None) -> None:
    """Write ``cfg`` as YAML, with an optional ``provenance`` block after it."""
    data: dict[str, Any] = config_to_dict(cfg)
    if provenance is not None:
        data["provenance"] = dict(provenance)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def get_field(cfg: Config, dotted: str) -> Any:
    """The value at a dotted path such as ``loss.beta_kl``."""
    obj: Any = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise KeyError(dotted)
        obj = getattr(obj, part)
    return obj


def with_overrides(cfg: Config, overrides: Mapping[str, Any], source: str = "<override>") -> Config:
    """A validated copy of ``cfg`` with dotted fields (``loss.beta_kl``) replaced."""
    raw = config_to_dict(cfg)
    for dotted, value in overrides.items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{source}: {dotted}: unknown field")
            if node[part] is None:  # an unset optional section, e.g. normalization
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict) or (node and parts[-1] not in node):
            raise ConfigError(f"{source}: {dotted}: unknown field")
        node[parts[-1]] = value
    return config_from_dict(raw, source)
