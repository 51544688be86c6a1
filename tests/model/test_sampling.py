from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from model.config import Config, config_from_dict
from model.data import load_data
from model.sampling import write_samples
from model.synthetic import synthetic_path
from model.trainer import train
from tests.conftest import tiny_config_dict


def tiny(with_mask: bool = False) -> Config:
    """The tiny training config (16x16 synthetic grid, 96 days), without the sample figure."""
    raw = tiny_config_dict(2, {"eval.plot_days": 0, "data.synthetic.with_mask": with_mask})
    return config_from_dict(raw, "tiny")


def _checkpoint(tmp_path_factory: pytest.TempPathFactory, with_mask: bool) -> Path:
    cfg = tiny(with_mask)
    out = tmp_path_factory.mktemp("masked-run" if with_mask else "run")
    result = train(cfg, out_dir=out)
    assert result.checkpoint is not None
    return result.checkpoint


@pytest.fixture(scope="module")
def checkpoint(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory, with_mask=False)


@pytest.fixture(scope="module")
def masked_checkpoint(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory, with_mask=True)


def _source(with_mask: bool = False) -> xr.Dataset:
    return xr.open_dataset(synthetic_path(tiny(with_mask).data))


def test_writes_k_samples_per_day_on_the_fine_grid(checkpoint: Path, tmp_path: Path) -> None:
    out = write_samples(checkpoint, tmp_path / "samples.nc", n_samples=3, device="cpu")
    assert out == tmp_path / "samples.nc"
    with xr.open_dataset(out) as ds, _source() as src:
        pr = ds["pr"]
        assert pr.dims == ("time", "sample", "lat", "lon")
        assert pr.shape == (96, 3, 16, 16)
        np.testing.assert_array_equal(ds["time"].values, src["time"].values)
        np.testing.assert_array_equal(ds["lat"].values, src["lat"].values)
        np.testing.assert_array_equal(ds["lon"].values, src["lon"].values)
        np.testing.assert_array_equal(ds["sample"].values, [0, 1, 2])
        assert {k: pr.attrs[k] for k in src["pr"].attrs} == src["pr"].attrs
        assert pr.attrs["units"] == "mm/day"
        values = pr.values
    assert np.isfinite(values).all()
    assert (values >= 0).all()
    assert values.std(axis=1).mean() > 0, "the K samples of a day differ"


def test_masked_cells_are_nan(masked_checkpoint: Path, tmp_path: Path) -> None:
    out = write_samples(masked_checkpoint, tmp_path / "masked.nc", n_samples=2, device="cpu")
    with xr.open_dataset(out) as ds, _source(with_mask=True) as src:
        values = ds["pr"].values
        invalid = np.isnan(src["pr"].values)
    assert invalid.any() and not invalid.all()
    np.testing.assert_array_equal(np.isnan(values), np.broadcast_to(invalid[:, None], values.shape))
    assert (values[~np.isnan(values)] >= 0).all()


def test_split_selects_its_days(checkpoint: Path, tmp_path: Path) -> None:
    out = write_samples(checkpoint, tmp_path / "val.nc", n_samples=2, split="val", device="cpu")
    expected = load_data(tiny().data).val.times
    with xr.open_dataset(out) as ds:
        np.testing.assert_array_equal(ds["time"].values, expected)
        assert ds["pr"].shape == (len(expected), 2, 16, 16)
    assert 0 < len(expected) < 96


def test_same_seed_same_samples_another_seed_others(checkpoint: Path, tmp_path: Path) -> None:
    def draw(name: str, seed: int) -> np.ndarray:
        path = write_samples(checkpoint, tmp_path / name, n_samples=2, split="test", seed=seed, device="cpu")
        with xr.open_dataset(path) as ds:
            return ds["pr"].values

    first, again, other = draw("a.nc", 0), draw("b.nc", 0), draw("c.nc", 1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_other_data_file_is_read_with_the_checkpoint_normalisation(checkpoint: Path, tmp_path: Path) -> None:
    configured = write_samples(checkpoint, tmp_path / "a.nc", n_samples=2, split="test", device="cpu")
    copy = tmp_path / "copy.nc"
    shutil.copyfile(synthetic_path(tiny().data), copy)
    named = write_samples(
        checkpoint, tmp_path / "b.nc", n_samples=2, split="test", data_path=str(copy), device="cpu"
    )
    with xr.open_dataset(configured) as a, xr.open_dataset(named) as b:
        assert b.attrs["source_data"] == str(copy) != a.attrs["source_data"]
        np.testing.assert_array_equal(a["pr"].values, b["pr"].values)


def test_rejects_no_samples(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_samples: expected a positive integer, got 0"):
        write_samples(checkpoint, tmp_path / "none.nc", n_samples=0, device="cpu")
