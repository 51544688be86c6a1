from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from model.config import DataConfig, Normalization, SplitConfig, SyntheticConfig
from model.data import DataError, Dataset, Split, load_data

PERIODS = SplitConfig(
    train=["2000-01-01", "2000-02-09"], val=["2000-02-10", "2000-02-19"], test=["2000-02-20", "2000-02-29"]
)


def make_ds(
    *,
    n_days: int = 60,
    fine: tuple[int, int] = (16, 16),
    coarse: tuple[int, int] | None = None,
    factor: int = 4,
    predictors: Sequence[str] = ("pr_coarse", "x1"),
    seed: int = 0,
) -> xr.Dataset:
    """A small data set in the layout users provide: fine pr, coarse predictors, static fields."""
    rng = np.random.default_rng(seed)
    h, w = fine
    ch, cw = coarse or (h // factor, w // factor)
    pr = (rng.gamma(0.7, 8.0, (n_days, h, w)) * (rng.random((n_days, h, w)) < 0.5)).astype(np.float32)
    data = {"pr": (("time", "lat", "lon"), pr, {"units": "mm/day"})}
    for i, name in enumerate(predictors):
        if name == "pr_coarse" and coarse is None:
            values = pr.reshape(n_days, ch, factor, cw, factor).mean(axis=(2, 4))
        else:
            values = rng.normal(10.0 * i, 1.0 + i, (n_days, ch, cw))
        data[name] = (("time", "lat_coarse", "lon_coarse"), values.astype(np.float32))
    data["elevation"] = (("lat", "lon"), rng.uniform(0.0, 2000.0, (h, w)).astype(np.float32))
    mask = np.ones((h, w), dtype=np.int8)
    mask[: h // 4, : w // 4] = 0
    data["mask"] = (("lat", "lon"), mask)
    return xr.Dataset(
        data,
        coords={
            "time": np.datetime64("2000-01-01", "ns") + np.arange(n_days) * np.timedelta64(1, "D"),
            "lat": 40.0 + 0.1 * np.arange(h),
            "lon": 10.0 + 0.1 * np.arange(w),
            "lat_coarse": np.arange(ch, dtype=float),
            "lon_coarse": np.arange(cw, dtype=float),
        },
    )


def write(ds: xr.Dataset, path: Path) -> Path:
    ds.to_netcdf(path)
    return path


def file_cfg(path: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = {"source": "file", "path": str(path), "predictor_vars": ["pr_coarse", "x1"]}
    return DataConfig(**{**base, **kw})


def tensors(data: Dataset) -> list[torch.Tensor]:
    out = [data.static]
    for s in (data.train, data.val, data.test):
        out += [s.fine, s.coarse] + ([] if s.coarse_mass is None else [s.coarse_mass])
    return out


def test_loads_the_synthetic_set_through_the_file_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CVAE_SEARCH_CACHE", str(tmp_path))
    syn = SyntheticConfig(n_days=60, height=16, width=16, n_extra_predictors=1, with_mask=True)
    cfg = DataConfig(synthetic=syn, mask_var="mask", static_vars=["elevation"], upscale_factor=4)
    data = load_data(cfg)
    (path,) = tmp_path.glob("synthetic-*.nc")
    assert data.source == str(path)
    assert [len(s) for s in (data.train, data.val, data.test)] == [42, 9, 9]
    assert data.train.fine.shape == (42, 1, 16, 16) and data.train.fine.dtype == torch.float32
    assert data.train.mask.shape == (42, 1, 16, 16) and data.train.mask.dtype == torch.bool
    assert data.train.coarse.shape == (42, 2, 4, 4) and data.train.coarse.dtype == torch.float32
    assert data.train.coarse_mass is not None and data.train.coarse_mass.shape == (42, 1, 4, 4)
    assert data.static.shape == (1, 16, 16)
    assert (data.height, data.width, data.coarse_height, data.coarse_width) == (16, 16, 4, 4)
    assert (data.n_predictors, data.n_static, data.factor) == (2, 1, 4)
    assert data.train.times.dtype == np.dtype("datetime64[ns]")
    assert data.train.times[-1] < data.val.times[0] and data.val.times[-1] < data.test.times[0]
    assert data.grid.target_attrs["units"] == "mm/day"
    assert data.grid.coord_attrs["lat"]["units"] == "degrees_north"
    assert data.attrs["title"] == "cvae-search synthetic precipitation"

    with xr.open_dataset(path) as ds:
        np.testing.assert_array_equal(data.grid.coords["lat"], ds["lat"].values)
        pr = ds["pr"].values[:42]
        land = ds["mask"].values == 1
        coarse = ds["pr_coarse"].values[:42]
    np.testing.assert_array_equal(data.grid.mask.numpy(), land)
    np.testing.assert_array_equal(data.train.mask[:, 0].numpy(), np.isfinite(pr) & land)
    valid = data.train.mask[:, 0]
    back = data.normalizer.to_mm(data.train.fine[:, 0])[valid].numpy()
    np.testing.assert_allclose(back, pr[valid.numpy()], rtol=1e-4, atol=1e-4)
    assert np.isnan(coarse).any(), "coarse blocks over the ocean only are missing"
    filled = np.where(np.isnan(coarse), data.stats.predictor_mean[0], coarse)
    np.testing.assert_allclose(data.train.coarse_mass[:, 0].numpy(), filled, rtol=1e-6)
    assert all(torch.isfinite(t).all() for t in tensors(data))

    mtime = path.stat().st_mtime_ns
    load_data(cfg)
    assert path.stat().st_mtime_ns == mtime, "the cached synthetic set is reused"


def test_statistics_are_fitted_on_the_training_split_only(tmp_path: Path) -> None:
    ds = make_ds()
    cfg_kw = {"split": PERIODS, "static_vars": ["elevation"], "mask_var": "mask"}
    fitted = load_data(file_cfg(write(ds, tmp_path / "a.nc"), **cfg_kw)).stats

    later = ds["time"] >= np.datetime64("2000-02-10")
    changed = ds.copy(deep=True)
    for name in ("pr", "pr_coarse", "x1"):
        changed[name] = xr.where(later, changed[name] * 100.0 + 7.0, changed[name]).astype(np.float32)
    other = load_data(file_cfg(write(changed, tmp_path / "b.nc"), **cfg_kw))
    assert other.stats == fitted
    assert float(other.val.coarse.mean()) > 10.0, "the val split did change"

    train = ds.sel(time=slice("2000-01-01", "2000-02-09"))
    pr = train["pr"].values[:, ds["mask"].values == 1].ravel()
    assert fitted.target_mean == pytest.approx(np.log1p(pr.astype(np.float64)).mean(), rel=1e-6)
    assert fitted.target_std == pytest.approx(np.log1p(pr.astype(np.float64)).std(), rel=1e-6)
    assert fitted.predictor_mean[1] == pytest.approx(
        float(train["x1"].values.astype(np.float64).mean()), rel=1e-6
    )
    assert fitted.static_std[0] == pytest.approx(
        float(ds["elevation"].values.astype(np.float64).std()), rel=1e-6
    )
    wet = pr[pr > 0.1]
    assert fitted.wet_mean_intensity == pytest.approx(wet.astype(np.float64).mean(), rel=1e-6)
    assert fitted.tail_threshold == pytest.approx(np.percentile(wet, 95), rel=1e-6)


def test_given_normalization_is_used_as_is(tmp_path: Path) -> None:
    ds = make_ds()
    stats = Normalization(
        target_mean=0.5,
        target_std=2.0,
        predictor_mean=[1.0, 2.0],
        predictor_std=[3.0, 4.0],
        static_mean=[100.0],
        static_std=[10.0],
        wet_mean_intensity=7.0,
        tail_threshold=9.0,
    )
    data = load_data(file_cfg(write(ds, tmp_path / "a.nc"), static_vars=["elevation"]), stats)
    assert data.stats == stats and data.normalizer.stats == stats
    pr = torch.from_numpy(ds["pr"].values[:42])
    np.testing.assert_allclose(data.train.fine[:, 0], (torch.log1p(pr) - 0.5) / 2.0, rtol=1e-5, atol=1e-6)
    x1 = torch.from_numpy(ds["x1"].values[:42])
    np.testing.assert_allclose(data.train.coarse[:, 1], (x1 - 2.0) / 4.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.static[0], (ds["elevation"].values - 100.0) / 10.0, rtol=1e-5, atol=1e-5)


def test_non_square_factor_12_with_six_predictors(tmp_path: Path) -> None:
    names = ["pr_coarse", "tas", "psl", "hus", "ua", "va"]
    ds = make_ds(fine=(36, 24), factor=12, predictors=names)
    data = load_data(file_cfg(write(ds, tmp_path / "gcm.nc"), predictor_vars=names, upscale_factor=12))
    assert data.train.fine.shape == (42, 1, 36, 24)
    assert data.train.coarse.shape == (42, 6, 3, 2)
    assert data.test.coarse_mass is not None and data.test.coarse_mass.shape == (9, 1, 3, 2)
    assert (data.height, data.width, data.coarse_height, data.coarse_width) == (36, 24, 3, 2)
    assert data.n_predictors == 6 and data.n_static == 0 and data.static.shape == (0, 36, 24)
    assert [len(v) for v in data.grid.coords.values()] == [36, 24]
    for i in range(6):
        channel = data.train.coarse[:, i]
        assert abs(float(channel.mean())) < 1e-4 and float(channel.std()) == pytest.approx(1.0, rel=0.02)


def test_variables_in_another_dim_order_are_transposed(tmp_path: Path) -> None:
    ds = make_ds(fine=(16, 12))
    shuffled = ds.copy()
    shuffled["pr"] = ds["pr"].transpose("lon", "lat", "time")
    shuffled["x1"] = ds["x1"].transpose("lon_coarse", "time", "lat_coarse")
    shuffled["elevation"] = ds["elevation"].transpose("lon", "lat")
    kw = {"static_vars": ["elevation"], "mask_var": "mask"}
    a = load_data(file_cfg(write(ds, tmp_path / "a.nc"), **kw))
    b = load_data(file_cfg(write(shuffled, tmp_path / "b.nc"), **kw))
    assert b.train.fine.shape == (42, 1, 16, 12)
    for x, y in zip(tensors(a), tensors(b), strict=True):
        torch.testing.assert_close(x, y)
    assert torch.equal(a.train.mask, b.train.mask)


def test_nan_cells_are_masked_and_no_nan_reaches_a_tensor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = make_ds()
    ds["pr"][3, 5, 6] = np.nan
    ds["pr"][:, 10, 10] = np.nan
    ds["x1"][2, 0, 0] = np.nan  # over the ocean corner (the mask's [:4, :4]): not needed
    ds["pr_coarse"][4, 0, :] = np.nan  # three of these four cells cover land
    ds["elevation"][7, 7] = np.nan
    cfg = file_cfg(
        write(ds, tmp_path / "a.nc"), mask_var="mask", static_vars=["elevation"], missing_predictors="fill"
    )
    with caplog.at_level(logging.WARNING, logger="model.data"):
        data = load_data(cfg)
    mask = data.train.mask[:, 0]
    assert not mask[3, 5, 6] and not mask[:, 10, 10].any()
    assert not mask[:, :4, :4].any(), "ocean cells of the static mask are invalid"
    assert int(mask.sum()) == 42 * (256 - 16 - 1) - 1
    assert (data.train.fine[:, 0][~mask] == 0.0).all()
    assert data.train.coarse[2, 1, 0, 0] == 0.0
    assert (data.train.coarse[4, 0, 0, :] == 0.0).all()
    assert data.train.coarse_mass is not None
    torch.testing.assert_close(
        data.train.coarse_mass[4, 0, 0, :],
        torch.full((4,), data.stats.predictor_mean[0], dtype=torch.float32),
    )
    assert data.static[0, 7, 7] == 0.0
    assert all(torch.isfinite(t).all() for t in tensors(data))
    assert all(np.isfinite(v) for v in dataclasses.astuple(data.stats) if isinstance(v, float))
    filled = [r.getMessage() for r in caplog.records if "filled" in r.getMessage()]
    assert len(filled) == 1, caplog.text
    assert "filled 3 missing values (NaN) of 'pr_coarse'" in filled[0]
    assert "training mean" in filled[0] and "the first on 2000-01-05" in filled[0]


def test_missing_predictor_values_over_valid_cells_are_refused_by_default(tmp_path: Path) -> None:
    ds = make_ds()
    ds["x1"][2, 0, 0] = np.nan  # ocean only: not needed, and not counted
    ds["x1"][5, 1, 1] = np.nan
    ds["x1"][7, 2, 1:3] = np.nan
    path = write(ds, tmp_path / "a.nc")
    with pytest.raises(DataError) as info:
        load_data(file_cfg(path, mask_var="mask"))
    assert str(info.value) == (
        f"{path}: variable 'x1' (data.predictor_vars) has 3 missing values (NaN) over cells where pr is "
        "valid, the first on 2000-01-06; expected values there: fill the gaps in the file, or set "
        "data.missing_predictors: fill to use the training mean"
    )


def test_negative_rain_is_read_as_zero_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = make_ds()
    ds["pr"][0, 8, 8] = -2.0
    with caplog.at_level(logging.WARNING, logger="model.data"):
        data = load_data(file_cfg(write(ds, tmp_path / "a.nc")))
    assert "negative" in caplog.text and "pr" in caplog.text
    assert data.train.mask[0, 0, 8, 8]
    assert float(data.normalizer.to_mm(data.train.fine[0, 0, 8, 8])) == pytest.approx(0.0, abs=1e-6)


def test_periods_select_inclusive_date_ranges(tmp_path: Path) -> None:
    data = load_data(file_cfg(write(make_ds(), tmp_path / "a.nc"), split=PERIODS))
    assert [len(s) for s in (data.train, data.val, data.test)] == [40, 10, 10]
    assert str(data.train.times[0])[:10] == "2000-01-01" and str(data.train.times[-1])[:10] == "2000-02-09"
    assert str(data.test.times[-1])[:10] == "2000-02-29"


def test_overlapping_periods_load_only_when_allowed(tmp_path: Path) -> None:
    path = write(make_ds(), tmp_path / "a.nc")
    split = dataclasses.replace(PERIODS, val=["2000-02-01", "2000-02-19"])
    with pytest.raises(DataError, match=r"data\.split\.train .*data\.split\.val .*share 9 days.*leak"):
        load_data(file_cfg(path, split=split))
    data = load_data(file_cfg(path, split=dataclasses.replace(split, allow_overlap=True)))
    assert len(data.val) == 19


def test_a_singleton_level_dim_is_dropped(tmp_path: Path) -> None:
    ds = make_ds()
    ds["x1"] = ds["x1"].expand_dims(height=[2.0], axis=1)
    data = load_data(file_cfg(write(ds, tmp_path / "a.nc")))
    assert data.train.coarse.shape == (42, 2, 4, 4)


def test_a_noleap_calendar_becomes_standard_dates(tmp_path: Path) -> None:
    ds = make_ds(n_days=70)
    ds["time"] = xr.date_range("2001-02-01", periods=70, calendar="noleap", use_cftime=True)
    data = load_data(file_cfg(write(ds, tmp_path / "a.nc")))
    assert data.train.times.dtype == np.dtype("datetime64[ns]")
    assert str(data.train.times[0])[:10] == "2001-02-01"
    assert str(data.test.times[-1])[:10] == "2001-04-11"


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_zarr_store_loads_like_netcdf(tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    ds = make_ds()
    ds.to_zarr(tmp_path / "d.zarr")
    a = load_data(file_cfg(write(ds, tmp_path / "a.nc"), static_vars=["elevation"]))
    b = load_data(file_cfg(tmp_path / "d.zarr", static_vars=["elevation"]))
    assert a.stats == b.stats
    for x, y in zip(tensors(a), tensors(b), strict=True):
        torch.testing.assert_close(x, y)


def test_to_moves_every_tensor(tmp_path: Path) -> None:
    data = load_data(file_cfg(write(make_ds(), tmp_path / "a.nc"), static_vars=["elevation"]))
    moved = data.to("meta")
    assert all(t.device.type == "meta" for t in tensors(moved))
    assert all(s.mask.device.type == "meta" for s in (moved.train, moved.val, moved.test))
    assert data.train.fine.device.type == "cpu"
    assert moved.stats == data.stats and moved.height == 16
    split = data.val.to("meta")
    assert isinstance(split, Split) and len(split) == 9 and split.times is data.val.times


def _setup_missing_file(tmp_path: Path) -> DataConfig:
    return file_cfg(tmp_path / "absent.nc")


def _setup_missing_variable(tmp_path: Path) -> DataConfig:
    return file_cfg(write(make_ds(), tmp_path / "a.nc"), predictor_vars=["pr_coarse", "humidity"])


def _setup_wrong_dims(tmp_path: Path) -> DataConfig:
    return file_cfg(write(make_ds(), tmp_path / "a.nc"), static_vars=["x1"])


def _setup_fine_not_multiple(tmp_path: Path) -> DataConfig:
    return file_cfg(write(make_ds(fine=(30, 32), coarse=(8, 8)), tmp_path / "a.nc"))


def _setup_wrong_factor(tmp_path: Path) -> DataConfig:
    return file_cfg(write(make_ds(fine=(24, 24)), tmp_path / "a.nc"), upscale_factor=3)


def _setup_other_coarse_grid(tmp_path: Path) -> DataConfig:
    ds = make_ds()
    ds["x2"] = (("time", "lat_c2", "lon_c2"), np.ones((60, 2, 2), dtype=np.float32))
    return file_cfg(write(ds, tmp_path / "a.nc"), predictor_vars=["pr_coarse", "x1", "x2"])


def _setup_empty_split(tmp_path: Path) -> DataConfig:
    split = dataclasses.replace(PERIODS, val=["1990-01-01", "1990-12-31"])
    return file_cfg(write(make_ds(), tmp_path / "a.nc"), split=split)


def _setup_no_valid_train_cell(tmp_path: Path) -> DataConfig:
    ds = make_ds()
    ds["pr"][:42] = np.nan
    return file_cfg(write(ds, tmp_path / "a.nc"))


def _setup_non_monotonic_times(tmp_path: Path) -> DataConfig:
    ds = make_ds()
    times = ds["time"].values.copy()
    times[[10, 11]] = times[[11, 10]]
    return file_cfg(write(ds.assign_coords(time=times), tmp_path / "a.nc"))


def _setup_duplicate_times(tmp_path: Path) -> DataConfig:
    ds = make_ds()
    times = ds["time"].values.copy()
    times[20] = times[19]
    return file_cfg(write(ds.assign_coords(time=times), tmp_path / "a.nc"))


def _setup_infinite_target(tmp_path: Path) -> DataConfig:
    ds = make_ds()
    ds["pr"][9, 3, 3] = np.inf
    ds["pr"][30, 0, 0] = np.inf
    return file_cfg(write(ds, tmp_path / "a.nc"))


def _setup_infinite_predictor(tmp_path: Path) -> DataConfig:
    ds = make_ds()
    ds["x1"][12, 0, 0] = -np.inf
    return file_cfg(write(ds, tmp_path / "a.nc"), missing_predictors="fill")


def _setup_split_past_the_data(tmp_path: Path) -> DataConfig:
    split = SplitConfig(
        train=["2000-01-01", "2000-12-31"],
        val=["2000-01-25", "2000-01-31"],
        test=["2000-02-01", "2000-02-07"],
    )
    return file_cfg(write(make_ds(n_days=38), tmp_path / "a.nc"), split=split)


def _setup_split_before_the_data(tmp_path: Path) -> DataConfig:
    split = dataclasses.replace(PERIODS, train=["1999-12-01", "2000-02-09"])
    return file_cfg(write(make_ds(), tmp_path / "a.nc"), split=split)


def _setup_missing_engine(tmp_path: Path) -> DataConfig:
    return file_cfg(write(make_ds(), tmp_path / "a.nc"), engine="grib_reader")


def _setup_bad_date(tmp_path: Path) -> DataConfig:
    split = dataclasses.replace(PERIODS, train=["2000-13-01", "2000-02-09"])
    return file_cfg(write(make_ds(), tmp_path / "a.nc"), split=split)


def _setup_no_time_coordinate(tmp_path: Path) -> DataConfig:
    return file_cfg(write(make_ds().drop_vars("time"), tmp_path / "a.nc"))


def _setup_360_day_calendar(tmp_path: Path) -> DataConfig:
    ds = make_ds()
    ds["time"] = xr.date_range("2001-02-01", periods=60, calendar="360_day", use_cftime=True)
    return file_cfg(write(ds, tmp_path / "a.nc"))


def _setup_not_a_store(tmp_path: Path) -> DataConfig:
    (tmp_path / "empty.zarr").mkdir()
    return file_cfg(tmp_path / "empty.zarr")


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param(_setup_missing_file, ["absent.nc", "no such file"], id="missing_file"),
        pytest.param(
            _setup_missing_variable,
            ["'humidity'", "data.predictor_vars", "the file has", "pr_coarse, x1"],
            id="missing_variable",
        ),
        pytest.param(
            _setup_wrong_dims,
            ["'x1'", "data.static_vars", "(time, lat_coarse, lon_coarse)", "expected (lat, lon)"],
            id="wrong_dims",
        ),
        pytest.param(
            _setup_fine_not_multiple,
            ["fine grid 30x32 is not coarse grid 8x8 times upscale_factor 4", "multiple"],
            id="fine_not_multiple",
        ),
        pytest.param(
            _setup_wrong_factor,
            ["fine grid 24x24 is not coarse grid 6x6 times upscale_factor 3", "data.upscale_factor"],
            id="wrong_factor",
        ),
        pytest.param(
            _setup_other_coarse_grid,
            ["'x2'", "(time, lat_c2, lon_c2) 60x2x2", "lat_coarse"],
            id="other_coarse_grid",
        ),
        pytest.param(
            _setup_empty_split, ["data.split.val", "1990-01-01 to 1990-12-31", "empty"], id="empty_split"
        ),
        pytest.param(
            _setup_no_valid_train_cell,
            ["pr", "data.target_var", "no valid cell", "training split"],
            id="no_valid_train_cell",
        ),
        pytest.param(
            _setup_non_monotonic_times,
            ["time", "data.time_dim", "non-monotonic", "2000-01-11"],
            id="non_monotonic_times",
        ),
        pytest.param(
            _setup_duplicate_times, ["time", "data.time_dim", "duplicate", "2000-01-20"], id="duplicate_times"
        ),
        pytest.param(
            _setup_infinite_target,
            ["a.nc: variable 'pr' (data.target_var) has 2 infinite values, the first on 2000-01-10"],
            id="infinite_target",
        ),
        pytest.param(
            _setup_infinite_predictor,
            ["a.nc: variable 'x1' (data.predictor_vars) has 1 infinite value, the first on 2000-01-13"],
            id="infinite_predictor",
        ),
        pytest.param(
            _setup_split_past_the_data,
            [
                "a.nc: data.split.train: the period 2000-01-01 to 2000-12-31 runs past the data, which cover "
                "2000-01-01 to 2000-02-07 (it would hold 38 of its 366 days)"
            ],
            id="split_past_the_data",
        ),
        pytest.param(
            _setup_split_before_the_data,
            ["data.split.train: the period 1999-12-01 to 2000-02-09 runs before the data", "2000-01-01 to"],
            id="split_before_the_data",
        ),
        pytest.param(
            _setup_missing_engine, ["'grib_reader'", "data.engine", "not available"], id="missing_engine"
        ),
        pytest.param(_setup_bad_date, ["data.split.train", "2000-13-01"], id="bad_date"),
        pytest.param(
            _setup_no_time_coordinate, ["'time'", "data.time_dim", "no coordinate"], id="no_time_coordinate"
        ),
        pytest.param(
            _setup_360_day_calendar, ["time", "data.time_dim", "standard dates", "2001-02-29"], id="360_day"
        ),
        pytest.param(_setup_not_a_store, ["empty.zarr", "cannot open", "engine zarr"], id="not_a_store"),
    ],
)
def test_bad_input_raises_a_one_line_data_error(
    tmp_path: Path, setup: Callable[[Path], DataConfig], expected: list[str]
) -> None:
    cfg = setup(tmp_path)
    with pytest.raises(DataError) as info:
        load_data(cfg)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("predictor_mean", [0.0]), ("predictor_std", [1.0, 1.0, 1.0]), ("static_mean", [])],
)
def test_a_normalization_of_the_wrong_length_is_rejected(
    tmp_path: Path, field: str, value: list[float]
) -> None:
    stats = Normalization(
        predictor_mean=[0.0, 0.0], predictor_std=[1.0, 1.0], static_mean=[0.0], static_std=[1.0]
    )
    stats = dataclasses.replace(stats, **{field: value})
    cfg = file_cfg(write(make_ds(), tmp_path / "a.nc"), static_vars=["elevation"])
    with pytest.raises(DataError, match=rf"normalization\.{field}: expected \d values"):
        load_data(cfg, stats)
