from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.definition import StudyDefinition
from search.report import dominates, format_table, hypervolume_history, pareto_table, write_report
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

COLLAPSED = "collapsed at epoch 2: spread_norm=0.01 < 0.05"


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, StudyDefinition, dict[str, int]]:
    """Two baselines (v3 collapsed, v4 fine), a search front, a failed and a waiting trial.

    Feasible points (diversity up, ks_stat down) against the reference point (0, 1):
    v4 (0.2, 0.3), good (0.5, 0.6), pick (0.45, 0.25); `behind` (0.4, 0.7) is dominated by
    `good`. The feasible front is {pick, good}; its hypervolume is
    0.45 * 0.75 + 0.5 * 0.4 - 0.45 * 0.4 = 0.3575.
    """
    definition = make_definition(baselines=story_baselines())
    study = new_study(definition, sqlite_storage(tmp_path_factory.mktemp("story"))[1])
    n = {}
    n["v3"] = run_baseline(
        study, definition, [0.02, 0.9], constraints={MASS: -0.1, COLLAPSE: 2.0}, stopped=COLLAPSED
    )
    n["v4"] = run_baseline(study, definition, [0.2, 0.3]).number
    n["v3"] = n["v3"].number
    n["good"] = add_trial(
        study, definition, [0.5, 0.6], params={"loss.beta_kl": 0.2, "model.latent_dim": 32}
    ).number
    n["behind"] = add_trial(study, definition, [0.4, 0.7]).number
    n["infeasible"] = add_trial(study, definition, [0.9, 0.05], constraints={MASS: 0.4, COLLAPSE: 0.0}).number
    n["beyond"] = add_trial(study, definition, [0.3, 1.2]).number  # worse than the reference point
    n["pick"] = add_trial(study, definition, [0.45, 0.25]).number
    study.add_trial(
        optuna.create_trial(
            state=TrialState.FAIL,
            params={"loss.beta_kl": 0.9, "model.latent_dim": 4},
            distributions=distributions(definition),
            user_attrs={"fail_reason": "diverged: loss is not finite at epoch 1"},
        )
    )
    n["failed"] = study.trials[-1].number
    study.enqueue_trial({"loss.beta_kl": 0.3, "model.latent_dim": 12})
    n["waiting"] = study.trials[-1].number
    return study, definition, n


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_every_report_file_is_written(story: tuple, tmp_path: Path) -> None:
    study, definition, n = story
    written = write_report(study, definition, tmp_path / "report", picked=n["pick"])
    names = {
        "pareto.html",
        "pareto.png",
        "hypervolume.png",
        "hypervolume.csv",
        "importances.csv",
        "importances.png",
        "trials.csv",
    }
    assert set(written) == names
    for name in names:
        path = written[name]
        assert isinstance(path, Path) and path == tmp_path / "report" / name
        assert path.stat().st_size > 0, name
    html = written["pareto.html"].read_text()
    assert "Plotly.newPlot" in html
    assert re.search(r"<script[^>]*src=\"https?:", html) is None, "plotly.js must be embedded, not fetched"
    assert "diversity" in html and "ks_stat" in html


def test_trials_csv_has_one_row_per_trial(story: tuple, tmp_path: Path) -> None:
    study, definition, n = story
    rows = _read_csv(write_report(study, definition, tmp_path)["trials.csv"])
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    by_number = {int(r["number"]): r for r in rows}
    for column in (
        "state",
        "baseline",
        "feasible",
        "stopped",
        "fail_reason",
        "duration_s",
        "value:diversity",
        "value:ks_stat",
        "param:loss.beta_kl",
        "param:model.latent_dim",
        "metric:crps",
        f"constraint:{MASS}",
        f"constraint:{COLLAPSE}",
        "timing:train_s",
    ):
        assert column in rows[0], column
    v3 = by_number[n["v3"]]
    assert (v3["baseline"], v3["feasible"], v3["stopped"]) == ("v3", "False", COLLAPSED)
    assert float(v3[f"constraint:{COLLAPSE}"]) == 2.0
    good = by_number[n["good"]]
    assert (float(good["value:diversity"]), int(good["param:model.latent_dim"])) == (0.5, 32)
    assert by_number[n["failed"]]["state"] == "FAIL"
    assert by_number[n["failed"]]["fail_reason"].startswith("diverged")
    assert by_number[n["waiting"]]["state"] == "WAITING"
    assert by_number[n["infeasible"]]["feasible"] == "False"


