from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial

from model.config import Config, Normalization, load_config, with_overrides
from model.trainer import train
from search.definition import Collapse, Param, StudyDefinition
from search.downstream_stage import RECORD_ATTR_PREFIX
from search.export import NoFeasibleTrial, export_trial, pick_trial, verify_trial
from search.objective import TrialObjective
from search.storage import open_storage
from tests.search.constructed_studies import (
    COLLAPSE,
    MASS,
    NORMALIZATION,
    add_trial,
    make_definition,
    new_study,
    run_baseline,
    sqlite_storage,
    story_baselines,
)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, dict[str, int]]:
    """Four front points, one dominated point and one infeasible point that dominates them all.

    Scaled to [0, 1] in minimisation orientation the front is A (1, 0), B (0.5, 0.2),
    C (0, 1), D (0.75, 0.0667): B is nearest the ideal point.
    """
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path_factory.mktemp("front"))[1])
    n = {}
    n["A"] = add_trial(study, definition, [0.1, 0.05]).number
    n["B"] = add_trial(study, definition, [0.5, 0.2], metrics={"crps": 0.7, "spread_norm": 0.3}).number
    n["C"] = add_trial(study, definition, [0.9, 0.8], metrics={"crps": 0.9}).number
    n["D"] = add_trial(study, definition, [0.3, 0.1], metrics={"crps": 0.5}).number
    n["dominated"] = add_trial(study, definition, [0.4, 0.5], metrics={"crps": 0.1}).number
    n["infeasible"] = add_trial(study, definition, [1.0, 0.0], constraints={MASS: 0.2, COLLAPSE: 0.0}).number
    return study, n


def _pick(study: optuna.Study, rule: str) -> int:
    return pick_trial(study, make_definition(), rule).number


def test_knee_picks_the_front_point_nearest_the_ideal(front: tuple[optuna.Study, dict[str, int]]) -> None:
    study, n = front
    assert _pick(study, "knee") == n["B"]


def test_knee_breaks_ties_by_lowest_trial_number(tmp_path: Path) -> None:
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    # Both ends of a two-point front lie at distance 1 from the ideal point.
    first = add_trial(study, definition, [0.2, 0.1])
    add_trial(study, definition, [0.8, 0.7])
    assert pick_trial(study, definition, "knee").number == first.number


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("max:diversity", "C"),
        ("min:diversity", "A"),
        ("min:ks_stat", "A"),
        ("max:ks_stat", "C"),
        (
            "min:crps",
            "D",
        ),  # a recorded metric, not an objective; the dominated trial's 0.1 is not on the front
        ("max:diversity@ks_stat<=0.2", "B"),
        ("max:diversity@ks_stat<=0.15", "D"),
        ("min:ks_stat@diversity>=0.4", "B"),
        ("max:diversity@crps<=0.8", "B"),
        (" max:diversity@spread_norm>=0.2 ", "B"),
    ],
)
def test_objective_and_bounded_rules(
    front: tuple[optuna.Study, dict[str, int]], rule: str, expected: str
) -> None:
    study, n = front
    assert _pick(study, rule) == n[expected]


def test_infeasible_trials_are_never_picked_even_when_they_dominate(
    front: tuple[optuna.Study, dict[str, int]],
) -> None:
    study, n = front
    for rule in ("knee", "max:diversity", "min:ks_stat", "max:diversity@ks_stat<=0.05"):
        assert _pick(study, rule) != n["infeasible"]


def test_a_bound_no_front_trial_meets_is_reported(front: tuple[optuna.Study, dict[str, int]]) -> None:
    study, _ = front
    with pytest.raises(NoFeasibleTrial, match=r"ks_stat<=0\.01.*0\.05\.\.0\.8"):
        _pick(study, "max:diversity@ks_stat<=0.01")


@pytest.mark.parametrize(
    "rule",
    [
        "",
        "kne",
        "max:",
        "max diversity",
        "best:diversity",
        "max:diversity@ks_stat<0.1",
        "max:diversity@ks_stat<=x",
    ],
)
def test_bad_rules_name_the_rule_and_the_accepted_forms(
    front: tuple[optuna.Study, dict[str, int]], rule: str
) -> None:
    study, _ = front
    with pytest.raises(ValueError, match="knee") as info:
        _pick(study, rule)
    assert repr(rule) in str(info.value)
    assert "max:METRIC@OTHER<=BOUND" in str(info.value)


