from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.downstream_stage import RECORD_ATTR_PREFIX
from search.status import format_status, study_status
from search.storage import StorageSettings, open_storage
from tests.search.constructed_studies import (
    COLLAPSE,
    MASS,
    add_trial,
    distributions,
    make_definition,
    new_study,
    run_baseline,
    sqlite_storage,
    story_baselines,
)


def test_counts_and_front(tmp_path: Path) -> None:
    definition = make_definition(baselines=story_baselines(), n_trials=12)
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    v3 = run_baseline(study, definition, [0.02, 0.9], constraints={MASS: -0.1, COLLAPSE: 2.0})
    add_trial(study, definition, [0.9, 0.05], constraints={MASS: 0.4, COLLAPSE: 0.0})
    a = add_trial(study, definition, [0.5, 0.6])
    b = add_trial(study, definition, [0.45, 0.25])
    add_trial(study, definition, [0.4, 0.7])
    study.add_trial(
        optuna.create_trial(
            state=TrialState.FAIL, params={}, distributions={}, user_attrs={"fail_reason": "oom"}
        )
    )

    status = study_status(study, definition, study._storage)

    assert status.budget == 12
    assert status.counts["COMPLETE"] == 5 and status.finished == 5
    assert (status.counts["WAITING"], status.counts["FAIL"], status.counts["RUNNING"]) == (
        1,
        1,
        0,
    )  # v4 waits
    assert [f.number for f in status.front] == [a.number, b.number]
    assert status.front[1].values == {"diversity": 0.45, "ks_stat": 0.25}
    assert v3.number not in {f.number for f in status.front}
    assert status.failed_stale == [] and status.running == []
    text = format_status(status)
    assert "5/12 trials finished" in text
    assert "1 waiting, 1 failed" in text
    assert "feasible Pareto front (2 trials)" in text
    assert f"#{b.number} " in text and "0.45" in text
    assert "heartbeat" not in text
    assert "downstream" not in text


def test_status_shows_the_downstream_gains_beyond_noise(tmp_path: Path) -> None:
    definition = make_definition(baselines=story_baselines())
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    v3 = run_baseline(study, definition, [0.02, 0.9])
    a = add_trial(study, definition, [0.5, 0.6])
    gains = {"downstream_csi_p99_gain": 0.125, "downstream_rmse_gain": -0.5, "downstream_mae_gain": 0.001}
    verdicts = {"downstream_csi_p99_gain": "better", "downstream_rmse_gain": "worse"}
    verdicts["downstream_mae_gain"] = "within noise"
    for trial in (v3, a):
        study._storage.set_study_system_attr(
            study._study_id, f"{RECORD_ATTR_PREFIX}{trial.number}", {"gains": gains, "verdicts": verdicts}
        )
    status = study_status(study, definition, study._storage)
    assert set(status.downstream) == {v3.number, a.number}
    lines = format_status(status).splitlines()
    assert "downstream (cvae-search downstream; 2 trials):" in lines
    line = next(x for x in lines if x.strip().startswith(f"#{v3.number} (v3)"))
    assert "1 better, 1 worse, 1 within noise" in line
    assert line.endswith("rmse -0.5 (worse), csi_p99 +0.125 (better)"), "noise is left out, largest first"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_trial_without_heartbeats_is_failed_and_retried(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = StorageSettings(heartbeat_interval=1, grace_period=2)
    if backend == "sqlite":
        url, storage = sqlite_storage(tmp_path, settings)
    else:
        url = request.getfixturevalue("pg_url")
        storage = open_storage(url, settings)
    definition = make_definition(name=f"status-{backend}")
    study = new_study(definition, storage)
    dead = study.ask(distributions(definition))
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3)  # longer than the grace period: the worker of `dead` is gone
    alive = study.ask(distributions(definition))
    storage.record_heartbeat(alive._trial_id)
    # A trial that never beat: SearchStorage beats once when a trial starts, so this one is
    # asked through a plain RDB storage on the same database.
    plain = optuna.load_study(study_name=study.study_name, storage=optuna.storages.RDBStorage(url))
    quiet = plain.ask(distributions(definition))

    status = study_status(study, definition, storage)

    assert status.failed_stale == [dead.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[dead.number] == TrialState.FAIL
    retry = status.reenqueued[dead.number]
    assert states[retry] == TrialState.WAITING
    assert study.trials[retry].params == dead.params
    assert [r.number for r in status.running] == [alive.number, quiet.number]
    assert status.running[0].heartbeat_age_s is not None and status.running[0].heartbeat_age_s >= 0
    assert status.running[1].heartbeat_age_s is None
    assert (status.counts["RUNNING"], status.counts["FAIL"], status.counts["WAITING"]) == (2, 1, 1)
    text = format_status(status)
    assert f"stopped sending heartbeats: #{dead.number} (re-enqueued #{dead.number} as #{retry})" in text
    assert f"#{alive.number}  started" in text and "last heartbeat" in text
    assert f"#{quiet.number}  started" in text and "no heartbeat yet" in text
    assert "feasible Pareto front: empty" in text
