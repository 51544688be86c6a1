"""The second search stage: SRDRN with and without each front trial's generated data.

Training SRDRN for every trial is too costly at production size, but the feasible front is
small. :func:`run_stage` evaluates the chosen trials (:func:`stage_trials`) downstream
(:mod:`model.downstream`): from a trial's saved checkpoint where ``save_checkpoints`` kept one,
else by retraining the cVAE from the trial's config and seed, which reproduces it.

Where the results live
    Optuna refuses to change a finished trial (``UpdateFinishedTrialError``, on SQLite and
    PostgreSQL alike), so each result is a study system attribute
    ``cvae_search:downstream:<trial number>`` holding ``{"gains", "verdicts", "table", "at",
    "file"}``. :func:`downstream_records` reads them, and also a trial's own ``downstream`` user
    attribute (what a study with downstream objectives records while the trial runs); the
    dashboard, ``status`` and ``export`` read through it.

Who evaluates what
    Each trial to evaluate is enqueued once, as a waiting trial with user attribute
    ``source_trial`` in a companion study ``<study>:downstream``; a process claims it with the
    storage's atomic waiting-to-running transition, which only one process can win, and beats
    for it while it evaluates. A claim whose process died stops beating and is failed and
    re-enqueued by the next process that looks (:func:`search.storage.reap_stale_trials`, under
    the companion study's lock). A trial that already has a result is skipped, so a stage
    interrupted and run again carries on where it stopped, and several processes on one study
    share the work. A process waits for the claims other processes hold before it reports, so
    each prints the whole ranking.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.definition import StudyDefinition
from search.storage import FAIL_REASON_ATTR, StorageSettings, json_safe, reap_stale_trials, search_storage
from search.study import BASELINE_ATTR, DOWNSTREAM_ATTR

if TYPE_CHECKING:
    from model.downstream import DownstreamResult

__all__ = [
    "RANK_HELP",
    "RECORD_ATTR_PREFIX",
    "SOURCE_ATTR",
    "StageReport",
    "claim_next",
    "downstream_gains",
    "downstream_records",
    "enqueue_claims",
    "evaluate_trial",
    "format_ranking",
    "process_claims",
    "queue_study",
    "rank_key",
    "record_result",
    "run_stage",
    "saved_checkpoint",
    "stage_trials",
]

_log = logging.getLogger(__name__)

RECORD_ATTR_PREFIX = "cvae_search:downstream:"
"""Study system attribute prefix of the stage's results, one per trial number."""
SOURCE_ATTR = "source_trial"
"""User attribute of a companion-study trial: the number of the trial it evaluates."""
QUEUE_SUFFIX = ":downstream"

RANK_HELP = (
    "verdicts (default): the count of 'better' verdicts minus 'worse' ones, ties by trial number; "
    "or downstream_<key>_gain: that mean gain (positive is better)"
)


