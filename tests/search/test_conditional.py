"""Conditional parameters (``when``): a field is searched only where it takes effect, the base
or baseline value holds elsewhere, and TPE models it within its condition."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from model.config import load_config
from search.definition import StudyDefinition, load_definition
from search.export import export_trial
from search.objective import TrialObjective, suggest_space
from search.report import write_report
from search.study import BASELINE_ATTR
from tests.search.constructed_studies import new_study, sqlite_storage

FREE_BITS_MODES = ["free_bits_sample", "free_bits_batch"]
SPACE = {
    "loss.kl_mode": {"type": "categorical", "choices": ["plain", *FREE_BITS_MODES]},
    "loss.free_bits": {"type": "float", "low": 0.0, "high": 1.0, "when": {"loss.kl_mode": FREE_BITS_MODES}},
    "loss.beta_kl": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
    "model.output": {"type": "categorical", "choices": ["regression", "copula"]},
    "model.noise_length": {
        "type": "float",
        "low": 0.5,
        "high": 4.0,
        "when": {"model.output": ["copula"], "loss.kl_mode": FREE_BITS_MODES},
    },
}


@pytest.fixture(scope="module")
def definition(tiny_study: Callable[..., Path]) -> StudyDefinition:
    # The baseline's free_bits lies outside the space, allowed because its plain KL ignores it.
    baselines = {"plain": {"loss.kl_mode": "plain", "loss.free_bits": 5.0, "loss.beta_kl": 0.05}}
    return load_definition(tiny_study("conditional", space=SPACE, baselines=baselines, epochs=1))


def test_a_field_is_searched_only_where_its_condition_holds(definition: StudyDefinition) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=definition.directions, sampler=optuna.samplers.RandomSampler(0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = suggest_space(trial, definition.space)
        free_bits_on = params["loss.kl_mode"] != "plain"
        assert ("loss.free_bits" in params) == free_bits_on
        assert ("model.noise_length" in params) == (free_bits_on and params["model.output"] == "copula")
        cfg = definition.config_for(params)
        if not free_bits_on:
            assert cfg.loss.free_bits == definition.base.loss.free_bits
        seen.add((free_bits_on, "model.noise_length" in params))
        study.tell(trial, [0.0, 0.0])
    assert seen == {(False, False), (True, False), (True, True)}


def test_a_baseline_enqueues_only_the_fields_it_searches(definition: StudyDefinition) -> None:
    assert definition.baseline_params("plain") == {
        "loss.kl_mode": "plain",
        "loss.beta_kl": 0.05,
        "model.output": "regression",
    }


def test_conditions_survive_storage_and_flat_fields_store_as_before(definition: StudyDefinition) -> None:
    data = json.loads(json.dumps(definition.to_dict()))
    assert data["space"]["loss.free_bits"]["when"] == {"loss.kl_mode": FREE_BITS_MODES}
    # No `when` key on a flat field: studies stored before conditions existed keep their digest.
    assert "when" not in data["space"]["loss.beta_kl"]
    stored = StudyDefinition.from_dict(data)
    assert stored.space == definition.space
    assert stored.digest() == definition.digest()


def test_tpe_models_a_conditional_field_jointly_within_its_condition(definition: StudyDefinition) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = definition.make_sampler()
    study = optuna.create_study(directions=definition.directions, sampler=sampler)
    for _ in range(12):
        trial = study.ask()
        params = suggest_space(trial, definition.space)
        study.tell(trial, [params["loss.beta_kl"], params.get("loss.free_bits", 1.0)])
    # Without `group` the multivariate model covers only the fields every trial has, and the
    # conditional ones fall back to independent sampling.
    relative = sampler.infer_relative_search_space(study, study.ask()._cached_frozen_trial)
    assert {"loss.free_bits", "model.noise_length", "loss.beta_kl"} <= set(relative)


def test_a_trial_trains_and_exports_with_the_baseline_value_of_an_unsearched_field(
    definition: StudyDefinition, tmp_path: Path
) -> None:
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    trial = study.ask()
    assert trial.user_attrs[BASELINE_ATTR] == "plain"
    study.tell(trial, TrialObjective(definition, artifact_dir=tmp_path / "artifacts")(trial))
    done = study.trials[0]
    assert done.state == optuna.trial.TrialState.COMPLETE
    assert set(done.params) == {"loss.kl_mode", "loss.beta_kl", "model.output"}
    out = export_trial(study, definition, done, tmp_path / "plain.yaml", storage_url="sqlite:///x.db")
    cfg = load_config(out)
    assert (cfg.loss.kl_mode, cfg.loss.free_bits) == ("plain", 5.0)


def test_importances_rank_fields_searched_so_far_and_leave_the_rest_out(
    definition: StudyDefinition, tmp_path: Path
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=definition.directions, sampler=optuna.samplers.RandomSampler(1))
    for _ in range(12):
        # No trial runs the copula here, so noise_length has never been searched.
        study.enqueue_trial({"model.output": "regression"})
        trial = study.ask()
        params = suggest_space(trial, definition.space)
        study.tell(trial, [params["loss.beta_kl"], 1.0 - params["loss.beta_kl"]])
    written = write_report(study, definition, tmp_path)
    rows = (tmp_path / "importances.csv").read_text().splitlines()
    assert "importances.csv" in written, written
    by_param = {line.split(",")[0]: line.split(",")[1:] for line in rows[1:]}
    assert set(by_param) == set(definition.space)
    assert all(v == "nan" for v in by_param["model.noise_length"])
    assert any(float(v) > 0 for v in by_param["loss.beta_kl"])
