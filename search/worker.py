"""Workers: processes that pull trials from a study until its budget is finished.

A worker loop asks for a trial, trains it under a heartbeat, and tells the outcome. It
uses ask/tell rather than ``study.optimize``, so it runs Optuna's liveness machinery itself:
a heartbeat thread while a trial runs, and :func:`search.storage.reap_stale_trials` (which
fails dead workers' trials with the reason and re-enqueues them) before every ask. Its sampler
seed is offset by a slot the study hands each worker, so workers started separately (container
replicas, a worker started again) do not repeat each other.

``run_workers`` starts one such process per GPU (``CUDA_VISIBLE_DEVICES`` set for each; K per
GPU when asked, or under CUDA MPS as many as the study's measured peak memory allows) or N on
the CPU, and forwards SIGTERM / Ctrl-C to them. A worker that is stopped that way fails its
running trial with the reason and re-enqueues it, so no trial is left RUNNING; one killed
outright is failed by the heartbeat of those that remain. Each process it starts ends with it:
the kernel sends the process SIGTERM when its parent dies (Linux's parent-death signal), so a
launcher killed outright (``kill -9``, an OOM kill) takes its trainers along, each failing and
re-enqueueing its trial. A single worker on the CPU runs in the launching process itself.

A worker whose trial was failed as stale while it was cut off from the storage, and which
finished training anyway, records its result on the waiting retry of the same parameters
(``result_from_trial``) rather than throw it away; only a retry already taken up elsewhere
makes it drop the result.

With ``fuse`` K > 1 a worker asks up to K trials at a time and trains those of one architecture
as one stacked model, each still its own trial (:mod:`search.fused_worker`).

Its log names trials by number: a line when each starts (baseline or parameters) and ends
(values, feasibility, epochs, duration), and where the study stands with an ETA.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState

from search.definition import StudyDefinition
from search.objective import (
    PEAK_GPU_MEMORY_ATTR,
    RUNTIME_ATTR,
    TrialFailed,
    TrialObjective,
    TrialOutcome,
)
from search.progress import RESULT_FROM_ATTR, format_duration, progress_line, trial_ended, trial_started
from search.storage import (
    FAIL_REASON_ATTR,
    HEARTBEAT_ATTR,
    StorageSettings,
    StorageUnreachable,
    StudyRetry,
    describe_failure,
    is_budget_exhausted,
    open_storage,
    reap_stale_trials,
    record_trial_attrs,
    search_storage,
    waiting_retry,
)
from search.study import claim_worker_slot, load_study

__all__ = [
    "PerGpuChoice",
    "WorkerInterrupted",
    "WorkerSummary",
    "choose_per_gpu",
    "measured_peaks",
    "mps_running",
    "parse_fuse",
    "parse_per_gpu",
    "plan_processes",
    "run_worker",
    "run_workers",
]

_log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_PID_ENV = "CVAE_SEARCH_PARENT_PID"
"""Set by ``run_workers`` in each process it starts: the process it must end with."""
PR_SET_PDEATHSIG = 1
SIGNAL_AGAIN_S = 1.0


class WorkerInterrupted(BaseException):
    """SIGTERM or SIGINT arrived while a trial was training (a BaseException, like
    KeyboardInterrupt, so no ``except Exception`` in training code swallows it)."""


@dataclass
class WorkerSummary:
    completed: int = 0
    failed: int = 0
    stopped_by: str | None = None


class _Signals:
    """SIGTERM or SIGINT interrupts training at once; anywhere else (a storage write, say)
    it stops the loop after the current step, so no write is cut in half."""

    def __init__(self, parent_pid: int | None = None) -> None:
        self.stop = threading.Event()
        self.name: str | None = None
        self.training = False
        self.parent_pid = parent_pid

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)

    def set_training(self, training: bool) -> None:
        if training and self.stop.is_set():  # the signal came while the trial was being set up
            raise WorkerInterrupted(self.name)
        self.training = training

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.name = signal.Signals(signum).name
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.name += " (its parent process ended)"
        self.stop.set()
        if self.training:
            # Raised into whatever the main thread runs now. Should that be a finalizer (a
            # weakref callback, a __del__), Python ignores the exception and training goes on:
            # then the signal comes again, until training has ended.
            again = threading.Timer(SIGNAL_AGAIN_S, self._again, args=(signum,))
            again.daemon = True
            again.start()
            raise WorkerInterrupted(self.name)

    def _again(self, signum: int) -> None:
        if self.training:
            os.kill(os.getpid(), signum)


@contextmanager
def _heartbeat(storage: BaseStorage, trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Beat for ``trial`` every ``interval`` seconds until the block ends.

    Each beat is tried once (the next one retries), so an outage neither holds the thread
    past the trial nor fills the log: its first missed beat is logged, and the first that
    gets through again.
    """
    done = threading.Event()
    trial_id = trial._trial_id
    attempt = getattr(storage, "single_attempt", contextlib.nullcontext)

    def beat() -> None:
        with attempt():
            if isinstance(storage, BaseHeartbeat):
                storage.record_heartbeat(trial_id)
            else:  # behind the gRPC proxy, which relays this attribute as a heartbeat
                storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def loop() -> None:
        missed_since: float | None = None
        while not done.wait(interval):
            try:
                beat()
            except Exception as e:
                if missed_since is None:
                    missed_since = time.monotonic()
                    _log.warning(
                        "heartbeat of trial %d not recorded: %s; trying again every %g s",
                        trial.number,
                        describe_failure(e),
                        interval,
                    )
                continue
            if missed_since is not None:
                _log.info(
                    "heartbeat of trial %d recorded again after %s",
                    trial.number,
                    format_duration(time.monotonic() - missed_since),
                )
                missed_since = None

    # No beat here: the storage beat when the trial became RUNNING (SearchStorage, also
    # behind the proxy), and the loop's first beat comes within the grace period.
    thread = threading.Thread(target=loop, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    storage = search_storage(study._storage)
    if storage is not None:  # one COUNT ... GROUP BY instead of loading every trial
        return storage.count_trials(study._study_id)
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str, *, retry: bool, seconds: float) -> None:
    """Fail ``trial`` with ``reason``; with ``retry``, re-enqueue its parameters.

    The failure and the retry happen under the study lock where the storage has one, so the
    retry cannot lose its place in the budget to a new trial in between.
    """
    storage = search_storage(study._storage)
    lock = storage.study_lock(study._study_id) if storage is not None else contextlib.nullcontext()
    try:
        with lock:
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            again = StudyRetry()(study, study._storage.get_trial(trial._trial_id)) if retry else None
    except UpdateFinishedTrialError:
        # Failed as stale meanwhile (and re-enqueued) by another process: its retry runs again.
        _log.warning(
            "trial %d failed (%s), but another process had failed it as stale already", trial.number, reason
        )
        return
    retried = f"; re-enqueued as trial {again}" if again is not None else ""
    _log.warning("trial %d failed after %s: %s%s", trial.number, format_duration(seconds), reason, retried)