def test_rules_on_unknown_metrics_are_refused(front: tuple[optuna.Study, dict[str, int]]) -> None:
    study, _ = front
    with pytest.raises(ValueError, match="no front trial has a value for 'nonesuch'"):
        _pick(study, "max:nonesuch")
    with pytest.raises(ValueError, match="'nonesuch'"):
        _pick(study, "max:diversity@nonesuch<=1")


def test_no_feasible_trial_says_why(tmp_path: Path) -> None:
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    with pytest.raises(NoFeasibleTrial, match="no complete trial yet"):
        pick_trial(study, definition)
    add_trial(study, definition, [0.5, 0.2], constraints={MASS: -0.1, COLLAPSE: 1.5})
    add_trial(study, definition, [0.6, 0.3], constraints={MASS: 0.3, COLLAPSE: 0.5})
    add_trial(study, definition, [0.7, 0.4], constraints={MASS: -0.2, COLLAPSE: 2.0})
    with pytest.raises(NoFeasibleTrial) as info:
        pick_trial(study, definition, "max:diversity")
    message = str(info.value)
    assert "3 complete, 3 infeasible" in message
    assert f"{COLLAPSE} (3 trials), {MASS} (1 trial)" in message


# --- export ------------------------------------------------------------------------------------


def _provenance(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["provenance"]


def test_export_round_trips_the_trials_config(tmp_path: Path) -> None:
    definition = make_definition()
    url, storage = sqlite_storage(tmp_path)
    study = new_study(definition, storage)
    params = {"loss.beta_kl": 0.375, "model.latent_dim": 24}
    trial = add_trial(study, definition, [0.5, 0.2], params=params)

    out = export_trial(study, definition, trial, tmp_path / "out" / "best.yaml", storage_url=url, rule="knee")

    expected = with_overrides(Config(), params)
    expected = replace(expected, normalization=Normalization(**NORMALIZATION))
    assert load_config(out) == expected
    p = _provenance(out)
    assert p["study"] == definition.name
    assert p["definition_digest"] == definition.digest()
    assert p["trial"] == trial.number
    assert p["pick"] == "knee"
    assert p["values"] == {"diversity": 0.5, "ks_stat": 0.2}
    assert p["constraints"] == {MASS: -0.1, COLLAPSE: 0.0}
    assert p["feasible"] is True
    assert p["metrics"]["crps"] == 1.0
    assert p["storage"] == url
    assert {"optuna", "torch", "cvae_search"} <= set(p["versions"])
    assert p["exported_at"].endswith("+00:00")
    assert "verify" not in p


def test_export_never_writes_the_storage_password(tmp_path: Path) -> None:
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    trial = add_trial(study, definition, [0.5, 0.2])
    out = export_trial(
        study, definition, trial, tmp_path / "best.yaml", storage_url="postgresql://user:secret@127.0.0.1/db"
    )
    assert "secret" not in out.read_text()
    assert _provenance(out)["storage"] == "postgresql://user:***@127.0.0.1/db"


def test_a_baseline_trial_exports_the_baselines_config(tmp_path: Path) -> None:
    definition = make_definition(baselines=story_baselines())
    url, storage = sqlite_storage(tmp_path)
    study = new_study(definition, storage)
    v3 = run_baseline(study, definition, [0.05, 0.6])
    out = export_trial(study, definition, v3, tmp_path / "v3.yaml", storage_url=url)
    cfg = load_config(out)
    # kl_mode is not searched: only the baseline's own config carries "plain".
    assert cfg.loss.kl_mode == "plain"
    assert replace(cfg, normalization=None) == story_baselines()["v3"]
    assert _provenance(out)["baseline"] == "v3"


def test_export_from_postgresql(tmp_path: Path, pg_url: str) -> None:
    definition = make_definition(name="export-pg")
    storage = open_storage(pg_url)
    study = new_study(definition, storage)
    trial = add_trial(study, definition, [0.5, 0.2], params={"loss.beta_kl": 0.5, "model.latent_dim": 32})
    add_trial(study, definition, [0.1, 0.1])
    picked = pick_trial(study, definition, "max:diversity")
    assert picked.number == trial.number
    out = export_trial(
        study, definition, picked, tmp_path / "best.yaml", storage_url=pg_url, rule="max:diversity"
    )
    assert load_config(out).model.latent_dim == 32
    assert _provenance(out)["storage"] == pg_url  # the test server has no password


# --- a trained trial ---------------------------------------------------------------------------


def tiny_config(data_path: Path) -> Config:
    return with_overrides(
        Config(),
        {
            "data.path": str(data_path),
            "data.synthetic.n_days": 96,
            "data.synthetic.height": 16,
            "data.synthetic.width": 16,
            "data.upscale_factor": 4,
            "model.latent_dim": 8,
            "model.channels": 8,
            "model.n_res_blocks": 1,
            "train.epochs": 2,
            "train.batch_size": 16,
            "train.device": "cpu",
            "eval.n_samples": 4,
            "eval.max_days": 16,
            "eval.plot_days": 1,
        },
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, StudyDefinition, FrozenTrial]:
    """One real trial of a tiny study, run as a worker runs it (ask, objective, tell)."""
    tmp = tmp_path_factory.mktemp("trained")
    # Floors no probe can fall below (z_usage may be slightly negative): the probe runs every
    # epoch, as in a real study, but never stops training.
    definition = make_definition(
        base=tiny_config(tmp / "synthetic.nc"),
        space={"loss.beta_kl": Param("float", 0.01, 0.2, log=True), "train.lr": Param("float", 1e-3, 3e-3)},
        collapse=Collapse(after_epoch=1, min_spread_norm=-1.0, min_z_usage=-1e9),
    )
    study = new_study(definition, sqlite_storage(tmp)[1])
    trial = study.ask()
    values = TrialObjective(definition, artifact_dir=tmp / "artifacts")(trial)
    study.tell(trial, values)
    return study, definition, study.trials[0]


def test_the_exported_config_reproduces_the_trials_values(
    trained: tuple[optuna.Study, StudyDefinition, FrozenTrial], tmp_path: Path
) -> None:
    study, definition, trial = trained
    out = export_trial(study, definition, trial, tmp_path / "best.yaml", storage_url="sqlite:///x.db")
    cfg = load_config(out)
    assert cfg.normalization == Normalization(**trial.user_attrs["normalization"])
    metrics = train(cfg).metrics
    for name, value in zip(definition.metric_names, trial.values, strict=True):
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


def test_verify_retrains_with_each_seed(
    trained: tuple[optuna.Study, StudyDefinition, FrozenTrial], tmp_path: Path
) -> None:
    study, definition, trial = trained
    seed = definition.base.train.seed
    result = verify_trial(definition, trial, [seed, seed + 1])
    assert result.seeds == [seed, seed + 1]
    for i, name in enumerate(definition.metric_names):
        values = result.values[name]
        assert len(values) == 2
        assert values[0] == pytest.approx(trial.values[i], abs=1e-6)  # the trial's own seed
        assert values[1] != values[0]
        assert result.mean[name] == pytest.approx(sum(values) / 2)
        assert result.std[name] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    out = export_trial(
        study, definition, trial, tmp_path / "best.yaml", storage_url="sqlite:///x.db", verify=result
    )
    assert _provenance(out)["verify"]["mean"] == pytest.approx(result.mean)


def _record_downstream(study: optuna.Study, number: int, gains: dict[str, float]) -> dict:
    record = {
        "gains": gains,
        "verdicts": {k: "better" if v > 0 else "worse" for k, v in gains.items()},
        "table": f"metric  without  with  gain\ncsi_p99 table of trial {number}",
        "file": f"/runs/trial-{number}/downstream.json",
        "at": "2026-01-01T00:00:00+00:00",
    }
    study._storage.set_study_system_attr(study._study_id, f"{RECORD_ATTR_PREFIX}{number}", record)
    return record


def test_a_downstream_gain_picks_and_its_table_goes_into_the_provenance(tmp_path: Path) -> None:
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    a, b, c = (add_trial(study, definition, v) for v in ([0.1, 0.05], [0.5, 0.2], [0.9, 0.8]))
    dominated = add_trial(study, definition, [0.4, 0.5])
    gain = "downstream_csi_p99_gain"
    _record_downstream(study, a.number, {gain: 0.02})
    record = _record_downstream(study, c.number, {gain: 0.12, "downstream_rmse_gain": -0.01})
    _record_downstream(study, dominated.number, {gain: 0.5})  # off the front: never picked
    assert pick_trial(study, definition, f"max:{gain}").number == c.number
    assert pick_trial(study, definition, f"min:{gain}").number == a.number
    assert pick_trial(study, definition, f"max:{gain}@ks_stat<=0.5").number == a.number
    with pytest.raises(ValueError, match="known: .*downstream_rmse_gain"):
        pick_trial(study, definition, "max:downstream_nothing_gain")

    out = export_trial(study, definition, c, tmp_path / "c.yaml", storage_url="sqlite://", rule="x")
    assert _provenance(out)["downstream"] == record
    out = export_trial(study, definition, b, tmp_path / "b.yaml", storage_url="sqlite://", rule="x")
    assert "downstream" not in _provenance(out)
