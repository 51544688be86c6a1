"""Where a study stands: trial counts against its budget, the feasible front, and live workers.

Before counting, trials whose workers stopped beating are failed with their ``fail_reason``
(and re-enqueued, within the study's retry limit) by :func:`search.storage.reap_stale_trials`,
under the study lock, so a dead worker's trial shows as failed rather than running forever.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from search.definition import StudyDefinition
from search.downstream_stage import downstream_gains, downstream_records
from search.halving import halving_summary
from search.storage import reap_stale_trials
from search.study import BASELINE_ATTR

__all__ = ["FrontTrial", "RunningTrial", "StudyStatus", "format_status", "study_status"]


@dataclass
class FrontTrial:
    number: int
    values: dict[str, float]
    """Objective values by metric name."""
    baseline: str | None = None


@dataclass
class RunningTrial:
    number: int
    started: dt.datetime | None
    heartbeat_age_s: float | None
    """Seconds since the trial's last heartbeat, by the database's clock (``None``: none recorded,
    or a storage that keeps no heartbeats)."""


@dataclass
class StudyStatus:
    study: str
    budget: int
    counts: dict[str, int]
    """Trials by state name (``COMPLETE``, ``RUNNING``, ...), every state present."""
    front: list[FrontTrial]
    running: list[RunningTrial]
    failed_stale: list[int] = field(default_factory=list)
    """Trials this status call found stale and failed."""
    reenqueued: dict[int, int] = field(default_factory=dict)
    """Failed stale trial -> the waiting trial that retries it."""
    grace_period_s: int | None = None
    halving: list[str] = field(default_factory=list)
    """Per rung, trials that reached it and were halved there; the latest halved, with why."""
    downstream: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Trial number -> its downstream result (:func:`search.downstream_stage.downstream_records`)."""
    baselines: dict[int, str] = field(default_factory=dict)
    """Trial number -> baseline name, for the study's baseline trials."""

    @property
    def finished(self) -> int:
        """Trials that count towards the budget as done (complete or pruned)."""
        return self.counts["COMPLETE"] + self.counts["PRUNED"]


def _heartbeat_ages(storage: BaseStorage, trial_ids: list[int]) -> dict[int, float]:
    """Seconds since each trial's last heartbeat, measured by the database clock.

    Optuna's RDB storage has no public reader for heartbeats; this reads its heartbeat table
    the way its own stale-trial check does.
    """
    if not isinstance(storage, RDBStorage) or not trial_ids:
        return {}
    import sqlalchemy
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        now = session.execute(sqlalchemy.func.now()).scalar()
        assert now is not None
        # PostgreSQL answers with an aware time; heartbeats are stored naive in the same zone.
        now = now.replace(tzinfo=None)
        beats = (
            session.query(models.TrialHeartbeatModel)
            .filter(models.TrialHeartbeatModel.trial_id.in_(trial_ids))
            .all()
        )
        return {b.trial_id: (now - b.heartbeat).total_seconds() for b in beats}
    finally:
        storage.scoped_session.remove()


def study_status(study: optuna.Study, definition: StudyDefinition, storage: BaseStorage) -> StudyStatus:
    """Fail stale trials, then summarise the study.

    Args:
        study: The study, loaded from ``storage``.
        definition: Its definition (budget, objective names).
        storage: The study's storage; heartbeats are read from it when it keeps them.
    """
    running_before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    reap_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    failed_stale = sorted(
        t.number for t in trials if t.state == TrialState.FAIL and t.number in running_before
    )
    reenqueued = {}
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        if t.state == TrialState.WAITING and history and history[-1] in failed_stale:
            reenqueued[history[-1]] = t.number

    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    front = [
        FrontTrial(
            t.number, dict(zip(definition.metric_names, t.values, strict=True)), t.user_attrs.get("baseline")
        )
        for t in sorted(study.best_trials, key=lambda t: t.number)
    ]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    ages = _heartbeat_ages(storage, [t._trial_id for t in running])
    return StudyStatus(
        study=study.study_name,
        budget=definition.n_trials,
        counts=counts,
        front=front,
        running=[RunningTrial(t.number, t.datetime_start, ages.get(t._trial_id)) for t in running],
        failed_stale=failed_stale,
        reenqueued=reenqueued,
        grace_period_s=storage.grace_period if isinstance(storage, RDBStorage) else None,
        halving=halving_summary(trials, definition.halving.rungs or []) if definition.halving else [],
        downstream=downstream_records(study),
        baselines={t.number: t.user_attrs[BASELINE_ATTR] for t in trials if t.user_attrs.get(BASELINE_ATTR)},
    )


MAIN_GAINS = 4
"""Gains shown per trial by ``status``: those whose verdict is not "within noise", largest first."""


def _downstream_line(number: int, baseline: str | None, record: dict[str, Any]) -> str:
    gains = downstream_gains(record)
    verdicts = record.get("verdicts") or {}
    counts = {v: list(verdicts.values()).count(v) for v in ("better", "worse", "within noise")}
    decided = sorted(
        (k for k in gains if verdicts.get(k) in ("better", "worse")), key=lambda k: -abs(gains[k])
    )
    shown = ", ".join(
        f"{k.removeprefix('downstream_').removesuffix('_gain')} {gains[k]:+.3g} ({verdicts[k]})"
        for k in decided[:MAIN_GAINS]
    )
    label = f"#{number}" + (f" ({baseline})" if baseline else "")
    tally = ", ".join(f"{n} {v}" for v, n in counts.items())
    return f"  {label:<10} {tally}" + (f"; {shown}" if shown else "; no gain beyond noise")


def format_status(status: StudyStatus) -> str:
    """``status`` as a few lines of text for the terminal."""
    c = status.counts
    lines = [
        f"study {status.study}: {status.finished}/{status.budget} trials finished "
        f"({c['COMPLETE']} complete, {c['PRUNED']} pruned); {c['RUNNING']} running, "
        f"{c['WAITING']} waiting, {c['FAIL']} failed"
    ]
    if status.failed_stale:
        retried = ", ".join(f"#{old} as #{new}" for old, new in sorted(status.reenqueued.items()))
        lines.append(
            f"failed {len(status.failed_stale)} trial(s) whose worker stopped sending heartbeats: "
            + ", ".join(f"#{n}" for n in status.failed_stale)
            + (f" (re-enqueued {retried})" if retried else " (not re-enqueued: retry limit reached)")
        )
    lines.extend(status.halving)
    if status.front:
        names = list(status.front[0].values)
        lines.append(f"feasible Pareto front ({len(status.front)} trials):")
        lines.append("  " + "  ".join(["trial".ljust(7), *(n.rjust(12) for n in names)]))
        for f in status.front:
            label = f"#{f.number}" + (f" ({f.baseline})" if f.baseline else "")
            lines.append("  " + "  ".join([label.ljust(7), *(f"{f.values[n]:12.4g}" for n in names)]))
    else:
        lines.append("feasible Pareto front: empty (no complete trial satisfies every constraint yet)")
    if status.downstream:
        lines.append(f"downstream (cvae-search downstream; {len(status.downstream)} trials):")
        for number, record in sorted(status.downstream.items()):
            lines.append(_downstream_line(number, status.baselines.get(number), record))
    if status.running:
        lines.append("running:")
        for r in status.running:
            started = r.started.isoformat(sep=" ", timespec="seconds") if r.started else "-"
            beat = (
                "no heartbeat yet"
                if r.heartbeat_age_s is None
                else f"last heartbeat {r.heartbeat_age_s:.0f} s ago"
            )
            lines.append(f"  #{r.number}  started {started}  {beat}")
    return "\n".join(lines)