def _settle_finished(
    study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome | None, metric_names: list[str]
) -> bool:
    """Settle a trial this worker trained but found already finished when it came to record
    it; whether its result now counts in the study.

    Either this worker's own tell got through before a lost reply was retried (the trial is
    complete), or another process failed it as stale while this one was cut off from the
    storage for longer than the grace period, and re-enqueued its parameters. The result then
    goes to that waiting retry, unless the retry has been taken up already.
    """
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state == TrialState.COMPLETE:
        _log.info("trial %d complete (recorded before the storage connection dropped)", trial.number)
        return True
    why = f"trial {trial.number} was failed as stale by another process while this worker was cut off"
    if outcome is None:
        _log.warning("%s; dropping this attempt, which had not finished", why)
        return False
    try:
        outcome.checked_values(metric_names)
    except TrialFailed as e:
        _log.warning("%s; dropping this attempt, which has no result to record (%s)", why, e.reason)
        return False
    retry = waiting_retry(study, trial.number)
    if retry is None or not study._storage.set_trial_state_values(retry._trial_id, TrialState.RUNNING):
        _log.warning("%s, and its retry has been taken up already; dropping this attempt's result", why)
        return False
    try:
        _record_on(study, retry, frozen, outcome)
    except UpdateFinishedTrialError:
        _log.warning(
            "%s, and its retry %d was failed meanwhile; dropping this attempt's result", why, retry.number
        )
        return False
    _log.info("%s; its finished result is recorded on its retry, trial %d", why, retry.number)
    return True


