"""A user's archive end to end: the CF-style NetCDF of tests/cf_data.py through ``train``,
``sample`` (on the archive, and on a GCM's file of coarse predictors alone) and ``create``, each
as a separate process, as a user runs them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from model.data import DataError
from model.sampling import write_samples
from tests.cf_data import CF_TITLE, cf_config, ocean_mask, write_cf_archive
from tests.conftest import CliProcesses

GCM_TITLE = "GCM predictors for 2051, regridded (test archive)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cf-archive")


@pytest.fixture(scope="module")
def archive(folder: Path) -> Path:
    return write_cf_archive(folder / "archive.nc", n_days=96)


@pytest.fixture(scope="module")
def gcm(folder: Path) -> Path:
    """A GCM's file for a future period: the three coarse predictors alone, on a noleap calendar."""
    return write_cf_archive(
        folder / "gcm.nc",
        n_days=40,
        start="2051-01-01",
        calendar="noleap",
        with_target=False,
        title=GCM_TITLE,
    )


@pytest.fixture(scope="module")
def run(folder: Path, archive: Path, search_env: dict[str, str]) -> Path:
    """``cvae-search train`` on the archive: copula output, so that a dry cell is drawn as dry."""
    config = folder / "train.yaml"
    config.write_text(yaml.safe_dump(cf_config(archive, overrides={"model.output": "copula"})))
    done = CliProcesses(search_env, folder).run("train", str(config), "-o", "run")
    assert done.returncode == 0, done.stderr
    return folder / "run"


def _sample(cli: CliProcesses, run: Path, out: str, *args: str) -> xr.Dataset:
    # A relative path, as a user types it: the output names the checkpoint by its absolute path.
    checkpoint = os.path.relpath(run / "checkpoint.pt", cli.logs)
    done = cli.run("sample", checkpoint, "-o", out, "-k", "3", *args)
    assert done.returncode == 0, done.stderr
    return xr.load_dataset(cli.logs / out)


