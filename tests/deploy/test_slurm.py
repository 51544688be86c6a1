"""deploy/slurm/worker.sbatch, run as SLURM runs a batch script: bash, with the job's environment.

The environment stands in for what SLURM sets (the task's ``CUDA_VISIBLE_DEVICES``, the array
IDs); ``cvae-search`` is the project's console script, here a two-line equivalent on PATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.deploy.services import REPO, write_tiny_study

SCRIPT = REPO / "deploy" / "slurm" / "worker.sbatch"


def _job_env(tmp_path: Path, **values: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    console = bin_dir / "cvae-search"
    console.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m search.cli "$@"\n')
    console.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OPTUNA_STORAGE")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        CVAE_SEARCH_CACHE=str(tmp_path / "cache"),
        SLURM_JOB_ID="4242",
        SLURM_ARRAY_JOB_ID="4242",
        SLURM_ARRAY_TASK_ID="3",
    )
    env.update(values)
    return env


def _run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=400
    )


def test_directives_precede_the_first_command() -> None:
    lines = SCRIPT.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    assert directives and max(directives) < first_command, "SLURM ignores #SBATCH after the first command"
    assert any("--gres=gpu:" in lines[i] for i in directives)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("CUDA_VISIBLE_DEVICES", "SLURM gave this task no GPU"),
        ("OPTUNA_STORAGE", "export OPTUNA_STORAGE="),
    ],
)
def test_refuses_without_gpus_or_storage(tmp_path: Path, missing: str, message: str) -> None:
    present = {"CUDA_VISIBLE_DEVICES": "0", "OPTUNA_STORAGE": "postgresql+psycopg2://u@h/db"}
    del present[missing]
    done = _run(_job_env(tmp_path, **present), tmp_path, "some-study", "studies/some.yaml")
    assert done.returncode != 0
    assert message in done.stderr


@pytest.mark.postgres
def test_array_task_runs_the_study(pg_url: str, tmp_path: Path) -> None:
    name, n_trials = "slurm-tiny", 2
    study_file = write_tiny_study(tmp_path, name, n_trials)
    artifacts = tmp_path / "artifacts"
    env = _job_env(
        tmp_path,
        OPTUNA_STORAGE=pg_url,
        CUDA_VISIBLE_DEVICES="0",
        # Word-split before cvae-search, as an Apptainer launcher is.
        CVAE_SEARCH_LAUNCHER=f"env CVAE_SEARCH_ARTIFACTS={artifacts}",
    )
    created = subprocess.run(
        [sys.executable, "-m", "search.cli", "create", str(study_file)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr

    done = _run(env, tmp_path, name, f"studies/{name}.yaml")

    assert done.returncode == 0, done.stderr
    assert "task 3 of job 4242" in done.stderr and "GPUs 0" in done.stderr
    assert "1 worker process(es) on 0" in done.stderr
    study = optuna.load_study(study_name=name, storage=pg_url)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * n_trials
    assert len([p for p in artifacts.rglob("*") if p.is_file()]) >= n_trials