def _record_on(study: optuna.Study, retry: FrozenTrial, trained: FrozenTrial, outcome: TrialOutcome) -> None:
    """Give the claimed ``retry`` the parameters, records and values of the attempt ``trained``."""
    storage = study._storage
    for name, value in trained.params.items():
        dist = trained.distributions[name]
        storage.set_trial_param(retry._trial_id, name, dist.to_internal_repr(value), dist)
    user_attrs = {**outcome.user_attrs, FAIL_REASON_ATTR: None, RESULT_FROM_ATTR: trained.number}
    record_trial_attrs(storage, retry._trial_id, user_attrs, outcome.system_attrs)
    _tell_with_warning(study=study, trial=retry.number, value_or_values=outcome.values)


def run_worker(
    study_name: str,
    *,
    storage_url: str | None = None,
    artifact_dir: str | Path = "cvae-search-artifacts",
    n_trials: int | None = None,
    worker_index: int = 0,
    local: StudyDefinition | None = None,
    settings: StorageSettings | None = None,
    fuse: int = 1,
) -> WorkerSummary:
    """Pull and run trials of ``study_name`` in this process until the budget is finished.

    Args:
        study_name: The study to work on.
        storage_url: Storage URL (see :func:`search.storage.resolve_storage_url`).
        artifact_dir: Folder of the file-system artifact store.
        n_trials: Stop after this many trials of this worker (default: the study's budget).
        worker_index: This worker's index among those ``run_workers`` started (for logs);
            the sampler seed is offset by a slot the study hands out instead.
        local: A definition read from a local file; the worker refuses to run if it differs
            from the stored one.
        settings: Heartbeat and connection settings.
        fuse: Ask up to this many trials at a time and train those of one architecture as one
            stacked model (see :mod:`search.fused_worker`).

    Raises:
        StorageUnreachable: The storage stayed unreachable past ``CVAE_SEARCH_RECONNECT``;
            the running trial is left to the other workers' heartbeat check.
    """
    settings = settings or StorageSettings()
    parent = os.environ.get(PARENT_PID_ENV)
    signals = _Signals(int(parent) if parent else None)
    signals.install()  # first: a stop during start-up ends the worker cleanly too
    if signals.parent_pid is not None:
        _end_with_parent(signals.parent_pid)
    _apply_process_limits()
    _quiet_optuna_warnings()
    storage = open_storage(storage_url, settings, create=False)
    study, definition = load_study(study_name, storage, local=local)
    # A slot the study hands out, not the command line's index: separately started workers
    # (and a worker started again later) must not replay the same sampler seed.
    slot = claim_worker_slot(study)
    study.sampler = definition.make_sampler(slot)
    objective = TrialObjective(
        definition, artifact_dir=artifact_dir, interruptible=signals.set_training, on_start=_log_start
    )
    summary = WorkerSummary()
    _log.info("worker %d (slot %d) on %s (%s)", worker_index, slot, study_name, socket.gethostname())
    while True:
        if signals.stop.is_set():
            summary.stopped_by = signals.name
            break
        if n_trials is not None and summary.completed + summary.failed >= n_trials:
            break
        reap_stale_trials(study)
        counts = _counts(study)
        if sum(counts[s] for s in FINISHED) >= definition.n_trials:
            break
        if counts[TrialState.FAIL] >= definition.max_failures:
            _log.error(
                "study %s has %d failed trials (max_failures); stopping", study_name, counts[TrialState.FAIL]
            )
            summary.stopped_by = "max_failures"
            break
        if fuse > 1:
            from search.fused_worker import run_fused_round  # it builds on this module

            left = fuse if n_trials is None else min(fuse, n_trials - summary.completed - summary.failed)
            if not run_fused_round(study, storage, objective, settings, signals, summary, left):
                signals.stop.wait(settings.heartbeat_interval)  # budget taken, as below
                continue
            if summary.stopped_by is not None:
                break
            _log.info("%s", progress_line(study.get_trials(deepcopy=False), definition.n_trials))
            continue
        try:
            trial = study.ask()
        except Exception as e:
            if not is_budget_exhausted(e):
                raise
            # Budget taken but not finished: others are running trials that may yet fail
            # and come back for a retry. Wait for them.
            signals.stop.wait(settings.heartbeat_interval)
            continue
        started = time.monotonic()
        try:
            if signals.stop.is_set():
                raise WorkerInterrupted(signals.name)
            with _heartbeat(storage, trial, settings.heartbeat_interval):
                _run_trial(study, trial, objective, summary)
        except WorkerInterrupted as e:
            reason = f"interrupted: the worker received {e}"
            _fail(study, trial, reason, retry=True, seconds=time.monotonic() - started)
            summary.failed += 1
            summary.stopped_by = str(e)
            break
        _log.info("%s", progress_line(study.get_trials(deepcopy=False), definition.n_trials))
    _log.info("worker %d done: %d complete, %d failed", worker_index, summary.completed, summary.failed)
    return summary


