"""``cvae-search demo`` as the user runs it: a separate process, two workers, an embedded storage."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import optuna

from model.config import load_config
from tests.conftest import TINY_DOWNSTREAM, CliProcesses

LOOSE_MASS = [{"metric": "mass_bias", "abs": True, "max": 10.0}]


def _demo(cli: CliProcesses, study_file: Path, out: Path) -> tuple[int, str]:
    run = cli.run("demo", "--study-file", str(study_file), "-o", str(out), "--workers", "2", timeout=300)
    return run.returncode, run.stdout + run.stderr


def _trials(out: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").trials


def test_demo_runs_the_whole_loop_and_a_rerun_replaces_it(
    cli: CliProcesses, tiny_study: Callable[..., Path], tmp_path: Path
) -> None:
    study_file = tiny_study(
        "demo",
        n_trials=4,
        baselines={"low_beta": {"loss.beta_kl": 0.001, "loss.free_bits": 0.0}},
        constraints=LOOSE_MASS,
        overrides=TINY_DOWNSTREAM,
    )
    out = tmp_path / "demo"
    earlier_end = None
    for _ in range(2):  # the second run starts afresh in the same folder
        code, output = _demo(cli, study_file, out)
        assert code == 0, output
        assert "study demo: 4 trials (low_beta first) over 2 worker processes" in output
        assert re.search(r"^\*?\s+#0\s+baseline low_beta\s", output, re.M), output
        verdict = re.search(
            r"^the pick \(trial (\d+)\) (dominates|does not dominate|is) baseline low_beta", output, re.M
        )
        assert verdict, output
        assert (verdict.group(2) == "is") == (verdict.group(1) == "0"), output
        trials = _trials(out, "demo")
        assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        if earlier_end is not None:
            assert all(t.datetime_start > earlier_end for t in trials), "the rerun kept earlier trials"
        earlier_end = max(t.datetime_complete for t in trials)

    assert {"pareto.png", "pareto.html", "trials.csv"} <= {p.name for p in (out / "report").iterdir()}
    picked = trials[int(verdict.group(1))]
    assert load_config(out / "best.yaml").loss.beta_kl == picked.params["loss.beta_kl"]
    assert f"export     {out / 'best.yaml'}" in output
    # The downstream stage: the one unaugmented arm beside the pick's (and the baseline's) augmented one.
    assert "downstream: SRDRN (weighted_mae, 4 filters x 1 blocks) trained without and with" in output
    assert re.search(r"^metric\s+no augmentation\s+pick #\d+: with, gain ± spread, verdict", output, re.M)
    if verdict.group(2) != "is":
        assert "low_beta #0: with, gain ± spread, verdict" in output
    assert re.search(r"^csi_p99\s+\S+\s+\S+, [+-]\S+ ± \S+, (better|worse|within noise)", output, re.M)
    assert (out / "downstream" / f"trial-{picked.number}" / "downstream.json").exists()
    assert f"cvae-search downstream demo --front --storage sqlite:///{out / 'study.db'}" in output


def test_demo_without_a_feasible_trial_prints_its_table_and_exports_nothing(
    cli: CliProcesses, tiny_study: Callable[..., Path], tmp_path: Path
) -> None:
    study_file = tiny_study(
        "infeasible", n_trials=2, constraints=[{"metric": "mass_bias", "min": 5.0, "max": 6.0}]
    )
    out = tmp_path / "demo"
    code, output = _demo(cli, study_file, out)
    assert code == 1, output
    assert "demo: nothing exported: study 'infeasible' has no feasible trial" in output, output
    assert "trials.csv" in output and (out / "report" / "trials.csv").exists()
    assert not (out / "best.yaml").exists()
    assert len(_trials(out, "infeasible")) == 2
