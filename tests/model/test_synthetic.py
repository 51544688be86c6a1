from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from model.config import DataConfig, SyntheticConfig
from model.synthetic import synthetic_path, write_synthetic

ROOT = Path(__file__).resolve().parents[2]
SMALL = SyntheticConfig(n_days=120, height=24, width=24, n_extra_predictors=2, seed=3)


def _make(tmp_path: Path, cfg: SyntheticConfig = SMALL, factor: int = 4, name: str = "syn.nc") -> xr.Dataset:
    path = write_synthetic(cfg, factor, tmp_path / name)
    with xr.open_dataset(path) as ds:
        return ds.load()


def _block_nanmean(x: np.ndarray, factor: int) -> np.ndarray:
    n, h, w = x.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (ocean) blocks
        return np.nanmean(x.reshape(n, h // factor, factor, w // factor, factor), axis=(2, 4))


def test_same_seed_gives_identical_data_and_another_seed_differs(tmp_path: Path) -> None:
    a = _make(tmp_path, name="a.nc")
    b = _make(tmp_path, name="b.nc")
    c = _make(tmp_path, dataclasses.replace(SMALL, seed=4), name="c.nc")
    xr.testing.assert_identical(a, b)
    assert not np.array_equal(a["pr"].values, c["pr"].values)
    assert not np.array_equal(a["x1_coarse"].values, c["x1_coarse"].values)


def test_layout_units_and_coordinates(tmp_path: Path) -> None:
    ds = _make(tmp_path)
    assert dict(ds.sizes) == {"time": 120, "lat": 24, "lon": 24, "lat_coarse": 6, "lon_coarse": 6}
    assert ds["pr"].dims == ("time", "lat", "lon")
    assert ds["pr"].dtype == np.float32
    assert ds["pr"].attrs["units"] == "mm/day"
    assert ds["time"].dtype.kind == "M"
    assert str(ds["time"].values[0])[:10] == SMALL.start
    assert (np.diff(ds["time"].values) == np.timedelta64(1, "D")).all()
    np.testing.assert_allclose(ds["lat_coarse"].values, ds["lat"].values.reshape(6, 4).mean(axis=1))
    np.testing.assert_allclose(ds["lon_coarse"].values, ds["lon"].values.reshape(6, 4).mean(axis=1))
    assert ((ds["lat"] > -90) & (ds["lat"] < 90)).all()
    for name in ("x1_coarse", "x2_coarse"):
        assert ds[name].dims == ("time", "lat_coarse", "lon_coarse")
        assert ds[name].dtype == np.float32
    assert "x3_coarse" not in ds and "mask" not in ds
    assert ds["elevation"].dims == ("lat", "lon")
    assert np.isfinite(ds["elevation"].values).all() and float(ds["elevation"].std()) > 10.0
    assert "model.synthetic" in ds.attrs["generator"]
    assert json.loads(ds.attrs["synthetic_config"]) == dataclasses.asdict(SMALL)
    assert ds.attrs["upscale_factor"] == 4


@pytest.mark.parametrize("wet_fraction", [0.25, 0.6])
def test_wet_fraction_is_near_the_setting_and_varies_by_day(tmp_path: Path, wet_fraction: float) -> None:
    cfg = dataclasses.replace(SMALL, n_days=200, wet_fraction=wet_fraction)
    wet = _make(tmp_path, cfg)["pr"].values > 0
    assert abs(wet.mean() - wet_fraction) < 0.03
    assert wet.mean(axis=(1, 2)).std() > 0.03


def test_wet_intensities_are_heavy_tailed_with_the_configured_mean(tmp_path: Path) -> None:
    pr = _make(tmp_path)["pr"].values
    wet = pr[pr > 0]
    # An exponential's P99/median is ln(100)/ln(2), about 6.6.
    assert np.percentile(wet, 99) / np.median(wet) > 9.0
    assert wet.mean() == pytest.approx(SMALL.mean_intensity, rel=0.2)


def test_field_is_spatially_correlated_with_a_red_spectrum(tmp_path: Path) -> None:
    pr = _make(tmp_path)["pr"].values.astype(np.float64)
    neighbour = np.corrcoef(pr[:, :, :-1].ravel(), pr[:, :, 1:].ravel())[0, 1]
    assert neighbour > 0.5
    anomaly = pr - pr.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(anomaly)) ** 2).mean(axis=0)
    k = np.hypot(np.fft.fftfreq(24)[:, None], np.fft.fftfreq(24)[None, :])
    bands = [power[(k > lo) & (k <= hi)].mean() for lo, hi in ((0.0, 0.15), (0.15, 0.3), (0.3, 0.75))]
    assert bands[0] > bands[1] > bands[2]
    assert bands[0] > 10 * bands[2]


def test_coarse_field_is_informative_but_leaves_fine_detail_uncertain(tmp_path: Path) -> None:
    ds = _make(tmp_path)
    fine = np.log1p(ds["pr"].values.astype(np.float64))
    up = np.log1p(ds["pr_coarse"].values.astype(np.float64)).repeat(4, axis=1).repeat(4, axis=2)
    explained = 1.0 - ((fine - up) ** 2).mean() / fine.var()
    assert 0.2 < explained < 0.9
    signal = np.log1p(ds["pr_coarse"].values).ravel()
    assert np.corrcoef(ds["x1_coarse"].values.ravel(), signal)[0, 1] > 0.5
    assert np.corrcoef(ds["x2_coarse"].values.ravel(), signal)[0, 1] > 0.3