def test_hypervolume_is_that_of_the_feasible_front(story: tuple, tmp_path: Path) -> None:
    study, definition, _ = story
    rows = _read_csv(write_report(study, definition, tmp_path)["hypervolume.csv"])
    complete = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert [int(r["trial"]) for r in rows] == complete
    hv = [float(r["hypervolume"]) for r in rows]
    assert all(b >= a for a, b in zip(hv, hv[1:], strict=False))
    # Front {pick (0.45, 0.25), good (0.5, 0.6)}, reference (0, 1): two rectangles less their overlap.
    assert hv[-1] == pytest.approx(0.45 * 0.75 + 0.5 * 0.4 - 0.45 * 0.4)
    assert hv[0] == 0.0  # v3 is infeasible
    assert hypervolume_history(study, definition)[1] == (complete[1], pytest.approx(0.2 * 0.7))
    # A reference point off zero for the maximised objective, oriented like its values.
    shifted = hypervolume_history(study, replace(definition, reference_point=[0.1, 1.0]))
    assert shifted[-1][1] == pytest.approx(0.35 * 0.75 + 0.4 * 0.4 - 0.35 * 0.4)


def test_importances_are_skipped_with_a_note_when_they_cannot_be_computed(tmp_path: Path) -> None:
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    add_trial(study, definition, [0.5, 0.2])
    written = write_report(study, definition, tmp_path / "one")
    assert "at least 2 complete trials" in str(written["importances"])
    assert "importances.csv" not in written
    assert written["trials.csv"].stat().st_size > 0

    empty = make_definition(name="no-space", space={})
    study = new_study(empty, sqlite_storage(tmp_path / "empty")[1])
    for values in ([0.5, 0.2], [0.3, 0.1], [0.2, 0.4]):
        study.add_trial(optuna.create_trial(values=values, user_attrs={"metrics": {}}))
    written = write_report(study, empty, tmp_path / "empty-report")
    assert "searches no parameters" in str(written["importances"])
    assert written["pareto.png"].stat().st_size > 0


def test_importances_follow_each_objectives_direction(tmp_path: Path) -> None:
    """The best trials share latent_dim and spread beta_kl; the worst do the reverse.

    Read in each objective's own direction, latent_dim decides what is good; read the wrong
    way round, beta_kl would.
    """
    definition = make_definition()
    study = new_study(definition, sqlite_storage(tmp_path)[1])
    cases = [((i * 7 % 24) / 24, 4 + i * 11 % 60, 0.4 + 0.2 * (i * 5 % 24) / 24) for i in range(24)]
    cases += [(beta, 8, 0.95 + beta / 100) for beta in (0.1, 0.5, 0.9)]
    cases += [(0.5, latent, 0.01 + latent / 1e4) for latent in (4, 30, 60)]
    for beta, latent, diversity in cases:
        params = {"loss.beta_kl": beta, "model.latent_dim": latent}
        add_trial(study, definition, [diversity, 1 - diversity], params=params)
    rows = _read_csv(write_report(study, definition, tmp_path)["importances.csv"])
    assert set(rows[0]) == {"param", "pareto", "diversity", "ks_stat"}
    by_param = {r["param"]: r for r in rows}
    for target in ("pareto", "diversity", "ks_stat"):
        assert float(by_param["model.latent_dim"][target]) > float(by_param["loss.beta_kl"][target]), target


def test_pareto_table_tells_the_story(story: tuple) -> None:
    study, definition, n = story
    rows = pareto_table(study, definition, picked=n["pick"])
    assert [r["trial"] for r in rows] == [n["v3"], n["v4"], n["good"], n["pick"], n["behind"]]
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial[n["v3"]]["source"] == "v3" and by_trial[n["v3"]]["feasible"] is False
    assert COLLAPSED in by_trial[n["v3"]]["note"] and f"violates {COLLAPSE}" in by_trial[n["v3"]]["note"]
    assert by_trial[n["v4"]]["front"] == "near"
    assert (by_trial[n["pick"]]["front"], by_trial[n["good"]]["front"]) == ("front", "front")
    assert by_trial[n["behind"]]["front"] == "near"
    assert [r["trial"] for r in rows if r["picked"]] == [n["pick"]]
    assert {r["trial"] for r in rows if r["front"] == "front"} == {t.number for t in study.best_trials}

    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["trial", "source", "diversity", "ks_stat"]
    assert "baseline v3" in lines[1] and "collapsed" in lines[1]
    assert "baseline v4" in lines[2]
    picked_line = next(line for line in lines if f"#{n['pick']} " in line)
    assert picked_line.startswith("*") and "0.45" in picked_line
    assert "* picked" in lines[-1]


def test_a_picked_trial_off_the_table_is_added(story: tuple) -> None:
    study, definition, n = story
    rows = pareto_table(study, definition, picked=n["infeasible"])
    assert rows[-1]["trial"] == n["infeasible"] and rows[-1]["picked"]
    assert format_table([]) == "no complete trials yet"


def test_dominance_follows_each_objectives_direction(story: tuple) -> None:
    study, definition, n = story
    trial = {name: study.trials[number] for name, number in n.items()}
    assert dominates(definition, trial["good"], trial["behind"])  # more diverse and lower KS
    assert not dominates(definition, trial["behind"], trial["good"])
    assert dominates(definition, trial["pick"], trial["v4"])  # more diverse, KS lower
    assert not dominates(definition, trial["pick"], trial["good"])  # lower KS, less diverse
    assert not dominates(definition, trial["pick"], trial["pick"])  # equal is not better
