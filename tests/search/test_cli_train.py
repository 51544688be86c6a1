"""``cvae-search train`` and ``cvae-search sample`` as the user runs them: separate processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xarray as xr
import yaml

from model.config import load_config
from model.metrics import METRICS
from tests.conftest import CliProcesses, tiny_config_dict


def _error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def test_train_then_sample(cli: CliProcesses, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(epochs=3)))

    run = cli.run("train", str(config), "-o", "run", "--set", "train.epochs=1")
    assert run.returncode == 0, run.stderr
    table = dict(line.split() for line in run.stdout.splitlines() if len(line.split()) == 2)
    assert set(METRICS) <= set(table), run.stdout
    assert "1 epochs on cpu (fp32)" in run.stdout
    progress = [line for line in run.stderr.splitlines() if line.startswith("epoch ")]
    assert len(progress) == 1 and progress[0].startswith("epoch   1/1  total "), run.stderr
    assert "samples/s" in progress[0]

    out = tmp_path / "run"
    assert {"checkpoint.pt", "metrics.json", "samples.png", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert load_config(out / "config.yaml").train.epochs == 1, "--set reaches the trained config"
    written = json.loads((out / "metrics.json").read_text())
    assert written["epochs_run"] == 1
    printed = {name: float(table[name]) for name in METRICS}
    assert printed == pytest.approx(written["metrics"], rel=1e-5, nan_ok=True), "the table is the run's"

    sample = cli.run("sample", str(out / "checkpoint.pt"), "-o", "out.nc", "-k", "3")
    assert sample.returncode == 0, sample.stderr
    assert "wrote out.nc" in sample.stdout
    with xr.open_dataset(tmp_path / "out.nc") as ds:
        assert ds["pr"].dims == ("time", "sample", "lat", "lon")
        assert ds.sizes["sample"] == 3 and ds.sizes["time"] == 96


def test_bad_config_file_is_a_usage_error_naming_file_and_field(cli: CliProcesses, tmp_path: Path) -> None:
    raw = tiny_config_dict(epochs=1)
    raw["model"]["latent_dim"] = "eight"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))

    run = cli.run("train", str(config), "-o", "run")
    assert run.returncode == 2
    line = _error_line(run.stderr)
    assert line.startswith("cvae-search train: error: ")
    assert f"{config}: model.latent_dim: expected an integer, got 'eight'" in line
    assert not (tmp_path / "run").exists()


def test_unknown_set_field_is_a_usage_error(cli: CliProcesses, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(epochs=1)))

    run = cli.run("train", str(config), "-o", "run", "--set", "loss.beta=0.1")
    assert run.returncode == 2
    line = _error_line(run.stderr)
    assert line.startswith("cvae-search train: error: ")
    assert "--set: loss.beta: unknown field" in line
    assert not (tmp_path / "run").exists()
