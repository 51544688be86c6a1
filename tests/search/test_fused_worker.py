"""``worker --fuse K`` as a real process on SQLite: every member its own trial, as a plain worker
would record it."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from model.config import config_from_dict
from model.trainer import EpochReport
from search.definition import Param
from search.fused_worker import fitting_group, per_trial_peaks, train_group
from search.objective import TrialObjective, TrialOutcome
from tests.conftest import CliProcesses, tiny_config_dict
from tests.search.constructed_studies import add_trial, make_definition, new_study, sqlite_storage

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning")

SPACE = {
    "loss.beta_kl": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
    "loss.free_bits": {"type": "float", "low": 0.0, "high": 1.0},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
PARAMS = [
    {"loss.beta_kl": 0.05, "loss.free_bits": 0.5, "train.lr": 1e-3},
    {"loss.beta_kl": 0.5, "loss.free_bits": 0.0, "train.lr": 3e-3},
    {"loss.beta_kl": 0.01, "loss.free_bits": 0.2, "train.lr": 5e-4},
]


def trials_of(url: str, name: str) -> list[FrozenTrial]:
    storage = RDBStorage(url)
    return sorted(storage.get_all_trials(storage.get_study_id_from_name(name)), key=lambda t: t.number)


def run_study(cli: CliProcesses, study_file: Path, name: str, *worker_args: str) -> list[FrozenTrial]:
    url = f"sqlite:///{cli.logs / name}.db"
    done = cli.run("create", str(study_file), "--storage", url)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name=name, storage=url)
    for params in PARAMS:
        study.enqueue_trial(params)
    artifacts = str(cli.logs / f"{name}-artifacts")
    done = cli.run("worker", name, "--storage", url, "--artifact-dir", artifacts, *worker_args, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return trials_of(url, name)


def test_fused_trials_record_what_a_plain_worker_records(
    cli: CliProcesses, tiny_study: Callable[..., Path]
) -> None:
    fused = run_study(cli, tiny_study("fused", n_trials=3, space=SPACE), "fused", "--fuse", "2")
    plain = run_study(cli, tiny_study("plain", n_trials=3, space=SPACE), "plain")
    assert [t.state for t in fused] == [TrialState.COMPLETE] * 3
    assert [t.params for t in fused] == [t.params for t in plain] == PARAMS
    # Asked two at a time: a group of two, then the last trial alone.
    assert [t.user_attrs["runtime"]["fused_group"] for t in fused] == [2, 2, 1]
    for f, p in zip(fused, plain, strict=True):
        torch.testing.assert_close(torch.tensor(f.values), torch.tensor(p.values), rtol=1e-4, atol=1e-6)
        assert f.user_attrs.keys() == p.user_attrs.keys()
        assert f.user_attrs["timings"]["epochs_run"] == p.user_attrs["timings"]["epochs_run"] == 2
        losses = [[h["total"], h["kl"], h["recon"]] for h in f.user_attrs["history"]]
        expected = [[h["total"], h["kl"], h["recon"]] for h in p.user_attrs["history"]]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-4, atol=1e-6)
        # Its own constraints and its own files.
        assert {k for k in f.system_attrs if k.startswith("constraints")} == {
            k for k in p.system_attrs if k.startswith("constraints")
        }
        artifacts = [k for k in f.system_attrs if k.startswith("artifacts:")]
        assert len(artifacts) == len([k for k in p.system_attrs if k.startswith("artifacts:")]) > 0


def test_sigterm_fails_and_requeues_every_member(cli: CliProcesses, tiny_study: Callable[..., Path]) -> None:
    name = "fused-sigterm"
    url = f"sqlite:///{cli.logs / name}.db"
    done = cli.run("create", str(tiny_study(name, n_trials=4, epochs=20_000)), "--storage", url)
    assert done.returncode == 0, done.stderr
    worker = cli.start("worker", name, "--storage", url, "--fuse", "2", name="worker")
    deadline = time.monotonic() + 120
    while sum(t.state == TrialState.RUNNING for t in trials_of(url, name)) < 2:
        assert time.monotonic() < deadline, cli.output(worker)
        time.sleep(0.5)
    time.sleep(3)  # into training
    worker.send_signal(signal.SIGTERM)
    assert cli.wait(worker, 60) == 0, cli.output(worker)

    trials = trials_of(url, name)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 2
    for t in stopped:
        assert "SIGTERM" in t.user_attrs["fail_reason"]
        (retry,) = [r for r in trials if r.system_attrs.get("failed_trial") == t.number]
        assert retry.state == TrialState.WAITING and retry.params == t.params


class OutOfMemoryOnce:
    """An epoch callback that runs out of memory the first time it is called, as a GPU would
    for a group too large for it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, report: EpochReport) -> str | None:
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        return None


def test_a_group_out_of_memory_is_split_not_failed(cache: Path, tmp_path: Path) -> None:
    base = config_from_dict(tiny_config_dict(1), "tiny")
    definition = make_definition(base=base, space={"loss.beta_kl": Param("float", 0.001, 1.0, log=True)})
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    oom = OutOfMemoryOnce()
    objective = TrialObjective(definition, artifact_dir=tmp_path / "artifacts", extra_callbacks=(oom,))
    jobs = [objective.prepare(study.ask()) for _ in range(3)]
    outcomes = train_group(objective, jobs)
    assert all(isinstance(o, TrialOutcome) for o in outcomes), outcomes
    # The group of three ran out of memory; its halves, two and one, trained through.
    assert [o.user_attrs["runtime"]["fused_group"] for o in outcomes] == [2, 2, 1]  # type: ignore[union-attr]
    assert oom.calls == 1 + 2 + 1


def test_a_round_asks_no_more_than_the_free_gpu_memory_holds(tmp_path: Path) -> None:
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    gib = 2**30
    add_trial(study, definition, [0.5, 0.2], user_attrs={"runtime": {"peak_gpu_memory_bytes": 2 * gib}})
    # A fused trial records its group's peak: 6 GiB for 3 members is 2 GiB each.
    add_trial(
        study,
        definition,
        [0.5, 0.2],
        user_attrs={"runtime": {"peak_gpu_memory_bytes": 6 * gib, "fused_group": 3}},
    )
    add_trial(study, definition, [0.5, 0.2], user_attrs={"runtime": {"peak_gpu_memory_bytes": 1 * gib}})
    peaks = per_trial_peaks(study)
    assert peaks == [2 * gib, 2 * gib, 1 * gib]
    assert fitting_group(8, peaks, 10 * gib) == 4  # 10 / (1.25 * 2)
    assert fitting_group(8, peaks, 1 * gib) == 1  # never none
    assert fitting_group(2, peaks, 80 * gib) == 2  # never more than asked
    assert fitting_group(8, peaks, None) == fitting_group(8, [], 10 * gib) == 8  # unknown: as asked
