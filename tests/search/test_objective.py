"""Collapse handling: the early-stopping watcher, the constraints a trial records, and what the
constraint-aware sampler makes of them."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy

import search.objective
from model.trainer import EpochReport, TrainResult, train
from search.definition import Collapse, StudyDefinition, load_definition
from search.objective import CollapseWatcher, TrialObjective, constraint_values, suggest
from search.storage import search_storage
from tests.search.constructed_studies import new_study, sqlite_storage

RULE = Collapse(after_epoch=2, min_spread_norm=0.05, min_z_usage=0.02)
HEALTHY = {"spread_norm": 0.2, "z_usage": 0.1, "mass_bias": 0.05, "spatial_correlation": 0.55}


def report(epoch: int, probe: dict[str, float], probed: list[int] | None = None) -> EpochReport:
    def run_probe() -> dict[str, float]:
        if probed is not None:
            probed.append(epoch)
        return probe

    return EpochReport(
        epoch=epoch, epochs=10, losses={"total": 1.0}, samples_per_s=1.0, elapsed_s=1.0, probe=run_probe
    )


def test_the_watcher_waits_for_the_warm_up() -> None:
    probed: list[int] = []
    watcher = CollapseWatcher(RULE)
    assert watcher(report(1, {"spread_norm": 0.0, "z_usage": 0.0}, probed)) is None
    assert probed == []  # the probe costs a forward pass: not run before it can matter


@pytest.mark.parametrize(
    ("probe", "low"),
    [
        ({"spread_norm": 0.01, "z_usage": 0.1}, ["spread_norm=0.01 < 0.05"]),
        ({"spread_norm": 0.2, "z_usage": 0.001}, ["z_usage=0.001 < 0.02"]),
        ({"spread_norm": math.nan, "z_usage": 0.1}, ["spread_norm=nan < 0.05"]),
        ({"spread_norm": 0.0, "z_usage": -0.01}, ["spread_norm=0 < 0.05", "z_usage=-0.01 < 0.02"]),
    ],
)
def test_the_watcher_stops_a_collapsed_model(probe: dict[str, float], low: list[str]) -> None:
    assert CollapseWatcher(RULE)(report(3, probe)) == "collapsed at epoch 3: " + ", ".join(low)


def test_the_watcher_lets_a_healthy_model_train() -> None:
    assert CollapseWatcher(RULE)(report(2, {"spread_norm": 0.05, "z_usage": 0.02})) is None


# --- constraints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def definition(tiny_study: Callable[..., Path]) -> StudyDefinition:
    return load_definition(
        tiny_study(
            "constraints",
            constraints=[
                {"metric": "mass_bias", "max": 0.15, "abs": True},
                {"metric": "spatial_correlation", "min": 0.5, "max": 0.6},
            ],
            collapse={"after_epoch": 2, "min_spread_norm": 0.05, "min_z_usage": 0.02},
        )
    )


def test_a_healthy_trial_is_feasible(definition: StudyDefinition) -> None:
    values = constraint_values(definition, HEALTHY, None)
    assert set(values) == {
        "|mass_bias|<=0.15",
        "spatial_correlation>=0.5",
        "spatial_correlation<=0.6",
        "collapse",
    }
    assert all(v <= 0 for v in values.values())


def test_a_collapsed_trial_violates_the_collapse_constraint(definition: StudyDefinition) -> None:
    stopped = "collapsed at epoch 2: spread_norm=0.01 < 0.05"
    values = constraint_values(definition, {**HEALTHY, "spread_norm": 0.01}, stopped)
    assert values["collapse"] == pytest.approx(1.0 + (1 - 0.01 / 0.05))
    # Graded: a model nearer the floors violates it less, which is what the sampler ranks by.
    nearer = constraint_values(definition, {**HEALTHY, "spread_norm": 0.04}, stopped)["collapse"]
    assert 0 < nearer - 1.0 < values["collapse"] - 1.0
    # Low signals at the end of training violate it even when training was not stopped.
    assert constraint_values(definition, {**HEALTHY, "z_usage": 0.0}, None)["collapse"] == pytest.approx(1.0)


@pytest.mark.parametrize("metric", ["spread_norm", "z_usage", "mass_bias", "spatial_correlation"])
@pytest.mark.parametrize("missing", [math.nan, math.inf, None])
def test_a_metric_that_could_not_be_measured_violates_its_constraint(
    definition: StudyDefinition, metric: str, missing: float | None
) -> None:
    metrics = dict(HEALTHY)
    if missing is None:
        del metrics[metric]
    else:
        metrics[metric] = missing
    values = constraint_values(definition, metrics, None)
    assert all(math.isfinite(v) for v in values.values())  # Optuna refuses NaN constraints
    violated = {k for k, v in values.items() if v > 0}
    expected = "collapse" if metric in ("spread_norm", "z_usage") else metric
    assert violated and all(expected in k for k in violated)


# --- the sampler learns where collapse lies -------------------------------------------------------


def stand_in_metrics(beta_kl: float, free_bits: float) -> tuple[dict[str, float], str | None]:
    """Cheap stand-in for training. Collapse where the KL is strong and free bits are few
    (``beta_kl > 0.03`` and ``free_bits < 0.3``); there the KS statistic even looks better (a
    collapsed model still gets the mean field right), so only the constraint gives it away."""
    strength = (math.log10(beta_kl) + 3) / 3  # 0 .. 1 over the space
    collapsed = beta_kl > 0.03 and free_bits < 0.3
    metrics = {
        **HEALTHY,
        "diversity": 0.6 - 0.4 * abs(free_bits - 0.7),
        "ks_stat": 0.4 - 0.25 * strength - (0.1 if collapsed else 0.0),
    }
    if collapsed:
        metrics.update(spread_norm=0.01, z_usage=0.0)
        return metrics, "collapsed at epoch 2: spread_norm=0.01 < 0.05, z_usage=0 < 0.02"
    return metrics, None


def collapsed_fraction(definition: StudyDefinition, sampler: optuna.samplers.BaseSampler) -> float:
    """Fraction of collapsed trials among the last 20 of 40, recorded as a worker records them."""
    study = optuna.create_study(directions=definition.directions, sampler=sampler)
    collapsed = []
    for _ in range(40):
        trial = study.ask()
        params = {name: suggest(trial, name, p) for name, p in definition.space.items()}
        metrics, stopped = stand_in_metrics(params["loss.beta_kl"], params["loss.free_bits"])
        for key, value in constraint_values(definition, metrics, stopped).items():
            trial.set_constraint(key, value)
        study.tell(trial, [metrics[o.metric] for o in definition.objectives])
        collapsed.append(stopped is not None)
    return sum(collapsed[20:]) / 20


def test_the_constraint_aware_sampler_proposes_fewer_collapsed_models_than_random(
    definition: StudyDefinition,
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = range(6)
    tpe = [collapsed_fraction(definition, definition.make_sampler(seed)) for seed in seeds]
    rand = [collapsed_fraction(definition, optuna.samplers.RandomSampler(seed=seed)) for seed in seeds]
    assert sum(tpe) / len(tpe) < 0.5 * sum(rand) / len(rand), (tpe, rand)


# --- what a trial records -------------------------------------------------------------------------


def test_a_trial_records_everything_after_training_in_one_commit(
    tiny_study: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = load_definition(tiny_study("one-commit", epochs=1))
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    engine = search_storage(study._storage).engine  # type: ignore[union-attr]
    commits: list[object] = []

    def count_commit(conn: object) -> None:
        commits.append(conn)

    def train_then_count(*args: Any, **kwargs: Any) -> TrainResult:
        result = train(*args, **kwargs)
        sqlalchemy.event.listen(engine, "commit", count_commit)
        return result

    monkeypatch.setattr(search.objective, "train", train_then_count)
    trial = study.ask()
    try:
        values = TrialObjective(definition, artifact_dir=tmp_path / "artifacts")(trial)
    finally:
        sqlalchemy.event.remove(engine, "commit", count_commit)
    study.tell(trial, values)
    assert len(commits) == 1
    done = study.trials[0]
    assert {"metrics", "losses", "timings", "runtime", "history", "normalization"} <= set(done.user_attrs)
    bounds = {"|mass_bias|<=0.15", "spatial_correlation>=0.5", "spatial_correlation<=0.6"}
    assert set(done.constraints) == bounds
    assert sum(k.startswith("artifacts:") for k in done.system_attrs) == 3
