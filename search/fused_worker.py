"""Fused rounds: ``worker --fuse K`` asks up to K trials and trains those of one architecture as
one stacked model (:func:`model.fused.train_fused`).

Grouping policy: the sampler is asked for up to K trials one by one, as K separate workers would
ask it (under TPE with the constant liar each sees the others as running), so it sees every
trial as its own and nothing in the search is fixed for the sake of fusing. The asked trials are
grouped by :func:`model.fused.architecture_key`, in the order they were asked; each group trains
fused, one group after the other, and where the space searches the architecture the groups are
as full as the sampler happens to make them (K of one architecture when it searches none).

Each member stays its own Optuna trial: its own parameters, records, artifacts and constraints,
its own collapse or halving stop (it is evaluated and told when its group ends), its own NaN
failure (failed without retry, the others go on), and its own heartbeat thread, which stops
once the member is told. The heartbeats all beat from this one process, so they say that the
process lives, not that a given member trains: a member waiting for an earlier group beats
while it waits, and the process's death makes every member stale at once, failed and
re-enqueued by the other workers as for one trial.
SIGTERM fails every member not yet told and re-enqueues each.

Memory: on a GPU a round asks no more trials than the free memory holds at the largest
per-trial peak the study has measured (a fused trial's recorded peak is its group's, shared out
by ``runtime.fused_group``), with :data:`search.worker.PEAK_MARGIN` to spare; a solo peak counts
the device-resident data once per member, so the bound errs towards smaller groups. A group that
still runs out of memory is split in two and each half trained again; one trial out of memory
fails as it would alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from model.data import Dataset
from model.fused import FUSED_GROUP, architecture_key, train_fused
from model.trainer import TrainingDiverged, TrainResult
from search.objective import (
    PEAK_GPU_MEMORY_ATTR,
    RUNTIME_ATTR,
    TrainedTrial,
    TrialFailed,
    TrialJob,
    TrialObjective,
    TrialOutcome,
)
from search.storage import StorageSettings, is_budget_exhausted
from search.worker import (
    PEAK_MARGIN,
    WorkerInterrupted,
    WorkerSummary,
    _fail,
    _heartbeat,
    _run_trial,
    _Signals,
)

__all__ = ["fitting_group", "group_jobs", "per_trial_peaks", "run_fused_round", "train_group"]

_log = logging.getLogger(__name__)


def group_jobs(jobs: Sequence[TrialJob]) -> list[list[TrialJob]]:
    """``jobs`` grouped by :func:`model.fused.architecture_key`, groups and members in order."""
    groups: dict[tuple[tuple[str, str], ...], list[TrialJob]] = {}
    for job in jobs:
        groups.setdefault(architecture_key(job.cfg), []).append(job)
    return list(groups.values())


def per_trial_peaks(study: optuna.Study) -> list[float]:
    """Peak GPU memory per trial of each complete trial that recorded one, a fused trial's
    group peak shared out among its members."""
    peaks = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        runtime = t.user_attrs.get(RUNTIME_ATTR) or {}
        peak = runtime.get(PEAK_GPU_MEMORY_ATTR)
        if isinstance(peak, int) and peak > 0:
            peaks.append(peak / int(runtime.get(FUSED_GROUP, 1)))
    return peaks


def fitting_group(k: int, peaks: Sequence[float], free_bytes: float | None) -> int:
    """``k``, or as many members as ``free_bytes`` hold at ``PEAK_MARGIN`` times the largest of
    ``peaks`` (at least one); ``k`` when either is unknown."""
    if free_bytes is None or not peaks:
        return k
    return max(1, min(k, math.floor(free_bytes / (PEAK_MARGIN * max(peaks)))))


def _free_gpu_bytes() -> float | None:
    """What this process may still take on its GPU: the device's free memory, its own cached
    blocks included, within the share ``CVAE_SEARCH_GPU_FRACTION`` caps it at."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    fraction = float(os.environ.get("CVAE_SEARCH_GPU_FRACTION") or 1.0)
    return min(free + cached, fraction * 0.95 * total)


