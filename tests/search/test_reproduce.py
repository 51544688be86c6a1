"""An export reproduces its trial as the user runs it: a worker trains with one CPU thread,
``cvae-search train`` of the export runs with the machine's default (all cores)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from model.config import load_config
from tests.conftest import CliProcesses

STUDY = "reproduce"


def test_train_of_an_export_reproduces_a_one_thread_worker_trial_exactly(
    cli: CliProcesses, tiny_study: Callable[..., Path], tmp_path: Path
) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU core: one thread and all cores are the same run here")
    study_file = tiny_study(STUDY, n_trials=1, epochs=2)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli.run("create", str(study_file), "--storage", url).returncode == 0
    # The worker trains as the demo's do: CVAE_SEARCH_THREADS=1 (set in the cli fixture's env).
    worker = cli.run("worker", STUDY, "--storage", url, "--gpus", "none", "--artifact-dir", "a", timeout=300)
    assert worker.returncode == 0, worker.stderr
    trial = optuna.load_study(study_name=STUDY, storage=url).trials[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["runtime"]["threads"] == 1

    export = cli.run("export", STUDY, "--storage", url, "--trial", "0", "-o", "best.yaml")
    assert export.returncode == 0, export.stderr
    best = tmp_path / "best.yaml"
    assert load_config(best).train.threads == 1
    reproduction = yaml.safe_load(best.read_text())["provenance"]["reproduction"]
    assert reproduction["threads"] == 1 and reproduction["device"] == "cpu"
    assert reproduction["precision"] == "fp32" and reproduction["versions"]["torch"]

    # As the user runs it: no thread limit in the environment, so torch would take every core.
    env = {k: v for k, v in cli.env.items() if k not in ("CVAE_SEARCH_THREADS", "OMP_NUM_THREADS")}
    user = CliProcesses(env, tmp_path)
    run = user.run("train", str(best), "-o", "run", timeout=300)
    assert run.returncode == 0, run.stderr
    names = ["diversity", "ks_stat"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert [metrics[n] for n in names] == trial.values, "the objective values, bit for bit"
    assert f"reproduced trial {trial.number} exactly" in run.stdout
    assert "train.threads=1, as trial 0 trained" in run.stderr

    # The same export with every core: the values move, and the run says why.
    cores = user.run("train", str(best), "-o", "cores", "--set", "train.threads=null", timeout=300)
    assert cores.returncode == 0, cores.stderr
    metrics = json.loads((tmp_path / "cores" / "metrics.json").read_text())["metrics"]
    assert [metrics[n] for n in names] != trial.values
    assert f"differs from trial {trial.number}" in cores.stdout
    assert re.search(r"threads \d+ \(the trial's: 1\)", cores.stdout), cores.stdout