def _log_start(trial: optuna.Trial, params: dict[str, object], baseline: str | None) -> None:
    # The trial as asked, which the Trial holds anyway: no second read of the storage.
    history = trial._cached_frozen_trial.system_attrs.get("retry_history")
    retry_of = history[-1] if history else None
    _log.info("%s", trial_started(trial.number, params, baseline, retry_of))


def _end_with_parent(parent_pid: int) -> None:
    """Have this process receive SIGTERM when its parent ends, even by SIGKILL, so that it fails
    and re-enqueues its trial rather than train on as an orphan.

    Linux's parent-death signal; it follows the thread that started this process, which is
    ``run_workers``'s caller, the launcher's main thread. The parent may have ended before
    the signal was armed: then this process stops at once.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            _log.warning("could not arm the parent-death signal: %s", os.strerror(ctypes.get_errno()))
    else:  # no parent-death signal: watch the parent instead

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _quiet_optuna_warnings() -> None:
    """Optuna warns on every ask that heartbeats are meant for ``optimize``; this loop runs
    the heartbeat machinery itself, on purpose."""
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed", category=UserWarning)


def _apply_process_limits() -> None:
    """CPU threads and GPU memory share that ``run_workers`` assigned this process."""
    import torch

    threads = os.environ.get("CVAE_SEARCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    fraction = os.environ.get("CVAE_SEARCH_GPU_FRACTION")
    if fraction and torch.cuda.is_available() and float(fraction) < 1.0:
        # A cap per process: one trial's out-of-memory fails that trial, not its neighbours.
        torch.cuda.set_per_process_memory_fraction(float(fraction) * 0.95)


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    objective: TrialObjective,
    summary: WorkerSummary,
    run: Callable[[], TrialOutcome] | None = None,
    started: float | None = None,
) -> None:
    """Run ``trial`` (or take its outcome from ``run``), record it and tell it, or fail it."""
    started = time.monotonic() if started is None else started
    metric_names = objective.definition.metric_names
    outcome: TrialOutcome | None = None
    try:
        outcome = objective.run(trial) if run is None else run()
        record_trial_attrs(study._storage, trial._trial_id, outcome.user_attrs, outcome.system_attrs)
        values = outcome.checked_values(metric_names)
    except TrialFailed as e:
        _fail(study, trial, e.reason, retry=e.retry, seconds=time.monotonic() - started)
        summary.failed += 1
        return
    except UpdateFinishedTrialError:
        if _settle_finished(study, trial, outcome, metric_names):
            summary.completed += 1
        return
    except StorageUnreachable:
        raise  # nothing can be recorded; the other workers' heartbeat check fails the trial
    except Exception as e:  # e.g. CUDA out of memory: this trial fails alone, the worker goes on
        _fail(study, trial, f"{type(e).__name__}: {e}", retry=True, seconds=time.monotonic() - started)
        summary.failed += 1
        return
    # Told as Optuna's own optimize loop tells: Study.tell would load and copy the finished
    # trial, its whole history included, only to return it.
    try:
        state, _, _ = _tell_with_warning(
            study=study, trial=trial, value_or_values=values, skip_if_finished=True
        )
    except UpdateFinishedTrialError:
        state = None
    if state != TrialState.COMPLETE:
        if _settle_finished(study, trial, outcome, metric_names):
            summary.completed += 1
        return
    summary.completed += 1
    _log.info("%s", trial_ended(trial.number, outcome, metric_names, time.monotonic() - started))


# --- several processes ---------------------------------------------------------------------


AUTO_MAX_PER_GPU = 4
"""``--per-gpu auto`` starts at most this many per GPU: under MPS, 2 to 4 gained 1.16x to 1.29x
(benchmarks/RESULTS.md, section 2), and more processes mean more database connections."""
PEAK_MARGIN = 1.25
"""A process's share of a GPU must hold this times the largest measured peak: room for a trial a
little larger than any so far, and above 1/0.95, since each share is capped at 0.95/K."""
MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"
"""Where the MPS control daemon puts its pipes unless ``CUDA_MPS_PIPE_DIRECTORY`` says otherwise."""

PerGpu = int | Literal["auto"]


@dataclass(frozen=True)
class ProcessPlan:
    index: int
    env: dict[str, str]


@dataclass(frozen=True)
class PerGpuChoice:
    k: int
    reason: str


def parse_per_gpu(value: str) -> PerGpu:
    """``auto`` or a whole number >= 1."""
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(
            f"--per-gpu (or $CVAE_SEARCH_PER_GPU): expected auto or a whole number >= 1, got {value!r}"
        )
    return k


def parse_fuse(value: str) -> int:
    """A whole number >= 1."""
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"--fuse (or $CVAE_SEARCH_FUSE): expected a whole number >= 1, got {value!r}")
    return k


def choose_per_gpu(
    peaks: Sequence[int], total_bytes: int, *, mps: bool, cap: int = AUTO_MAX_PER_GPU
) -> PerGpuChoice:
    """Processes to run on one GPU of ``total_bytes``, given the peak memory of finished trials.

    Without MPS the GPU time-slices between processes and K > 1 measured slower than one
    (0.94x on an H100), so only MPS earns more than one; then as many as fit, up to ``cap``.
    """
    if not peaks:
        return PerGpuChoice(1, "no trial has measured its peak yet")
    if not mps:
        return PerGpuChoice(1, "CUDA MPS is not running, and without it K > 1 is slower")
    fit = math.floor(total_bytes / (PEAK_MARGIN * max(peaks)))
    if fit >= cap:
        return PerGpuChoice(cap, f"{fit} would fit; capped at {cap}")
    if fit < 1:
        return PerGpuChoice(1, f"the peak x {PEAK_MARGIN} exceeds the GPU; one process")
    return PerGpuChoice(fit, f"{fit} fit with a {PEAK_MARGIN}x margin")


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon serves this machine (its control pipe exists)."""
    folder = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DIRECTORY
    return Path(folder, "control").is_fifo()


