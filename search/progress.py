"""The lines a worker logs for a person following it: a trial starts, a trial ends, and
where the study stands (complete / budget, failures, an ETA from measured trial times).

Trials are named by their number in the study, as the dashboard, ``status`` and exports name
them, never by the storage's row id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search.objective import TrialOutcome

__all__ = ["eta_s", "format_duration", "progress_line", "trial_ended", "trial_started"]

RESULT_FROM_ATTR = "result_from_trial"
"""User attribute of a trial whose result was trained by an earlier attempt (its number), which
was failed as stale while its worker was cut off from the storage and finished anyway."""


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _short_names(names: Sequence[str]) -> dict[str, str]:
    """Each dotted field by its last part, where that part is unique among ``names``."""
    last = [n.rsplit(".", 1)[-1] for n in names]
    return {n: short if last.count(short) == 1 else n for n, short in zip(names, last, strict=True)}


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_started(
    number: int, params: Mapping[str, Any], baseline: str | None, retry_of: int | None = None
) -> str:
    """``trial 7 started: beta_kl=0.0123 free_bits=0.45 (retry of trial 3)``."""
    if baseline is not None:
        what = f"baseline {baseline}"
    elif params:
        short = _short_names(list(params))
        what = " ".join(f"{short[k]}={_value(v)}" for k, v in params.items())
    else:
        what = "no searched parameters"
    again = f" (retry of trial {retry_of})" if retry_of is not None else ""
    return f"trial {number} started: {what}{again}"


def trial_ended(number: int, outcome: TrialOutcome, metric_names: Sequence[str], seconds: float) -> str:
    """``trial 7 complete in 1 min 2 s: diversity=0.47 ks_stat=0.098; infeasible (collapse);
    stopped at epoch 15/30: collapsed at epoch 15: ...``."""
    values = " ".join(f"{n}={_value(v)}" for n, v in zip(metric_names, outcome.values, strict=True))
    violated = outcome.violated
    feasible = f"infeasible ({', '.join(violated)})" if violated else "feasible"
    if outcome.stopped:
        epochs = f"stopped at epoch {outcome.epochs_run}/{outcome.epochs}: {outcome.stopped}"
    else:
        epochs = f"{outcome.epochs_run}/{outcome.epochs} epochs"
    return f"trial {number} complete in {format_duration(seconds)}: {values}; {feasible}; {epochs}"


def eta_s(remaining: int, durations: Sequence[float], parallel: int) -> float | None:
    """Seconds until ``remaining`` trials are done, ``parallel`` at a time, at the mean of the
    measured ``durations``; ``None`` before any trial has been measured."""
    if remaining <= 0:
        return 0.0
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    return math.ceil(remaining / max(1, min(parallel, remaining))) * mean


def progress_line(trials: Sequence[FrozenTrial], budget: int) -> str:
    """``progress: 5/14 complete, 1 failed, 1 running, 0 waiting; ETA 4 min 10 s (62 s a trial
    over 5 trials, 2 at once)``, as a worker logs it when one of its trials has ended.

    Args:
        trials: The study's trials.
        budget: The study's ``n_trials``.
    """
    counts = dict.fromkeys(TrialState, 0)
    for t in trials:
        counts[t.state] += 1
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.datetime_start is not None
        and t.datetime_complete is not None
        and RESULT_FROM_ATTR not in t.user_attrs  # recorded at once, trained by another attempt
    ]
    parallel = counts[TrialState.RUNNING] + 1  # the others' trials, and this worker's next
    eta = eta_s(budget - done, durations, parallel)
    if done >= budget:
        when = "budget finished"
    elif eta is None:
        when = "ETA after the first complete trial"
    else:
        mean = sum(durations) / len(durations)
        over = f"{len(durations)} trial" + ("s" if len(durations) > 1 else "")
        when = f"ETA {format_duration(eta)} ({format_duration(mean)} a trial over {over}, {parallel} at once)"
    return (
        f"progress: {done}/{budget} complete, {counts[TrialState.FAIL]} failed, "
        f"{counts[TrialState.RUNNING]} running, {counts[TrialState.WAITING]} waiting; {when}"
    )