def test_train_reads_the_archive_as_laid_out(run: Path, archive: Path) -> None:
    metrics = yaml.safe_load((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert trained["data"]["coarse_dims"] == ["lat_c", "lon_c"]
    assert len(trained["normalization"]["predictor_mean"]) == 3
    # tas_gcm in K and psl_gcm in Pa are standardised by their own statistics.
    assert trained["normalization"]["predictor_mean"][1] == pytest.approx(283.0, abs=3.0)
    assert trained["normalization"]["predictor_mean"][2] == pytest.approx(101200.0, abs=300.0)


def test_sample_on_the_archive_keeps_its_grid_and_attributes(
    cli: CliProcesses, run: Path, archive: Path
) -> None:
    ds = _sample(cli, run, "augment.nc")
    with xr.open_dataset(archive) as src:
        pr = ds["pr"]
        assert pr.dims == ("time", "sample", "lat", "lon") and pr.shape == (96, 3, 16, 16)
        np.testing.assert_array_equal(ds["time"].values, src["time"].values)
        np.testing.assert_array_equal(ds["lat"].values, src["lat"].values)  # north to south, as stored
        assert ds["lat"].attrs["units"] == "degrees_north" and ds["lon"].attrs["units"] == "degrees_east"
        assert pr.attrs["units"] == "mm/day" and pr.attrs["cell_methods"] == "time: sum"
        invalid = np.isnan(src["pr"].values)
        assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["title"] == CF_TITLE
        history = ds.attrs["history"].splitlines()
        assert history[0] == src.attrs["history"]
    np.testing.assert_array_equal(np.isnan(pr.values), np.broadcast_to(invalid[:, None], pr.shape))
    assert len(history) == 2 and "cvae-search" in history[1] and "sample" in history[1]
    checkpoint = (run / "checkpoint.pt").resolve()
    assert ds.attrs["source_checkpoint"] == str(checkpoint)
    assert ds.attrs["source_checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert str(checkpoint) in history[1] and ds.attrs["source_checkpoint_sha256"] in history[1]


def test_sample_on_coarse_inputs_alone_writes_the_checkpoint_grid(
    cli: CliProcesses, run: Path, archive: Path, gcm: Path
) -> None:
    ds = _sample(cli, run, "future.nc", "--data", str(gcm))
    pr = ds["pr"]
    assert pr.shape == (40, 3, 16, 16)
    assert str(ds["time"].values[0])[:10] == "2051-01-01" and str(ds["time"].values[-1])[:10] == "2051-02-09"
    with xr.open_dataset(archive) as src:
        np.testing.assert_array_equal(ds["lat"].values, src["lat"].values)
        np.testing.assert_array_equal(ds["lon"].values, src["lon"].values)
    assert ds["lat"].attrs["units"] == "degrees_north" and pr.attrs["units"] == "mm/day"
    ocean = ocean_mask((16, 16))
    np.testing.assert_array_equal(np.isnan(pr.values), np.broadcast_to(ocean, pr.shape))
    assert (pr.values[:, :, ~ocean] >= 0).all()
    assert ds.attrs["title"] == GCM_TITLE and ds.attrs["Conventions"] == "CF-1.8"
    assert ds.attrs["source_data"] == str(gcm)
    assert ds.attrs["history"].splitlines()[-1].endswith(f"on {gcm}")


def _dry_rounding_above_zero(checkpoint: Path, out: Path) -> Path:
    """``checkpoint`` with a target mean at which float32 ``x * std + mean`` leaves the dry value
    above 0 (as the demo's fitted statistics did), its model's dry and wet values to match."""
    payload = torch.load(checkpoint, weights_only=True)
    stats = payload["config"]["normalization"]
    std = stats["target_std"]
    for mean in stats["target_mean"] + np.linspace(0.0, 0.01, 1001):
        if (torch.tensor([-mean / std], dtype=torch.float32) * std + mean).item() > 0:
            break
    else:
        pytest.fail("no target mean found at which the dry value rounds above 0")
    stats["target_mean"] = float(mean)
    payload["model_args"]["dry_value"] = float(-mean / std)
    payload["model_args"]["wet_value"] = float(
        (np.log1p(payload["config"]["eval"]["wet_threshold"]) - mean) / std
    )
    torch.save(payload, out)
    return out


def test_dry_cells_are_exactly_zero(run: Path, gcm: Path, tmp_path: Path) -> None:
    checkpoint = _dry_rounding_above_zero(run / "checkpoint.pt", tmp_path / "rounding.pt")
    out = write_samples(checkpoint, tmp_path / "dry.nc", n_samples=3, data_path=str(gcm), device="cpu")
    values = xr.load_dataset(out)["pr"].values
    valid = values[np.isfinite(values)]
    # The copula draws a wet cell at or above the wet threshold (0.1 mm/day); anything below is dry.
    dry = valid[valid < 0.05]
    assert 0 < dry.size < valid.size
    np.testing.assert_array_equal(dry, 0.0)


def test_a_checkpoint_without_the_fine_grid_still_samples_a_file_with_the_target(
    run: Path, archive: Path, gcm: Path, tmp_path: Path
) -> None:
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    del payload["grid"]  # as written before checkpoints carried it
    old = tmp_path / "old.pt"
    torch.save(payload, old)

    out = write_samples(old, tmp_path / "a.nc", n_samples=2, device="cpu", data_path=str(archive))
    with xr.open_dataset(out) as ds, xr.open_dataset(archive) as src:
        assert ds["pr"].shape == (96, 2, 16, 16)
        np.testing.assert_array_equal(ds["lat"].values, src["lat"].values)
    with pytest.raises(
        DataError, match=r"gcm\.nc: variable 'pr' \(data\.target_var\) not found.*no fine grid"
    ):
        write_samples(old, tmp_path / "b.nc", n_samples=2, device="cpu", data_path=str(gcm))
    assert not (tmp_path / "b.nc").exists()


def test_create_checks_the_archive_and_creates_the_study(cli: CliProcesses, archive: Path) -> None:
    (cli.logs / "base.yaml").write_text(yaml.safe_dump(cf_config(archive)))
    study = {
        "name": "cf-study",
        "base": "base.yaml",
        "space": {"loss.beta_kl": {"type": "float", "low": 0.001, "high": 1.0, "log": True}},
        "n_trials": 2,
        "collapse": None,
    }
    (cli.logs / "study.yaml").write_text(yaml.safe_dump(study))

    done = cli.run("create", "study.yaml", "--storage", "sqlite:///study.db")

    assert done.returncode == 0, done.stderr
    assert (
        f"data of base: {archive}: 96 days (67 train, 15 val, 14 test), fine 16x16, coarse 4x4" in done.stdout
    )
    assert "study cf-study ready" in done.stdout
    assert (cli.logs / "study.db").exists()