def measured_peaks(study: optuna.Study) -> list[int]:
    """Peak GPU memory of each complete trial that recorded one (those trained on a GPU)."""
    peaks = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        peak = (t.user_attrs.get(RUNTIME_ATTR) or {}).get(PEAK_GPU_MEMORY_ATTR)
        if isinstance(peak, int) and peak > 0:
            peaks.append(peak)
    return peaks


def _gpu_memory() -> dict[str, int]:
    """Total bytes of each GPU by index, from nvidia-smi; empty when it cannot tell.

    nvidia-smi rather than torch: a CUDA context here would take memory on every GPU
    for as long as the workers run.
    """
    cmd = ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _log.warning("nvidia-smi could not report GPU memory: %s", e)
        return {}
    totals = {}
    for line in out.splitlines():
        index, _, mib = (part.strip() for part in line.partition(","))
        if mib.isdigit():
            totals[index] = int(mib) * 2**20
    if totals and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        # nvidia-smi numbers GPUs by PCI bus, CUDA fastest first: on a machine of mixed GPUs
        # an index may name another card, so each is judged by the smallest.
        totals = dict.fromkeys(totals, min(totals.values()))
    return totals


def _auto_per_gpu(ids: Sequence[str], peaks: Sequence[int]) -> dict[str, int]:
    """``--per-gpu auto``: K for each GPU, logged with what it was chosen from."""
    mps = mps_running()
    totals = _gpu_memory()
    peak = f"peak {max(peaks) / 2**30:.2f} GiB over {len(peaks)} trials" if peaks else "no peak measured"
    chosen: dict[str, int] = {}
    reasons: dict[tuple[int, str, str], list[str]] = {}
    for gpu in ids:
        total = totals.get(gpu)
        if total is None:
            choice, memory = PerGpuChoice(1, "nvidia-smi did not report its memory"), "total unknown"
        else:
            choice, memory = choose_per_gpu(peaks, total, mps=mps), f"total {total / 2**30:.1f} GiB"
        chosen[gpu] = choice.k
        reasons.setdefault((choice.k, choice.reason, memory), []).append(gpu)
    for (k, reason, memory), gpus in reasons.items():
        _log.info(
            "--per-gpu auto: K=%d on GPU %s: %s (%s, %s, MPS %s)",
            k,
            ",".join(gpus),
            reason,
            peak,
            memory,
            "yes" if mps else "no",
        )
    return chosen