def downstream_records(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """Each trial's downstream result, by trial number: the stage's record, else the trial's own
    ``downstream`` user attribute."""
    records: dict[int, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False):
        own = t.user_attrs.get(DOWNSTREAM_ATTR)
        if isinstance(own, dict):
            records[t.number] = own
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        number = key.removeprefix(RECORD_ATTR_PREFIX)
        if key.startswith(RECORD_ATTR_PREFIX) and number.isdigit() and isinstance(value, dict):
            records[int(number)] = value
    return records


def downstream_gains(record: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric gains of a record (``{}`` for none)."""
    gains = record.get("gains") if isinstance(record, Mapping) else None
    if not isinstance(gains, Mapping):
        return {}
    return {k: float(v) for k, v in gains.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stage_trials(
    study: optuna.Study,
    definition: StudyDefinition,
    *,
    top: int | None = None,
    trial: int | None = None,
    baselines: bool = True,
) -> list[FrozenTrial]:
    """The trials the stage evaluates, in order.

    Args:
        study: The study.
        definition: Its definition.
        top: Only the ``top`` front trials nearest the ideal point (the knee's order,
            :func:`search.export.knee_order`); all of the front when ``None``.
        trial: Only this trial (then ``top`` and ``baselines`` do not apply).
        baselines: Add the complete baseline trials after the front, for reference.

    Raises:
        ValueError: ``trial`` is not a complete trial of the study, or ``top`` is below 1.
        NoFeasibleTrial: The study has no feasible front yet.
    """
    from search.export import knee_order  # export reads the records from this module

    trials = study.get_trials(deepcopy=False)
    if trial is not None:
        matches = [t for t in trials if t.number == trial]
        if not matches or matches[0].state != TrialState.COMPLETE:
            state = matches[0].state.name.lower() if matches else "no such trial"
            raise ValueError(f"--trial: study {study.study_name} has no complete trial {trial} ({state})")
        return matches
    if top is not None and top < 1:
        raise ValueError(f"--top: expected a number of trials >= 1, got {top}")
    chosen = knee_order(study, definition)[:top]
    if baselines:
        numbers = {t.number for t in chosen}
        chosen += [
            t
            for t in sorted(trials, key=lambda t: t.number)
            if t.state == TrialState.COMPLETE and t.user_attrs.get(BASELINE_ATTR) and t.number not in numbers
        ]
    return chosen


# --- claims -------------------------------------------------------------------------------------


def queue_study(study: optuna.Study) -> optuna.Study:
    """The companion study ``<study>:downstream`` that holds the stage's claims (made if missing)."""
    return optuna.create_study(
        study_name=study.study_name + QUEUE_SUFFIX, storage=study._storage, load_if_exists=True
    )


def _lock(queue: optuna.Study) -> contextlib.AbstractContextManager[None]:
    storage = search_storage(queue._storage)
    if storage is None:  # behind the gRPC proxy: two processes enqueuing at once may double a claim
        return contextlib.nullcontext()
    return storage.study_lock(queue._study_id)


def _claims(queue: optuna.Study, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
    return queue._storage.get_all_trials(queue._study_id, deepcopy=False, states=states)


def enqueue_claims(queue: optuna.Study, numbers: Sequence[int]) -> list[int]:
    """Enqueue a claim for each of ``numbers`` that has none waiting, running or complete.

    Under the companion study's lock, the same lock under which a dead process's claim is
    failed and re-enqueued, so no trial ever has two live claims.

    Returns:
        The numbers enqueued now.
    """
    with _lock(queue):
        live = {
            t.user_attrs.get(SOURCE_ATTR)
            for t in _claims(queue, (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))
        }
        added = [n for n in numbers if n not in live]
        for n in added:
            queue.enqueue_trial({}, user_attrs={SOURCE_ATTR: n})
    return added


def claim_next(queue: optuna.Study, numbers: Sequence[int]) -> FrozenTrial | None:
    """Claim the first of ``numbers`` (in order) whose claim is waiting; ``None`` when none is.

    Claims whose process stopped beating are failed and re-enqueued first. The claim is the
    storage's waiting-to-running transition, which one process alone wins; the running claim
    beats from then on (:class:`search.storage.SearchStorage`), and its holder keeps it beating
    (:func:`process_claims`).

    Returns:
        The claimed companion trial (running, user attribute ``source_trial``), or ``None``.
    """
    reap_stale_trials(queue)
    waiting: dict[int, list[FrozenTrial]] = {}
    for t in _claims(queue, (TrialState.WAITING,)):
        waiting.setdefault(t.user_attrs.get(SOURCE_ATTR), []).append(t)
    for n in numbers:
        for t in waiting.get(n, []):
            if queue._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return queue._storage.get_trial(t._trial_id)
    return None


def _held_elsewhere(queue: optuna.Study, numbers: Sequence[int]) -> list[int]:
    wanted = set(numbers)
    running = {t.user_attrs.get(SOURCE_ATTR) for t in _claims(queue, (TrialState.RUNNING,))}
    waiting = {t.user_attrs.get(SOURCE_ATTR) for t in _claims(queue, (TrialState.WAITING,))}
    return sorted(wanted & (running | waiting))


def _heartbeat_interval(queue: optuna.Study) -> float:
    storage = search_storage(queue._storage)
    return float((storage.settings if storage is not None else StorageSettings()).heartbeat_interval)


def process_claims(
    queue: optuna.Study,
    numbers: Sequence[int],
    work: Callable[[int], None],
    *,
    progress: Callable[[str], None] = lambda _: None,
) -> list[int]:
    """Claim and work through ``numbers`` until none is waiting or held by another process.

    ``work(number)`` runs under the claim's heartbeat. It returning completes the claim; it
    raising (Ctrl-C included) fails the claim with the error as its ``fail_reason`` and raises
    on, and the next :func:`enqueue_claims` offers that trial again.

    Returns:
        The numbers this process worked on, in order.
    """
    from search.worker import _heartbeat  # the worker's beat loop, outage logging included

    interval = _heartbeat_interval(queue)
    done: list[int] = []
    waiting_on: list[int] = []
    while True:
        claim = claim_next(queue, numbers)
        if claim is None:
            held = _held_elsewhere(queue, numbers)
            if not held:
                return done
            if held != waiting_on:
                progress(f"waiting for trial(s) {', '.join(map(str, held))}, claimed by another process")
                waiting_on = held
            time.sleep(interval)
            continue
        number = claim.user_attrs[SOURCE_ATTR]
        try:
            with _heartbeat(queue._storage, claim, interval):  # type: ignore[arg-type]
                work(number)
        except BaseException as e:
            queue._storage.set_trial_user_attr(claim._trial_id, FAIL_REASON_ATTR, f"{type(e).__name__}: {e}")
            queue._storage.set_trial_state_values(claim._trial_id, TrialState.FAIL)
            raise
        queue._storage.set_trial_state_values(claim._trial_id, TrialState.COMPLETE)
        done.append(number)


# --- evaluation ---------------------------------------------------------------------------------


def saved_checkpoint(
    study: optuna.Study, trial: FrozenTrial, artifact_dir: str | Path, into: Path
) -> Path | None:
    """Download ``trial``'s saved ``checkpoint.pt`` from the artifact store into folder ``into``;
    ``None`` when it saved none, or the store does not hold it (another machine's folder)."""
    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

    metas = [m for m in get_all_artifact_meta(trial, storage=study._storage) if m.filename == "checkpoint.pt"]
    if not metas:
        return None
    path = into / "checkpoint.pt"
    try:
        download_artifact(
            artifact_store=FileSystemArtifactStore(str(artifact_dir)),
            artifact_id=metas[-1].artifact_id,
            file_path=str(path),
        )
    except FileNotFoundError:
        _log.warning(
            "trial %d: its checkpoint is not in artifact folder %s; retraining the cVAE instead",
            trial.number,
            artifact_dir,
        )
        return None
    return path


def evaluate_trial(
    study: optuna.Study,
    definition: StudyDefinition,
    trial: FrozenTrial,
    *,
    artifact_dir: str | Path,
    out_dir: Path,
    progress: Callable[[str], None] | None = None,
) -> DownstreamResult:
    """Evaluate ``trial`` downstream, with the ``downstream`` settings of its config, writing
    ``downstream.json`` and the plots into ``out_dir``."""
    from model.downstream import downstream_for_checkpoint, downstream_for_config
    from search.export import trial_config

    cfg = trial_config(definition, trial)
    source = f"study {study.study_name} trial {trial.number}"
    with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-") as tmp:
        checkpoint = saved_checkpoint(study, trial, artifact_dir, Path(tmp))
        if checkpoint is not None:
            _log.info("trial %d: from its saved checkpoint", trial.number)
            return downstream_for_checkpoint(
                checkpoint, out_dir=out_dir, downstream=cfg.downstream, source=source, progress=progress
            )
    _log.info("trial %d: retraining its cVAE (config and seed %d)", trial.number, cfg.train.seed)
    return downstream_for_config(cfg, out_dir=out_dir, source=source, progress=progress)


def record_result(study: optuna.Study, number: int, result: DownstreamResult, file: Path) -> dict[str, Any]:
    """Record trial ``number``'s result in the study (module docstring) and return the record."""
    record = {**result.summary(), "file": str(file.resolve())}
    study._storage.set_study_system_attr(study._study_id, f"{RECORD_ATTR_PREFIX}{number}", json_safe(record))
    return record


@dataclass
class StageReport:
    """What one run of the stage did, and the results of every trial it was asked for."""

    trials: list[FrozenTrial]
    evaluated: list[int] = field(default_factory=list)
    """Evaluated by this process."""
    skipped: list[int] = field(default_factory=list)
    """Already evaluated when this run began."""
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Trial number -> record, for each trial that has one now."""

    @property
    def missing(self) -> list[int]:
        """Trials still without a result (their evaluation failed in another process)."""
        return [t.number for t in self.trials if t.number not in self.records]


def run_stage(
    study: optuna.Study,
    definition: StudyDefinition,
    trials: Sequence[FrozenTrial],
    *,
    artifact_dir: str | Path,
    out_dir: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> StageReport:
    """Evaluate each of ``trials`` downstream that has no result yet, sharing the work with any
    other process running the stage on the same study (module docstring).

    Each trial's files go to ``out_dir/trial-<number>/``.
    """
    by_number = {t.number: t for t in trials}
    before = downstream_records(study)
    report = StageReport(list(trials), skipped=[n for n in by_number if n in before])
    todo = [n for n in by_number if n not in before]
    queue = queue_study(study)
    enqueue_claims(queue, todo)

    def work(number: int) -> None:
        if number in downstream_records(study):  # recorded by a process that died before completing its claim
            return
        progress(f"trial {number}: evaluating downstream")
        folder = out_dir / f"trial-{number}"
        result = evaluate_trial(
            study, definition, by_number[number], artifact_dir=artifact_dir, out_dir=folder, progress=progress
        )
        record_result(study, number, result, folder / "downstream.json")
        report.evaluated.append(number)

    process_claims(queue, todo, work, progress=progress)
    records = downstream_records(study)
    report.records = {n: records[n] for n in by_number if n in records}
    return report


# --- ranking ------------------------------------------------------------------------------------


def rank_key(rank_by: str, record: Mapping[str, Any]) -> float:
    """A record's score under ``rank_by`` (:data:`RANK_HELP`); higher ranks first, NaN last."""
    if rank_by == "verdicts":
        verdicts = list((record.get("verdicts") or {}).values())
        return float(verdicts.count("better") - verdicts.count("worse"))
    return downstream_gains(record).get(rank_by, math.nan)


def _check_rank(rank_by: str, records: Mapping[int, Mapping[str, Any]]) -> None:
    if rank_by == "verdicts":
        return
    known = sorted({k for r in records.values() for k in downstream_gains(r)})
    if records and rank_by not in known:
        raise ValueError(f"--rank-by: expected verdicts or one of {', '.join(known)}; got {rank_by!r}")


def format_ranking(report: StageReport, rank_by: str = "verdicts") -> str:
    """The evaluated trials ranked by ``rank_by``, one line each, best first.

    Raises:
        ValueError: ``rank_by`` is neither ``verdicts`` nor a recorded gain.
    """
    _check_rank(rank_by, report.records)
    rows = []
    for t in report.trials:
        record = report.records.get(t.number)
        if record is None:
            continue
        score = rank_key(rank_by, record)
        verdicts = list((record.get("verdicts") or {}).values())
        rows.append((t, score, verdicts))
    rows.sort(key=lambda r: (math.isnan(r[1]), -r[1] if not math.isnan(r[1]) else 0.0, r[0].number))
    lines = [f"ranked by {rank_by} (best first):"]
    lines.append(f"  {'trial':<16} {rank_by:>14}  better  worse  within noise")
    for t, score, verdicts in rows:
        baseline = t.user_attrs.get(BASELINE_ATTR)
        label = f"#{t.number}" + (f" ({baseline})" if baseline else "")
        lines.append(
            f"  {label:<16} {score:>14.4g}  {verdicts.count('better'):>6}  {verdicts.count('worse'):>5}  "
            f"{verdicts.count('within noise'):>12}"
        )
    if report.missing:
        lines.append(f"no result for trial(s) {', '.join(map(str, report.missing))}: their evaluation failed")
    return "\n".join(lines)