def test_mask_marks_an_ocean_corner_where_pr_is_nan(tmp_path: Path) -> None:
    ds = _make(tmp_path, dataclasses.replace(SMALL, with_mask=True))
    mask = ds["mask"].values
    assert ds["mask"].dtype == np.int8 and set(np.unique(mask)) == {0, 1}
    assert 0.1 < (mask == 0).mean() < 0.2
    assert mask[-1, -1] == 0 and mask[0, 0] == 1
    pr = ds["pr"].values
    assert np.isnan(pr[:, mask == 0]).all()
    assert np.isfinite(pr[:, mask == 1]).all()


def test_coarse_precipitation_is_the_nan_aware_block_mean(tmp_path: Path) -> None:
    ds = _make(tmp_path, dataclasses.replace(SMALL, with_mask=True))
    pr, coarse = ds["pr"].values, ds["pr_coarse"].values
    blocks = np.isnan(pr[0]).reshape(6, 4, 6, 4).sum(axis=(1, 3))
    assert ((blocks > 0) & (blocks < 16)).any(), "no partly masked block: the NaN-aware path is untested"
    np.testing.assert_allclose(coarse, _block_nanmean(pr, 4), rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(np.isnan(coarse[0]), blocks == 16)


def test_covariates_and_extra_predictor_count_follow_the_config(tmp_path: Path) -> None:
    ds = _make(tmp_path, dataclasses.replace(SMALL, n_extra_predictors=0))
    assert [v for v in ds.data_vars if v.startswith("x")] == []
    ds = _make(tmp_path, dataclasses.replace(SMALL, n_extra_predictors=3, with_mask=True), name="b.nc")
    for i in (1, 2, 3):
        assert np.isfinite(ds[f"x{i}_coarse"].values).all(), "covariates exist over the ocean too"


def test_rejects_a_grid_that_is_not_a_multiple_of_the_factor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="upscale_factor.*24x24"):
        write_synthetic(SMALL, 5, tmp_path / "bad.nc")
    assert list(tmp_path.iterdir()) == []


def test_write_leaves_only_the_finished_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "syn.nc"
    assert write_synthetic(SMALL, 4, path) == path
    write_synthetic(SMALL, 4, path)
    assert [p.name for p in path.parent.iterdir()] == ["syn.nc"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "syn.nc").mkdir()
    with pytest.raises(OSError):
        write_synthetic(SMALL, 4, tmp_path / "syn.nc")
    assert [p.name for p in tmp_path.iterdir()] == ["syn.nc"]


def test_synthetic_path_uses_data_path_or_a_cache_named_by_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CVAE_SEARCH_CACHE", str(tmp_path))
    data = DataConfig(synthetic=SMALL)
    path = synthetic_path(data)
    assert path.parent == tmp_path and path.name.startswith("synthetic-") and path.suffix == ".nc"
    assert synthetic_path(DataConfig(synthetic=dataclasses.replace(SMALL))) == path
    assert synthetic_path(DataConfig(synthetic=dataclasses.replace(SMALL, seed=9))) != path
    assert synthetic_path(DataConfig(synthetic=SMALL, upscale_factor=2)) != path
    assert synthetic_path(DataConfig(synthetic=SMALL, path=str(tmp_path / "mine.nc"))) == tmp_path / "mine.nc"


def test_synthetic_path_is_the_same_in_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CVAE_SEARCH_CACHE", str(tmp_path))
    code = (
        "from model.config import DataConfig, SyntheticConfig\n"
        "from model.synthetic import synthetic_path\n"
        "print(synthetic_path(DataConfig(synthetic=SyntheticConfig(n_days=120, height=24, width=24, "
        "n_extra_predictors=2, seed=3))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(synthetic_path(DataConfig(synthetic=SMALL)))


def test_storms_add_rare_compact_heavy_rain_and_leave_every_other_day_unchanged(tmp_path: Path) -> None:
    plain = _make(tmp_path, factor=8, name="plain.nc")
    stormy = _make(
        tmp_path, dataclasses.replace(SMALL, storm_days=0.1, storm_intensity=150.0), factor=8, name="s.nc"
    )
    changed = np.flatnonzero(np.any(plain["pr"].values != stormy["pr"].values, axis=(1, 2)))
    assert 0.03 * SMALL.n_days < len(changed) < 0.2 * SMALL.n_days
    extra = stormy["pr"].values[changed] - plain["pr"].values[changed]
    assert extra.min() >= 0
    peak = extra.max(axis=(1, 2), keepdims=True)
    assert np.all((extra > 0.1 * peak).sum(axis=(1, 2)) < 0.15 * 24 * 24)  # compact: a small part of the grid
    assert np.median(extra.max(axis=(1, 2))) > 2 * np.quantile(plain["pr"].values, 0.99)
    # The coarse input only hints: at factor 8 a storm's coarse block mean is far below its peak.
    coarse_extra = stormy["pr_coarse"].values[changed] - plain["pr_coarse"].values[changed]
    assert np.all(coarse_extra.max(axis=(1, 2)) < 0.5 * extra.max(axis=(1, 2)))


def test_a_set_without_storms_keeps_the_cache_name_it_had_before_storms_existed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CVAE_SEARCH_CACHE", str(tmp_path))
    settings = dataclasses.asdict(SMALL)
    for name in ("storm_days", "storm_intensity", "storm_radius"):
        del settings[name]
    key = settings | {"upscale_factor": 4, "generator_version": 1}
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    assert synthetic_path(DataConfig(synthetic=SMALL)).name == f"synthetic-{digest}.nc"
    assert synthetic_path(DataConfig(synthetic=dataclasses.replace(SMALL, storm_days=0.05))).name != (
        f"synthetic-{digest}.nc"
    )
