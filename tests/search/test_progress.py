"""The lines a worker logs for a person following it."""

from __future__ import annotations

import datetime as dt

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.objective import TrialOutcome
from search.progress import eta_s, format_duration, progress_line, trial_ended, trial_started

T0 = dt.datetime(2025, 1, 1, 12, 0, 0)


def outcome(**fields: object) -> TrialOutcome:
    base: dict[str, object] = {
        "values": [0.4727, 0.09768],
        "user_attrs": {},
        "system_attrs": {},
        "constraints": {"|mass_bias|<=0.15": 0.3, "collapse": 1.2},
        "stopped": None,
        "epochs_run": 30,
        "epochs": 30,
    }
    base.update(fields)
    return TrialOutcome(**base)  # type: ignore[arg-type]


def trial(state: TrialState, seconds: float | None = None, **user_attrs: object) -> FrozenTrial:
    done = state in (TrialState.COMPLETE, TrialState.FAIL)
    return optuna.trial.FrozenTrial(
        number=0,
        state=state,
        value=None,
        values=[1.0, 1.0] if state == TrialState.COMPLETE else None,
        datetime_start=T0 if state != TrialState.WAITING else None,
        datetime_complete=T0 + dt.timedelta(seconds=seconds or 0) if done else None,
        params={},
        distributions={},
        user_attrs=dict(user_attrs),
        system_attrs={},
        intermediate_values={},
        trial_id=0,
    )


def test_a_start_names_the_baseline_or_the_parameters_in_short() -> None:
    assert trial_started(0, {"loss.beta_kl": 0.05}, "v4") == "trial 0 started: baseline v4"
    params = {"loss.beta_kl": 0.0123456, "loss.free_bits": 0.5, "model.output": "copula"}
    assert trial_started(7, params, None) == "trial 7 started: beta_kl=0.01235 free_bits=0.5 output=copula"
    # A last part shared by two fields keeps the full names.
    assert trial_started(8, {"a.lr": 0.1, "b.lr": 0.2}, None, retry_of=3) == (
        "trial 8 started: a.lr=0.1 b.lr=0.2 (retry of trial 3)"
    )


def test_an_end_gives_values_feasibility_epochs_and_duration() -> None:
    stopped = outcome(stopped="collapsed at epoch 15: spread_norm=0.04 < 0.08", epochs_run=15)
    assert trial_ended(1, stopped, ["diversity", "ks_stat"], 62.4) == (
        "trial 1 complete in 1 min 2 s: diversity=0.4727 ks_stat=0.09768; "
        "infeasible (|mass_bias|<=0.15, collapse); "
        "stopped at epoch 15/30: collapsed at epoch 15: spread_norm=0.04 < 0.08"
    )
    fine = outcome(constraints={"|mass_bias|<=0.15": -0.1, "collapse": 0.0})
    assert trial_ended(2, fine, ["diversity", "ks_stat"], 9.0).endswith("; feasible; 30/30 epochs")


def test_the_eta_comes_from_measured_trial_times_and_the_trials_at_once() -> None:
    assert eta_s(6, [], 2) is None
    assert eta_s(6, [50.0, 70.0], 2) == 180.0  # 3 rounds of 60 s
    assert eta_s(5, [60.0], 2) == 180.0  # the odd one takes a round of its own
    assert eta_s(1, [60.0], 4) == 60.0
    assert eta_s(0, [60.0], 1) == 0.0
    assert format_duration(3725) == "1 h 2 min"


def test_progress_counts_against_the_budget() -> None:
    trials = [
        trial(TrialState.COMPLETE, 60),
        trial(TrialState.COMPLETE, 80),
        trial(TrialState.COMPLETE, 1, result_from_trial=0),  # recorded at once: not a measure
        trial(TrialState.FAIL, 5),
        trial(TrialState.RUNNING),
        trial(TrialState.WAITING),
    ]
    assert progress_line(trials, 10) == (
        "progress: 3/10 complete, 1 failed, 1 running, 1 waiting; "
        "ETA 4 min 40 s (1 min 10 s a trial over 2 trials, 2 at once)"
    )
    assert progress_line(trials[3:], 10).endswith("ETA after the first complete trial")
    assert progress_line(trials[:3], 3).endswith("0 running, 0 waiting; budget finished")
