"""``worker --per-gpu auto``: trials record their peak GPU memory, and the worker packs GPUs by
the largest one, only under CUDA MPS. No GPU needed: nvidia-smi and the MPS pipe are stood in for."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import search.objective
from model.trainer import TrainResult
from search.cli import main
from search.definition import StudyDefinition, load_definition
from search.objective import TrialObjective
from search.worker import (
    AUTO_MAX_PER_GPU,
    PEAK_MARGIN,
    ProcessPlan,
    choose_per_gpu,
    measured_peaks,
    mps_running,
    parse_per_gpu,
    plan_processes,
)
from tests.conftest import CliProcesses
from tests.search.constructed_studies import distributions, make_definition, new_study, sqlite_storage

GIB = 2**30
H100 = 80 * GIB


# --- choosing K ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mps", [False, True])
def test_no_measured_peak_runs_one_process(mps: bool) -> None:
    choice = choose_per_gpu([], H100, mps=mps)
    assert choice.k == 1 and "no trial has measured" in choice.reason


def test_without_mps_one_process_however_small_the_trials() -> None:
    choice = choose_per_gpu([GIB], H100, mps=False)
    assert choice.k == 1 and "MPS is not running" in choice.reason


@pytest.mark.parametrize("cap", [1, 2, 4, 8])
def test_under_mps_small_trials_fill_the_cap(cap: int) -> None:
    assert choose_per_gpu([3 * GIB], H100, mps=True, cap=cap).k == cap


def test_the_default_cap() -> None:
    assert choose_per_gpu([GIB], H100, mps=True).k == AUTO_MAX_PER_GPU == 4


@pytest.mark.parametrize(
    ("peak", "k"),
    [
        (20 * GIB, 3),  # 80 / 25
        (30 * GIB, 2),  # 80 / 37.5
        (32 * GIB, 2),  # 80 / 40: exactly two
        (32 * GIB + 1, 1),
        (64 * GIB, 1),  # exactly one
        (79 * GIB, 1),  # fits only without the margin
        (200 * GIB, 1),  # larger than the GPU: still one, never zero
    ],
)
def test_under_mps_large_trials_get_what_fits_with_the_margin(peak: int, k: int) -> None:
    assert choose_per_gpu([peak], H100, mps=True, cap=8).k == k


def test_the_largest_peak_decides() -> None:
    assert choose_per_gpu([GIB, 30 * GIB, 2 * GIB], H100, mps=True).k == 2


def test_every_choice_is_at_least_one_at_most_the_cap_and_its_share_holds_the_peak() -> None:
    for mps in (False, True):
        for cap in (1, 2, 3, 4, 8):
            for peak_mib in range(1, 120 * 1024, 97):
                peak = peak_mib * 2**20
                k = choose_per_gpu([peak], H100, mps=mps, cap=cap).k
                assert 1 <= k <= cap
                assert k == 1 or mps
                if k > 1:  # each process is capped at 0.95/K of the GPU (worker._apply_process_limits)
                    assert 0.95 * H100 / k > peak
                    assert k == min(cap, math.floor(H100 / (PEAK_MARGIN * peak)))


# --- the MPS daemon ------------------------------------------------------------------------------


def test_mps_is_seen_by_its_control_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_running()
    (tmp_path / "control").write_text("")  # a plain file is not the daemon's pipe
    assert not mps_running()
    (tmp_path / "control").unlink()
    os.mkfifo(tmp_path / "control")
    assert mps_running()


def test_mps_default_pipe_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr("search.worker.MPS_PIPE_DIRECTORY", str(tmp_path))
    os.mkfifo(tmp_path / "control")
    assert mps_running()


# --- the option ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("1", 1), ("3", 3)])
def test_per_gpu_accepts_auto_or_a_count(value: str, parsed: object) -> None:
    assert parse_per_gpu(value) == parsed


@pytest.mark.parametrize("value", ["0", "-1", "two", "2.5", "", "Auto"])
def test_per_gpu_refuses_anything_else_naming_the_option(value: str) -> None:
    with pytest.raises(ValueError, match=r"^--per-gpu .*expected auto or a whole number >= 1, got"):
        parse_per_gpu(value)


@pytest.mark.parametrize(("args", "env"), [(["--per-gpu", "two"], {}), ([], {"CVAE_SEARCH_PER_GPU": "lots"})])
def test_junk_per_gpu_is_a_one_line_usage_error(
    cli: CliProcesses, args: list[str], env: dict[str, str]
) -> None:
    cli.env = {**cli.env, **env}
    run = cli.run("worker", "some-study", "--gpus", "none", *args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(
        "cvae-search worker: error: --per-gpu (or $CVAE_SEARCH_PER_GPU): expected auto"
    )


# --- planning processes ---------------------------------------------------------------------------


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Stand in for the GPUs nvidia-smi reports (total MiB by index) and for the MPS daemon."""
    bin_dir, pipes = tmp_path / "bin", tmp_path / "mps"
    bin_dir.mkdir()
    pipes.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipes))
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def setup(mib: list[int] | None, *, mps: bool) -> None:
        if mib is not None:
            smi = bin_dir / "nvidia-smi"
            rows = "\\n".join(f"{i}, {m}" for i, m in enumerate(mib))
            smi.write_text(f'#!/bin/sh\nprintf "{rows}\\n"\n')
            smi.chmod(0o755)
        if mps:
            os.mkfifo(pipes / "control")

    return setup


