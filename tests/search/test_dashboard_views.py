"""The dashboard's feasibility view and the project's plots and notes, on a constructed study
in a real SQLite storage (the browser test in tests/deploy/test_dashboard.py shows them)."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
from optuna_dashboard import save_note
from optuna_dashboard._note import get_note_from_system_attrs

from search.cli import main
from search.dashboard import (
    DOWNSTREAM_PLOT,
    FRONT_PLOT,
    HYPERVOLUME_PLOT,
    feasibility_view,
    refresh_all,
    refresh_views,
    trial_note,
)
from search.definition import Collapse
from search.export import export_trial
from tests.search.constructed_studies import (
    COLLAPSE,
    MASS,
    add_trial,
    make_definition,
    new_study,
    run_baseline,
    sqlite_storage,
    story_baselines,
)

COLLAPSED = "collapsed at epoch 2: spread_norm=0.01 < 0.05, z_usage=0.001 < 0.02"


def _story(tmp_path: Path) -> tuple[str, optuna.Study]:
    url, storage = sqlite_storage(tmp_path)
    definition = make_definition(name="story", baselines=story_baselines(), collapse=Collapse())
    study = new_study(definition, storage)
    run_baseline(study, definition, [0.3, 0.08], constraints={MASS: 0.2, COLLAPSE: 1.5}, stopped=COLLAPSED)
    run_baseline(study, definition, [0.5, 0.09], constraints={MASS: 0.1, COLLAPSE: 1.2}, stopped=COLLAPSED)
    add_trial(study, definition, [3.0, 0.02])
    add_trial(study, definition, [2.0, 0.015])
    add_trial(study, definition, [5.0, 0.01], constraints={MASS: -0.05, COLLAPSE: 1.3}, stopped=COLLAPSED)
    return url, study


def _plots(study: optuna.Study) -> set[str]:
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    return set(get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id)))


def _note(study: optuna.Study, trial_id: int | None) -> str:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return str(get_note_from_system_attrs(attrs, trial_id)["body"])


def test_the_view_lists_constraints_for_the_dashboard_and_stores_nothing(tmp_path: Path) -> None:
    url, study = _story(tmp_path)
    view = feasibility_view(optuna.storages.RDBStorage(url))
    shown = {t.number: t for t in view.get_all_trials(study._study_id, deepcopy=False)}
    fresh = optuna.storages.RDBStorage(url).get_all_trials(study._study_id)
    for t in fresh:
        assert shown[t.number].system_attrs["constraints"] == list(t.constraints.values())
    assert sorted(shown[4].system_attrs["constraints"]) == [-0.05, 1.3]
    # The storage itself is unchanged: Optuna still reads two named constraints, not four.
    assert all("constraints" not in t.system_attrs for t in fresh)
    assert sorted(fresh[4].constraints) == [COLLAPSE, MASS]


def test_a_single_objective_studys_best_trial_is_its_best_feasible_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'single.db'}"
    study = optuna.create_study(study_name="single", storage=url, direction="minimize")
    for value, violation in ((0.1, 1.0), (0.3, -1.0), (0.2, 0.5)):
        study.add_trial(optuna.create_trial(value=value, constraints={"c": violation}))
    view = feasibility_view(optuna.storages.RDBStorage(url))
    assert view.get_best_trial(study._study_id).number == 1
    assert study.best_trial.number == 1, "as Optuna itself judges it"


def test_views_are_written_once_and_rewritten_only_when_the_study_changes(tmp_path: Path) -> None:
    _, study = _story(tmp_path)
    definition = make_definition(name="story", baselines=story_baselines(), collapse=Collapse())
    written = refresh_views(study, definition)
    assert f"plot {FRONT_PLOT}" in written and f"plot {HYPERVOLUME_PLOT}" in written
    assert {"note study", *(f"note trial {n}" for n in range(5))} <= set(written)
    assert _plots(study) == {FRONT_PLOT, HYPERVOLUME_PLOT}, "no downstream plot before any gains"
    assert refresh_views(study, definition) == []

    export_trial(
        study, definition, study.best_trials[0], tmp_path / "b.yaml", storage_url="sqlite:///x", rule="knee"
    )
    assert sorted(refresh_views(study, definition)) == sorted([f"plot {FRONT_PLOT}", "note study"])
    assert "The exported trial is #2 (pick rule `knee`" in _note(study, None)

    add_trial(
        study,
        definition,
        [1.0, 0.05],
        user_attrs={"downstream": {"gains": {"downstream_mae_gain": 0.12, "downstream_q99_gain": -0.03}}},
    )
    written = refresh_views(study, definition)
    assert f"plot {DOWNSTREAM_PLOT}" in written and "note trial 5" in written
    assert _plots(study) == {FRONT_PLOT, HYPERVOLUME_PLOT, DOWNSTREAM_PLOT}


def test_a_note_edited_in_the_dashboard_is_left_as_written(tmp_path: Path) -> None:
    _, study = _story(tmp_path)
    definition = make_definition(name="story", baselines=story_baselines(), collapse=Collapse())
    refresh_views(study, definition)
    trial = study.trials[0]
    save_note(study, "my own study note")
    save_note(optuna.Trial(study, trial._trial_id), "looked at it: v3 is hopeless")
    export_trial(study, definition, study.best_trials[0], tmp_path / "best.yaml", storage_url="sqlite:///x")
    written = refresh_views(study, definition)
    assert "note study" not in written and "note trial 0" not in written
    assert _note(study, None) == "my own study note"
    assert _note(study, trial._trial_id) == "looked at it: v3 is hopeless"


def test_the_trial_note_gives_the_diagnosis_and_each_constraint(tmp_path: Path) -> None:
    _, study = _story(tmp_path)
    note = trial_note(study.trials[0])
    assert note.startswith("**Trial 0** (baseline v3): **infeasible**")
    assert COLLAPSED.replace("|", "\\|") in note
    assert "| `collapse` | 1.5 | violated |" in note
    assert "| `\\|mass_bias\\|<=0.15` | 0.2 | violated |" in note
    assert "Trained its full budget; every constraint holds." in trial_note(study.trials[2])


def test_refresh_all_skips_studies_cvae_search_did_not_create(tmp_path: Path) -> None:
    url, study = _story(tmp_path)
    optuna.create_study(study_name="someone-elses", storage=url)
    assert set(refresh_all(study._storage)) == {"story"}


def test_a_missing_optuna_dashboard_is_named_with_the_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if not installed
    code = main(["dashboard", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"cvae-search dashboard: error: the Python package optuna-dashboard (module optuna_dashboard) "
        f"is not installed for {sys.executable}; install it with: {sys.executable} -m pip install "
        "optuna-dashboard"
    )
    assert not (tmp_path / "x.db").exists()
