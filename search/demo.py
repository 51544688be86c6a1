"""``cvae-search demo``: the whole loop on one machine with nothing configured.

create -> two worker processes -> report -> export -> downstream, on the built-in synthetic
set and an embedded SQLite storage under one folder, then the Pareto table, SRDRN without and
with the pick's and the baselines' generated data, and where everything went.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from model.downstream import DownstreamResult, comparison_table
from search.definition import StudyDefinition, load_definition
from search.downstream_stage import run_stage
from search.export import NoFeasibleTrial, export_trial, pick_trial
from search.report import dominates, format_table, pareto_table, write_report
from search.storage import open_storage
from search.study import BASELINE_ATTR, check_study_data, create_study, load_study
from search.worker import plan_processes, run_workers

__all__ = ["DEMO_STUDY", "run_demo"]

DEMO_STUDY = Path(__file__).resolve().parents[1] / "studies" / "tiny.yaml"


def run_demo(out: Path, *, workers: int = 2, study_file: Path = DEMO_STUDY) -> int:
    """Run the demo study into ``out`` (replacing an earlier demo there) and print the story."""
    if not study_file.exists():
        raise FileNotFoundError(f"{study_file}: the demo study file is missing (run from a checkout)")
    definition = load_definition(study_file)
    check_study_data(definition)
    out = out.resolve()
    for stale in ("study.db", "study.db.lock", "artifacts", "report", "best.yaml", "downstream"):
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{out / 'study.db'}"
    artifacts = out / "artifacts"

    storage = open_storage(url)
    create_study(definition, storage)
    print(
        f"study {definition.name}: {definition.n_trials} trials ({', '.join(definition.baselines)} first) "
        f"over {workers} worker processes; this takes a few minutes on two CPU cores",
        flush=True,
    )
    t0 = time.perf_counter()
    code = run_workers(
        plan_processes("none", 1, workers),
        [definition.name, "--storage", url, "--artifact-dir", str(artifacts)],
    )
    if code != 0:
        print(f"demo: a worker process exited with status {code}")
        return code
    elapsed = time.perf_counter() - t0

    study, definition = load_study(definition.name, storage)
    try:
        picked: FrozenTrial | None = pick_trial(study, definition, "knee")
    except NoFeasibleTrial as e:  # the table and report still tell what the trials did
        picked, no_pick = None, str(e)
    pick_number = None if picked is None else picked.number
    files = write_report(study, definition, out / "report", picked=pick_number)

    print()
    print(format_table(pareto_table(study, definition, picked=pick_number)))
    print()
    if picked is None:
        print(f"demo: nothing exported: {no_pick}")
    else:
        _print_verdicts(study, definition, picked)
    print(f"\n{len(study.trials)} trials in {elapsed / 60:.1f} min. Written:")
    print(f"  storage    {url}")
    print(f"  artifacts  {artifacts}")
    for name, path in files.items():
        print(f"  {name:<10} {path}")
    if picked is None:
        return 1
    best = export_trial(study, definition, picked, out / "best.yaml", storage_url=url, rule="knee")
    print(f"  export     {best}")
    _print_downstream(study, definition, picked, artifacts, out / "downstream")
    print("\nnext:")
    print(f"  cvae-search dashboard --storage {url} --artifact-dir {artifacts}")
    print(f"  cvae-search downstream {definition.name} --front --storage {url} --artifact-dir {artifacts}")
    print(f"  cvae-search train {best} -o {out / 'production'}")
    return 0


def _print_downstream(
    study: optuna.Study, definition: StudyDefinition, picked: FrozenTrial, artifacts: Path, out: Path
) -> None:
    """SRDRN without augmentation, and with the pick's and each baseline's generated data."""
    baselines = sorted(
        (
            t
            for t in study.trials
            if t.user_attrs.get(BASELINE_ATTR) and t.values and t.number != picked.number
        ),
        key=lambda t: t.number,
    )
    trials = [picked, *baselines]
    ds = definition.base.downstream
    print(
        f"\ndownstream: SRDRN ({ds.loss}, {ds.channels} filters x {ds.n_res_blocks} blocks) trained without "
        f"and with generated data, for the pick and {len(baselines)} baseline(s), {len(ds.seeds)} seeds",
        flush=True,
    )
    t0 = time.perf_counter()
    report = run_stage(
        study,
        definition,
        trials,
        artifact_dir=artifacts,
        out_dir=out,
        progress=lambda line: print(f"  {line}"),
    )
    labels = {picked.number: f"pick #{picked.number}"}
    labels |= {t.number: f"{t.user_attrs[BASELINE_ATTR]} #{t.number}" for t in baselines}
    results = {
        labels[n]: DownstreamResult.from_dict(json.loads(Path(report.records[n]["file"]).read_text()))
        for n in labels
        if n in report.records
    }
    print()
    print(comparison_table(results))
    print(f"({time.perf_counter() - t0:.0f} s; files in {out})")


def _print_verdicts(study: optuna.Study, definition: StudyDefinition, picked: FrozenTrial) -> None:
    """Whether the pick dominates each baseline, on the study's objectives."""
    baselines = {
        t.user_attrs[BASELINE_ATTR]: t for t in study.trials if t.user_attrs.get(BASELINE_ATTR) and t.values
    }
    for name, trial in sorted(baselines.items()):
        if trial.number == picked.number:
            print(f"the pick (trial {picked.number}) is baseline {name} itself")
            continue
        verdict = "dominates" if dominates(definition, picked, trial) else "does not dominate"
        print(
            f"the pick (trial {picked.number}) {verdict} baseline {name} (trial {trial.number}) "
            f"on {' and '.join(definition.metric_names)}"
        )