def per_gpu(plans: list[ProcessPlan]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.env["CUDA_VISIBLE_DEVICES"]] = counts.get(p.env["CUDA_VISIBLE_DEVICES"], 0) + 1
    return counts


def test_auto_packs_each_gpu_and_caps_each_process_share(
    machine: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    machine([81559, 81559], mps=True)
    with caplog.at_level(logging.INFO, logger="search.worker"):
        plans = plan_processes("0,1", "auto", 1, peaks=lambda: [20 * GIB, 3 * GIB])
    assert per_gpu(plans) == {"0": 3, "1": 3}
    assert [p.index for p in plans] == list(range(6))
    assert {p.env["CVAE_SEARCH_GPU_FRACTION"] for p in plans} == {"0.3333"}
    lines = [r.getMessage() for r in caplog.records if "--per-gpu auto" in r.getMessage()]
    assert len(lines) == 1, lines  # one line for GPUs that got the same choice
    assert "K=3 on GPU 0,1" in lines[0]
    assert "peak 20.00 GiB over 2 trials" in lines[0] and "total 79.6 GiB" in lines[0]
    assert "MPS yes" in lines[0]


def test_auto_without_mps_or_without_a_peak_runs_one_per_gpu(
    machine: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    machine([81559], mps=False)
    with caplog.at_level(logging.INFO, logger="search.worker"):
        assert per_gpu(plan_processes("0", "auto", 1, peaks=lambda: [GIB])) == {"0": 1}
    assert "K=1 on GPU 0: CUDA MPS is not running" in caplog.text and "MPS no" in caplog.text
    with caplog.at_level(logging.INFO, logger="search.worker"):
        assert per_gpu(plan_processes("0", "auto", 1, peaks=list)) == {"0": 1}
    assert "no peak measured" in caplog.text


def test_auto_judges_mixed_gpus_by_the_smallest_unless_cuda_numbers_them_as_nvidia_smi(
    machine: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine([81559, 40960], mps=True)
    peaks = [15 * GIB]  # 18.75 GiB with the margin: 4 fit in 80 GiB, 2 in 40 GiB
    assert per_gpu(plan_processes("0,1", "auto", 1, peaks=lambda: peaks)) == {"0": 2, "1": 2}
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    plans = plan_processes("0,1", "auto", 1, peaks=lambda: peaks)
    assert per_gpu(plans) == {"0": 4, "1": 2}
    assert [p.index for p in plans] == list(range(6))
    assert [p.env["CVAE_SEARCH_GPU_FRACTION"] for p in plans] == ["0.2500"] * 4 + ["0.5000"] * 2


def test_auto_without_nvidia_smi_runs_one_per_gpu(
    machine: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    machine(None, mps=True)
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="search.worker"):
        assert per_gpu(plan_processes("0", "auto", 1, peaks=lambda: [GIB])) == {"0": 1}
    assert "nvidia-smi did not report its memory" in caplog.text


def test_auto_on_the_cpu_is_the_cpu_plan_and_reads_no_peaks() -> None:
    def no_peaks() -> list[int]:
        raise AssertionError("the CPU plan must not read the study")

    assert plan_processes("none", "auto", 2, cpu_count=4, peaks=no_peaks) == plan_processes(
        "none", 1, 2, cpu_count=4
    )


def test_a_count_is_kept_as_given() -> None:
    plans = plan_processes("0,1", 2, 1)
    assert per_gpu(plans) == {"0": 2, "1": 2} and [p.index for p in plans] == [0, 1, 2, 3]


# --- peaks recorded by trials and read back from the study -------------------------------------------


def gpu_trial(
    definition: StudyDefinition, *, state: TrialState = TrialState.COMPLETE, peak: int | None
) -> FrozenTrial:
    runtime: dict[str, Any] = {"device": "cuda" if peak else "cpu"}
    if peak is not None:
        runtime["peak_gpu_memory_bytes"] = peak
    return optuna.create_trial(
        state=state,
        values=[0.5, 0.5] if state == TrialState.COMPLETE else None,
        params={"loss.beta_kl": 0.1, "model.latent_dim": 8},
        distributions=distributions(definition),
        user_attrs={"runtime": runtime},
    )


def test_peaks_are_read_from_complete_trials_only(tmp_path: Path) -> None:
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    study.add_trial(gpu_trial(definition, peak=3 * GIB))
    study.add_trial(gpu_trial(definition, peak=5 * GIB))
    study.add_trial(gpu_trial(definition, peak=None))  # trained on a CPU
    study.add_trial(gpu_trial(definition, state=TrialState.FAIL, peak=70 * GIB))  # e.g. out of memory
    assert sorted(measured_peaks(study)) == [3 * GIB, 5 * GIB]


@pytest.fixture(scope="module")
def tiny_definition(tiny_study: Callable[..., Path]) -> StudyDefinition:
    return load_definition(tiny_study("peak-memory", n_trials=2, epochs=1))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # ask/tell, as a worker does
def test_a_cpu_trial_records_no_peak_and_a_gpu_trial_its_peak(
    tiny_definition: StudyDefinition, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = new_study(tiny_definition, sqlite_storage(tmp_path)[1])
    objective = TrialObjective(tiny_definition, artifact_dir=tmp_path / "artifacts")
    study.tell(cpu := study.ask(), objective(cpu))
    assert "peak_gpu_memory_bytes" not in study.trials[cpu.number].user_attrs["runtime"]
    assert measured_peaks(study) == []

    real_train = search.objective.train

    def on_a_gpu(*args: Any, **kwargs: Any) -> TrainResult:
        return replace(real_train(*args, **kwargs), device="cuda", peak_gpu_memory_bytes=3 * GIB)

    monkeypatch.setattr(search.objective, "train", on_a_gpu)
    study.tell(gpu := study.ask(), objective(gpu))
    assert study.trials[gpu.number].user_attrs["runtime"]["peak_gpu_memory_bytes"] == 3 * GIB
    assert measured_peaks(study) == [3 * GIB]


def test_the_cli_packs_by_the_studys_peaks(
    tmp_path: Path, machine: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = make_definition(name="packed")
    url, storage = sqlite_storage(tmp_path)
    study = new_study(definition, storage)
    study.add_trial(gpu_trial(definition, peak=30 * GIB))
    machine([81559, 81559], mps=True)
    started: list[list[ProcessPlan]] = []
    monkeypatch.setattr("search.worker.run_workers", lambda plans, *a, **k: started.append(plans) or 0)

    assert main(["worker", "packed", "--storage", url, "--gpus", "0,1", "--per-gpu", "auto"]) == 0
    assert per_gpu(started[-1]) == {"0": 2, "1": 2}
    assert main(["worker", "packed", "--storage", url, "--gpus", "0,1", "--per-gpu", "3"]) == 0
    assert per_gpu(started[-1]) == {"0": 3, "1": 3}
    # On the CPU, auto is the CPU plan, and the study is not opened (opening would write
    # Optuna's schema into the empty file).
    empty = tmp_path / "empty.db"
    empty.touch()
    argv = ["worker", "packed", "--storage", f"sqlite:///{empty}", "--gpus", "none", "--per-gpu", "auto"]
    assert main([*argv, "--processes", "2"]) == 0  # one would run in this process
    assert per_gpu(started[-1]) == {"": 2}
    assert empty.stat().st_size == 0