def _gpu_ids(gpus: str) -> list[str]:
    if gpus in ("auto", "all"):
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
        if not ids and gpus == "all":
            raise ValueError("--gpus all: no CUDA device is visible")
        return ids
    if gpus == "none":
        return []
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise ValueError(f"--gpus: expected all, none, auto or a list like 0,1; got {gpus!r}")
    return ids


def plan_processes(
    gpus: str,
    per_gpu: PerGpu,
    processes: int,
    cpu_count: int | None = None,
    *,
    peaks: Callable[[], Sequence[int]] = list,
) -> list[ProcessPlan]:
    """``per_gpu`` processes on each GPU, or ``processes`` on the CPU.

    Args:
        gpus: ``auto`` (all visible GPUs, else the CPU), ``all``, ``none``, or ``0,1,...``.
        per_gpu: Processes sharing each GPU, or ``auto``: one, or under CUDA MPS as many as
            the largest peak in ``peaks`` allows (see :func:`choose_per_gpu`).
        processes: Processes when running on the CPU.
        cpu_count: CPU cores to share among CPU processes (default: this machine's); a
            ``CVAE_SEARCH_THREADS`` set in the environment fixes the threads per process
            instead (several workers started separately on one machine).
        peaks: The study's measured peak GPU memory per trial; read only for ``auto`` on GPUs.
    """
    if (isinstance(per_gpu, int) and per_gpu < 1) or processes < 1:
        raise ValueError(f"--per-gpu and --processes: expected >= 1, got {per_gpu} and {processes}")
    ids = _gpu_ids(gpus)
    if ids:
        counts = dict.fromkeys(ids, per_gpu) if isinstance(per_gpu, int) else _auto_per_gpu(ids, peaks())
        slots = [(gpu, k) for gpu, k in counts.items() for _ in range(k)]
        return [
            ProcessPlan(i, {"CUDA_VISIBLE_DEVICES": gpu, "CVAE_SEARCH_GPU_FRACTION": f"{1.0 / k:.4f}"})
            for i, (gpu, k) in enumerate(slots)
        ]
    threads = os.environ.get("CVAE_SEARCH_THREADS") or str(
        max(1, (cpu_count or os.cpu_count() or 1) // processes)
    )
    return [
        ProcessPlan(
            i, {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "CVAE_SEARCH_THREADS": threads}
        )
        for i in range(processes)
    ]


def run_workers(
    plans: Sequence[ProcessPlan],
    child_args: Sequence[str],
    *,
    index_offset: int = 0,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run one ``cvae-search worker --child`` process per plan; forward SIGTERM/SIGINT.

    Each process ends with this one (see :func:`_end_with_parent`).

    Args:
        plans: One process each.
        child_args: The ``worker`` arguments every process gets.
        index_offset: Added to each process's index in the logs.
        env: Variables set for every process besides the plan's, e.g. ``OPTUNA_STORAGE``:
            anything secret goes here, never into ``child_args``, which ``ps`` shows.

    Returns:
        0 when every process ended cleanly, else the first non-zero exit status.
    """
    procs: list[subprocess.Popen[bytes]] = []
    stopping = threading.Event()

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    # Installed before any child starts, so a stop during start-up reaches every child.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for plan in plans:
            if stopping.is_set():
                break
            child_env = {**os.environ, **(env or {}), **plan.env, PARENT_PID_ENV: str(os.getpid())}
            cmd = [
                sys.executable,
                "-m",
                "search.cli",
                "worker",
                *child_args,
                "--child",
                "--worker-index",
                str(index_offset + plan.index),
            ]
            procs.append(subprocess.Popen(cmd, env=child_env))
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # A child stopped by the forwarded SIGTERM before it could install its handler (still
    # starting up) did what was asked.
    stopped = -signal.SIGTERM if stopping.is_set() else 0
    bad = [c for c in codes if c not in (0, stopped)]
    return bad[0] if bad else 0
