"""A downstream gain as a study's objective or constraint: named from the registry, measured by
training SRDRN on each trial's cVAE, recorded with the trial."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from model.config import ConfigError
from search.definition import StudyDefinition, load_definition
from search.objective import TrialObjective
from search.study import DOWNSTREAM_ATTR
from tests.conftest import TINY_DOWNSTREAM
from tests.search.constructed_studies import new_study, sqlite_storage


@pytest.fixture(scope="module")
def definition(tiny_study: Callable[..., Path]) -> StudyDefinition:
    return load_definition(
        tiny_study(
            "downstream-objective",
            overrides=TINY_DOWNSTREAM,
            objectives=[
                {"metric": "diversity", "direction": "maximize"},
                {"metric": "downstream_csi_p95_gain"},
            ],
            constraints=[{"metric": "downstream_rmse_gain", "min": -1000.0}],
        )
    )


def test_a_gain_is_named_like_any_metric_and_maximised(definition: StudyDefinition) -> None:
    assert definition.directions == ["maximize", "maximize"]
    assert definition.downstream_metrics == ["downstream_csi_p95_gain", "downstream_rmse_gain"]


def test_an_unknown_gain_names_the_scores_a_run_yields(tiny_study: Callable[..., Path]) -> None:
    path = tiny_study("unknown-gain", objectives=[{"metric": "downstream_csi_p90_gain"}])
    with pytest.raises(ConfigError) as e:
        load_definition(path)
    message = str(e.value)
    assert "objectives[0].metric" in message and "downstream_csi_p90_gain" in message
    assert "csi_p95" in message and "\n" not in message
    # The scores follow the study's downstream settings: a p90 threshold makes the name valid.
    ok = tiny_study(
        "p90-gain",
        overrides={"downstream.threshold_quantiles": [0.9]},
        objectives=[{"metric": "downstream_csi_p90_gain"}],
    )
    assert load_definition(ok).metric_names == ["downstream_csi_p90_gain"]


def test_a_trial_trains_srdrn_and_reports_the_gain(definition: StudyDefinition, tmp_path: Path) -> None:
    _, storage = sqlite_storage(tmp_path)
    study = new_study(definition, storage)
    trial = study.ask()
    values = TrialObjective(definition, artifact_dir=tmp_path / "artifacts")(trial)
    study.tell(trial, values)
    done = study.trials[0]
    record = done.user_attrs[DOWNSTREAM_ATTR]
    assert values[1] == pytest.approx(record["gains"]["downstream_csi_p95_gain"])
    assert values[0] == done.user_attrs["metrics"]["diversity"]
    assert done.constraints == {
        "downstream_rmse_gain>=-1000": -1000.0 - record["gains"]["downstream_rmse_gain"]
    }
    assert "the same 8 optimiser steps" in record["table"]
    uploaded = {k for k in done.system_attrs if k.startswith("artifacts:")}
    assert len(uploaded) == 6  # samples, metrics, config, and the downstream result and figures