def run_fused_round(
    study: optuna.Study,
    storage: BaseStorage,
    objective: TrialObjective,
    settings: StorageSettings,
    signals: _Signals,
    summary: WorkerSummary,
    k: int,
) -> bool:
    """Ask up to ``k`` trials, train them in groups and tell each its own outcome.

    Returns:
        Whether any trial could be asked (``False``: the budget is taken for now).
    """
    fits = fitting_group(k, per_trial_peaks(study), _free_gpu_bytes())
    if fits < k:
        _log.info(
            "asking %d trial(s), not %d: the free GPU memory holds %d at the peak measured", fits, k, fits
        )
    trials = _ask(study, fits)
    if not trials:
        return False
    started = time.monotonic()
    # One heartbeat per trial, each stopped once its trial is told; the rest while they wait.
    beats = {trial.number: contextlib.ExitStack() for trial in trials}
    told: set[int] = set()

    def tell(trial: optuna.Trial, outcome: TrialOutcome | BaseException) -> None:
        _run_trial(study, trial, objective, summary, run=_given(outcome), started=started)
        told.add(trial.number)
        beats[trial.number].close()

    try:
        for trial in trials:
            beats[trial.number].enter_context(_heartbeat(storage, trial, settings.heartbeat_interval))
        if signals.stop.is_set():
            raise WorkerInterrupted(signals.name)
        jobs = []
        for trial in trials:
            try:
                jobs.append(objective.prepare(trial))
            except Exception as e:  # an invalid config: failed as a plain worker fails it
                tell(trial, e)
        for group in group_jobs(jobs):
            _log.info(
                "training %d trial(s) fused: %s", len(group), ", ".join(str(j.trial.number) for j in group)
            )
            for job, outcome in zip(group, train_group(objective, group), strict=True):
                tell(job.trial, outcome)
    except WorkerInterrupted as e:
        reason = f"interrupted: the worker received {e}"
        for trial in trials:
            if trial.number not in told:
                beats[trial.number].close()
                _fail(study, trial, reason, retry=True, seconds=time.monotonic() - started)
                summary.failed += 1
        summary.stopped_by = str(e)
    finally:
        for stack in beats.values():
            stack.close()
    return True


def _ask(study: optuna.Study, k: int) -> list[optuna.Trial]:
    trials: list[optuna.Trial] = []
    for _ in range(k):
        try:
            trials.append(study.ask())
        except Exception as e:
            if is_budget_exhausted(e):
                break
            for trial in trials:  # asked but never to be trained here
                _fail(study, trial, f"{type(e).__name__}: {e}", retry=True, seconds=0.0)
            raise
    return trials


def _given(outcome: TrialOutcome | BaseException) -> Callable[[], TrialOutcome]:
    def run() -> TrialOutcome:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return run


def train_group(objective: TrialObjective, jobs: Sequence[TrialJob]) -> list[TrialOutcome | Exception]:
    """Train ``jobs`` (one architecture) fused; each member's outcome, or what it failed with.

    A member that diverged gets a :class:`TrialFailed` without retry; an error of the whole group
    (its data, an out-of-memory of a single trial) is every member's.
    """
    with contextlib.ExitStack() as stack:
        outs = [
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"trial-{j.trial.number}-")))
            for j in jobs
        ]
        objective.interruptible(True)
        try:
            data = objective.dataset(jobs[0].cfg)
            results = _train_fitting(jobs, data, outs)
            trained = [
                _trained(objective, job, result, out, data)
                for job, result, out in zip(jobs, results, outs, strict=True)
            ]
        except Exception as e:  # e.g. the data cannot be loaded: no member can train
            trained = [e] * len(jobs)
        finally:
            objective.interruptible(False)
        return [
            _outcome(objective, job, t, out) if isinstance(t, TrainedTrial) else t
            for job, t, out in zip(jobs, trained, outs, strict=True)
        ]


def _train_fitting(
    jobs: Sequence[TrialJob], data: Dataset, outs: Sequence[Path]
) -> list[TrainResult | TrainingDiverged]:
    """``train_fused``, split in halves (each trained from scratch) while it runs out of memory."""
    try:
        return train_fused(
            [j.cfg for j in jobs], data=data, callbacks=[j.callbacks for j in jobs], out_dirs=outs
        )
    except torch.OutOfMemoryError:
        if len(jobs) == 1:
            raise
        half = (len(jobs) + 1) // 2
        _log.warning(
            "out of memory training %d trials fused; training %d and %d", len(jobs), half, len(jobs) - half
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _train_fitting(jobs[:half], data, outs[:half]) + _train_fitting(jobs[half:], data, outs[half:])


def _trained(
    objective: TrialObjective, job: TrialJob, result: TrainResult | TrainingDiverged, out: Path, data: Dataset
) -> TrainedTrial | Exception:
    if isinstance(result, TrainingDiverged):
        return TrialFailed(f"diverged: {result}", retry=False)
    try:
        return objective.trained(job, result, out, data)
    except Exception as e:  # this member's downstream run: the others' results stand
        return e


def _outcome(
    objective: TrialObjective, job: TrialJob, trained: TrainedTrial, out: Path
) -> TrialOutcome | Exception:
    try:
        return objective.outcome(job, trained, out)
    except Exception as e:  # this member's upload
        return e
