"""Successive halving: do early rungs predict the end, and does halving buy the front for less?

Both questions are answered on a cache of full learning curves of real trials
(``benchmarks/results/halving_curves.json``, built once with ``--build-cache``): the study of
benchmark 6 (studies/tiny.yaml's space and objectives at CPU size, 20 epochs,
``benchmarks.search_efficiency.efficiency_definition``), the same Latin hypercube of its space,
each point trained for its full 20 epochs (nothing stopped, not even for collapse) while, after
every epoch, it recorded

- the rung metrics as the halving watcher measures them (``EpochReport.evaluate`` on the first
  ``halving.days`` validation days: the study's objectives and constraints),
- the collapse probe (``EpochReport.probe``), and
- the full evaluation's metrics (``EpochReport.evaluate`` on all of the eval config's days: what
  the trial would have reported had it stopped there; at epoch 20 it equals the trial's result).

Evaluating after each epoch leaves training unchanged (its generator is its own), so stopping
at any epoch, for collapse or at a rung, is replayed exactly.

**Prediction** (``--correlations``): per epoch, the Spearman rank correlation between each rung
metric and the same metric at the end of training, over every trial and over those the
collapse rule lets finish; and the share of the final feasible front that the rank rule, applied
to every trial at once, keeps in its top 1/eta.

**Search** (the default): TPE and random search, with and without halving, each seed a search
of a fixed budget of training epochs. A proposal gets the learning curve of its nearest cached
point (benchmark 6's surrogate); the worker's own callbacks, ``CollapseWatcher`` and
``HalvingWatcher`` (its rung records in the study's storage), run at each epoch on the cached
probe and rung metrics, and the trial is told what the real objective would record. Reported:
hypervolume of the feasible front against training epochs spent.

    python -m benchmarks.halving --seeds 16
    python -m benchmarks.halving --correlations
    python -m benchmarks.halving --build-cache --points 240
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import heapq
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from benchmarks.common import table, write_json
from benchmarks.search_efficiency import (
    CPU_SIZE,
    REPO,
    Surrogate,
    _quiet,
    efficiency_definition,
    from_unit,
)
from model.trainer import EpochReport, TrainingDiverged, train
from search.definition import Halving, StudyDefinition, halving_ladder
from search.halving import HalvingWatcher, rung_entry, rung_order
from search.objective import CollapseWatcher, constraint_values, suggest_space
from search.report import hypervolume_history
from search.samplers import make_sampler

__all__ = [
    "CURVES_PATH",
    "Curve",
    "build_cache",
    "correlations",
    "halving_definition",
    "load_curves",
    "main",
    "run_halving",
    "run_search",
]

CURVES_PATH = REPO / "benchmarks" / "results" / "halving_curves.json"
RUNG_DAYS = Halving().days
FULL_METRICS = ("diversity", "ks_stat", "mass_bias", "spread_norm", "z_usage")
"""What a stopped trial reports that its values and constraints read (objectives, the mass
bound, the collapse constraint's graded part)."""
METHODS = ("tpe", "tpe+halving", "random", "random+halving")


def _judged(definition: StudyDefinition) -> list[str]:
    return list(
        dict.fromkeys([o.metric for o in definition.objectives] + [c.metric for c in definition.constraints])
    )


# --- the cache ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One real trial trained its full budget, with what it measured after each epoch."""

    params: dict[str, Any]
    epochs: int
    """Epochs trained: the budget, or the epoch before the loss diverged."""
    diverged: bool
    rung: dict[str, list[float]]
    """Rung metric -> value after each epoch (index 0 is epoch 1)."""
    probe: dict[str, list[float]]
    full: dict[str, list[float]]
    train_s: list[float]
    """Training seconds of each epoch."""
    rung_eval_s: float
    """Mean seconds of one rung evaluation."""

    def at(self, table_: Mapping[str, list[float]], epoch: int) -> dict[str, float]:
        return {k: v[epoch - 1] for k, v in table_.items()}


class _Recorder:
    def __init__(self, rung_metrics: Sequence[str]) -> None:
        self.rung_metrics = list(rung_metrics)
        self.reset()

    def reset(self) -> None:
        self.rung: dict[str, list[float]] = {m: [] for m in self.rung_metrics}
        self.probe: dict[str, list[float]] = {"spread_norm": [], "z_usage": []}
        self.full: dict[str, list[float]] = {m: [] for m in FULL_METRICS}
        self.train_s: list[float] = []
        self.rung_s: list[float] = []
        self._callback_s = 0.0

    def __call__(self, report: EpochReport) -> None:
        t0 = time.perf_counter()
        # elapsed_s counts this recorder's earlier calls too; what is left is training.
        self.train_s.append(report.elapsed_s - self._callback_s - sum(self.train_s))
        assert report.evaluate is not None
        rung = report.evaluate(self.rung_metrics, RUNG_DAYS)
        self.rung_s.append(time.perf_counter() - t0)
        full = report.evaluate(None, None)
        probe = report.probe()
        for table_, values in ((self.rung, rung), (self.full, full), (self.probe, probe)):
            for k in table_:
                table_[k].append(values[k])
        self._callback_s += time.perf_counter() - t0


def _curve_of(
    definition: StudyDefinition, params: dict[str, Any], recorder: _Recorder, data: Any
) -> dict[str, Any]:
    recorder.reset()
    cfg = definition.config_for(params)
    diverged = False
    try:
        result = train(cfg, callbacks=[recorder], data=data)
        # The check that makes the replay exact: the last epoch's evaluation is the trial's result.
        for k in FULL_METRICS:
            a, b = recorder.full[k][-1], result.metrics[k]
            assert a == b or (math.isnan(a) and math.isnan(b)), (k, a, b)
    except TrainingDiverged:
        diverged = True
    return {
        "params": params,
        "epochs": len(recorder.train_s),
        "diverged": diverged,
        "rung": recorder.rung,
        "probe": recorder.probe,
        "full": recorder.full,
        "train_s": [round(s, 4) for s in recorder.train_s],
        "rung_eval_s": round(statistics.fmean(recorder.rung_s), 5) if recorder.rung_s else 0.0,
    }


def build_cache(points: int, path: Path = CURVES_PATH, seed: int = 0) -> Path:
    """Train each point of benchmark 6's Latin hypercube its full budget, recording every epoch."""
    import torch
    from scipy.stats import qmc

    from model.checkpoint import versions
    from model.data import load_data

    torch.set_num_threads(1)
    definition = dataclasses.replace(efficiency_definition(), collapse=None)
    unit = qmc.LatinHypercube(d=len(definition.space), seed=seed).random(points)
    designs = [from_unit(u, definition.space) for u in unit]
    data = load_data(definition.base.data, definition.base.normalization)
    recorder = _Recorder(_judged(definition))
    t0, cpu0 = time.perf_counter(), time.process_time()
    curves = []
    for i, params in enumerate(designs, 1):
        curves.append(_curve_of(definition, params, recorder, data))
        if i % 20 == 0:
            print(f"  {i}/{points} points, {time.perf_counter() - t0:.0f} s", flush=True)
    produced_by = {
        "command": f"python -m benchmarks.halving --build-cache --points {points}",
        "how": (
            "model.trainer.train (real training) of each point of benchmark 6's Latin hypercube "
            f"(scipy.stats.qmc, seed {seed}) for its full budget, collapse stopping off, recording after "
            f"every epoch the rung metrics on {RUNG_DAYS} validation days, the collapse probe and the "
            "full evaluation; one process, one torch thread"
        ),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "versions": {**versions(), "optuna": optuna.__version__},
        "digest": efficiency_definition().digest(),
        "rung_days": RUNG_DAYS,
        "cpu_size": CPU_SIZE,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"produced_by": produced_by, "curves": curves}, separators=(",", ":")))
    return path


def load_curves(path: Path = CURVES_PATH) -> tuple[StudyDefinition, list[Curve]]:
    """The cached curves and benchmark 6's definition they were trained with (which must be today's)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cache; build it with python -m benchmarks.halving --build-cache")
    data = json.loads(path.read_text())
    definition = efficiency_definition()
    produced = data["produced_by"]
    if produced["digest"] != definition.digest() or produced["rung_days"] != RUNG_DAYS:
        raise ValueError(
            f"{path}: produced for definition digest {produced['digest']} and {produced['rung_days']} rung "
            f"days, but benchmark 6's study now has {definition.digest()} and halving.days {RUNG_DAYS}; "
            "rebuild it with --build-cache"
        )
    return definition, [Curve(**c) for c in data["curves"]]


def halving_definition(
    *, eta: float = Halving().eta, min_epoch: int | None = None, min_peers: int = Halving().min_peers
) -> StudyDefinition:
    """Benchmark 6's study with a halving rule (default: the study file's defaults)."""
    base = efficiency_definition()
    epochs = base.base.train.epochs
    if min_epoch is None:
        from search.definition import DEFAULT_FIRST_RUNG

        min_epoch = max(1, round(epochs * DEFAULT_FIRST_RUNG))
    rule = Halving(
        eta=float(eta),
        rungs=halving_ladder(min_epoch, eta, epochs),
        metrics=_judged(base),
        min_peers=min_peers,
        days=RUNG_DAYS,
    )
    return dataclasses.replace(base, halving=rule)


def _report(curve: Curve, epoch: int) -> EpochReport:
    """The epoch report a trial on ``curve`` gave after ``epoch``, its probe and rung metrics cached."""

    def evaluate(names: Sequence[str] | None, days: int | None) -> dict[str, float]:
        if days != RUNG_DAYS or names is None or not set(names) <= set(curve.rung):
            raise ValueError(f"the cache holds rung metrics {sorted(curve.rung)} on {RUNG_DAYS} days only")
        return {n: curve.rung[n][epoch - 1] for n in names}

    return EpochReport(
        epoch=epoch,
        epochs=curve.epochs,
        losses={},
        samples_per_s=math.nan,
        elapsed_s=sum(curve.train_s[:epoch]),
        probe=lambda: curve.at(curve.probe, epoch),
        evaluate=evaluate,
    )


def _collapse_epoch(definition: StudyDefinition, curve: Curve) -> tuple[int, str] | None:
    """The epoch at which the collapse rule stops a trial on ``curve``, and its reason."""
    if definition.collapse is None:
        return None
    watcher = CollapseWatcher(definition.collapse)
    for epoch in range(1, curve.epochs + 1):
        reason = watcher(_report(curve, epoch))
        if reason:
            return epoch, reason
    return None


# --- prediction ---------------------------------------------------------------------------------


def _final(definition: StudyDefinition, curve: Curve) -> tuple[dict[str, float], str | None]:
    """What the real objective records for ``curve`` without halving: metrics and stop reason."""
    stop = _collapse_epoch(definition, curve)
    epoch, reason = stop if stop else (curve.epochs, None)
    return curve.at(curve.full, epoch), reason


def _front(
    definition: StudyDefinition, finals: Mapping[int, tuple[dict[str, float], str | None]]
) -> set[int]:
    """Indices of the feasible Pareto front of ``finals`` (each as the real objective records it)."""
    feasible = {
        i: tuple(-m[o.metric] if o.direction == "maximize" else m[o.metric] for o in definition.objectives)
        for i, (m, stopped) in finals.items()
        if all(v <= 0 for v in constraint_values(definition, m, stopped).values())
    }
    return {
        i
        for i, p in feasible.items()
        if not any(all(a <= b for a, b in zip(q, p, strict=True)) and q != p for q in feasible.values())
    }


def correlations(definition: StudyDefinition, curves: Sequence[Curve]) -> list[dict[str, Any]]:
    """Per epoch: Spearman of each rung metric with its final value; the final front the rule keeps."""
    from scipy.stats import spearmanr

    assert definition.halving is not None
    whole = [c for c in curves if not c.diverged and c.epochs == max(x.epochs for x in curves)]
    last = whole[0].epochs
    finals = {i: _final(definition, c) for i, c in enumerate(whole)}
    healthy = [i for i, (_, stopped) in finals.items() if stopped is None]
    front = _front(dataclasses.replace(definition, halving=None), finals)
    keep = math.ceil(len(whole) / definition.halving.eta)
    signed = {c.metric for c in definition.constraints if c.abs}
    rows = []
    for epoch in range(1, last):
        row: dict[str, Any] = {"epoch": epoch}
        for metric in definition.halving.metrics or []:
            label = f"|{metric}|" if metric in signed else metric

            def value(x: float, metric: str = metric) -> float:
                return abs(x) if metric in signed else x

            for subset, members in (("all", range(len(whole))), ("healthy", healthy)):
                rung = [value(whole[i].rung[metric][epoch - 1]) for i in members]
                end = [value(whole[i].full[metric][last - 1]) for i in members]
                row[f"{label} {subset}"] = float(spearmanr(rung, end, nan_policy="omit").statistic)
        order = rung_order(
            [rung_entry(definition, i, whole[i].at(whole[i].rung, epoch)) for i in range(len(whole))]
        )
        top = {e.trial for e in order[:keep]}
        row["front kept"] = len(front & top) / len(front) if front else math.nan
        rows.append(row)
    return rows


# --- searching --------------------------------------------------------------------------------------


@dataclass
class SearchRun:
    method: str
    workers: int
    seed: int
    epochs: list[int]
    """Training epochs spent by the trials up to each one, in trial-number order."""
    hypervolume: list[float]
    """Hypervolume of the feasible front of the trials up to each one."""
    halved: int
    feasible: int
    collapsed: int
    repeats: int = 0
    """Trials whose nearest cached point an earlier trial of the search already had."""


@dataclass(order=True)
class _Event:
    time: float
    number: int
    worker: int = dataclasses.field(compare=False)
    trial: optuna.Trial = dataclasses.field(compare=False)
    curve: Curve = dataclasses.field(compare=False)
    stops: list[int] = dataclasses.field(compare=False)
    """The epochs still ahead at which a callback may stop the trial (its last epoch last)."""
    callbacks: list[Callable[[EpochReport], str | None]] = dataclasses.field(compare=False)


def _epoch_s(curve: Curve) -> float:
    return statistics.fmean(curve.train_s) if curve.train_s else 1.0


def run_search(
    curves: Sequence[Curve],
    surrogate: Surrogate,
    definition: StudyDefinition,
    sampler: str,
    workers: int,
    seed: int,
    budget: int,
) -> SearchRun:
    """One search by ``workers`` simulated workers until ``budget`` training epochs are spent."""
    storage = optuna.storages.InMemoryStorage()
    name = f"{sampler}-{workers}-{seed}"
    optuna.create_study(storage=storage, study_name=name, directions=definition.directions)
    views = [
        optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(sampler, 1000 * seed, {}, w))
        for w in range(workers)
    ]
    rungs = (definition.halving.rungs or []) if definition.halving is not None else []
    spent_by: dict[int, int] = {}
    seen: set[int] = set()
    events: list[_Event] = []
    run = SearchRun(sampler + ("+halving" if rungs else ""), workers, seed, [], [], 0, 0, 0)

    def start(worker: int, now: float) -> None:
        trial = views[worker].ask()
        curve = surrogate.nearest(suggest_space(trial, definition.space))
        assert isinstance(curve, Curve)
        run.repeats += id(curve) in seen
        seen.add(id(curve))
        collapse = _collapse_epoch(definition, curve)
        end = collapse[0] if collapse else curve.epochs
        stops = sorted({r for r in rungs if r < end} | {end})
        callbacks: list[Callable[[EpochReport], str | None]] = []
        if definition.collapse is not None:
            callbacks.append(CollapseWatcher(definition.collapse))
        if definition.halving is not None:
            callbacks.append(HalvingWatcher(definition, trial))
        event = _Event(now + stops[0] * _epoch_s(curve), trial.number, worker, trial, curve, stops, callbacks)
        heapq.heappush(events, event)

    def finish(event: _Event, epoch: int, stopped: str | None) -> None:
        trial, curve = event.trial, event.curve
        view = views[event.worker]
        if stopped is None and curve.diverged and epoch == curve.epochs:
            spent_by[trial.number] = epoch + 1  # the epoch whose loss diverged
            view.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        spent_by[trial.number] = epoch
        metrics = curve.at(curve.full, epoch)
        values = [metrics[o.metric] for o in definition.objectives]
        if not all(math.isfinite(v) for v in values):
            view.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        constraints = constraint_values(definition, metrics, stopped)
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        view.tell(trial, values)
        run.halved += bool(stopped and stopped.startswith("halved"))
        run.collapsed += bool(stopped and stopped.startswith("collapsed"))
        run.feasible += all(v <= 0 for v in constraints.values())

    def spent() -> int:
        return sum(spent_by.values())

    for w in range(workers):
        start(w, 0.0)
    while events:
        event = heapq.heappop(events)
        epoch = event.stops.pop(0)
        stopped = None
        # As model.trainer.train calls them after each epoch (epoch 0: diverged in the first).
        for callback in event.callbacks if epoch else ():
            stopped = callback(_report(event.curve, epoch))
            if stopped:
                break
        if event.stops and not stopped:
            event.time += (event.stops[0] - epoch) * _epoch_s(event.curve)
            heapq.heappush(events, event)
            continue
        finish(event, epoch, stopped)
        if spent() < budget:
            start(event.worker, event.time)
    history = dict(hypervolume_history(views[0], definition))
    hv = 0.0
    total = 0
    for number in sorted(spent_by):
        total += spent_by[number]
        hv = history.get(number, hv)
        run.epochs.append(total)
        run.hypervolume.append(hv)
    return run


def _run_one(args: tuple[Any, ...]) -> SearchRun:
    _quiet()
    return run_search(*args)


def hv_at(run: SearchRun, epochs: float) -> float:
    """The hypervolume of the trials whose epochs together are at most ``epochs``."""
    i = int(np.searchsorted(np.asarray(run.epochs), epochs, side="right"))
    return run.hypervolume[i - 1] if i else 0.0


def epochs_to(run: SearchRun, target: float) -> float:
    """Training epochs the search had spent when its hypervolume first reached ``target``."""
    return next((e for e, hv in zip(run.epochs, run.hypervolume, strict=True) if hv >= target), math.inf)


COLUMNS = [
    "method",
    "workers",
    "runs",
    "trials",
    "hv@1/4",
    "hv@1/2",
    "hv@1",
    "hv_sd",
    "reach",
    "epochs_to_tpe",
    "of_budget",
    "halved",
    "collapsed",
    "feasible",
    "repeats",
]


def summarize(runs: Sequence[SearchRun], budget: int) -> list[dict[str, Any]]:
    """One row per method and worker count; ``epochs_to_tpe`` is the median over seeds of the epochs
    spent to reach full-budget TPE's mean final hypervolume, ``reach`` the share of seeds that did."""
    rows = []
    for workers in sorted({r.workers for r in runs}):
        same = [r for r in runs if r.workers == workers]
        tpe = [r for r in same if r.method == "tpe"]
        target = statistics.fmean(hv_at(r, budget) for r in tpe) if tpe else math.nan
        for method in METHODS:
            group = [r for r in same if r.method == method]
            if not group:
                continue
            finals = [hv_at(r, budget) for r in group]
            trials = sum(len(r.epochs) for r in group)
            reached = sorted(epochs_to(r, target) for r in group)
            median = statistics.median(reached)
            rows.append(
                {
                    "method": method,
                    "workers": workers,
                    "runs": len(group),
                    "trials": trials / len(group),
                    "hv@1/4": statistics.fmean(hv_at(r, budget / 4) for r in group),
                    "hv@1/2": statistics.fmean(hv_at(r, budget / 2) for r in group),
                    "hv@1": statistics.fmean(finals),
                    "hv_sd": statistics.stdev(finals) if len(finals) > 1 else math.nan,
                    "reach": sum(math.isfinite(e) for e in reached) / len(group),
                    "epochs_to_tpe": median,
                    "of_budget": median / budget,
                    "halved": sum(r.halved for r in group) / trials,
                    "collapsed": sum(r.collapsed for r in group) / trials,
                    "feasible": sum(r.feasible for r in group) / trials,
                    "repeats": sum(r.repeats for r in group) / trials,
                }
            )
    return rows


def run_halving(
    *,
    seeds: int,
    budget: int,
    workers: Sequence[int] = (1,),
    methods: Sequence[str] = METHODS,
    eta: float = Halving().eta,
    min_epoch: int | None = None,
    min_peers: int = Halving().min_peers,
    jobs: int = 2,
    cache: Path = CURVES_PATH,
) -> tuple[list[dict[str, Any]], str]:
    """Every method x worker count x seed on the cached curves; the rows and the printed report."""
    if "tpe" not in methods:
        raise ValueError("methods: full-budget TPE is the reference; include tpe")
    _quiet()
    plain, curves = load_curves(cache)
    halving = halving_definition(eta=eta, min_epoch=min_epoch, min_peers=min_peers)
    surrogate = Surrogate(plain.space, curves)
    tasks = [
        (curves, surrogate, halving if m.endswith("+halving") else plain, m.split("+")[0], w, seed, budget)
        for m in methods
        for w in workers
        for seed in range(seeds)
    ]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            runs = list(pool.map(_run_one, tasks))
    else:
        runs = [run_search(*t) for t in tasks]
    rows = summarize(runs, budget)
    assert halving.halving is not None
    rule = halving.halving
    text = "\n".join(
        [
            f"successive halving: benchmark 6's study (studies/tiny.yaml space, CPU size, "
            f"{plain.base.train.epochs} epochs) on {len(curves)} cached learning curves; a budget of "
            f"{budget} training epochs per search, {seeds} seed(s); rungs {rule.rungs}, eta {rule.eta:g}, "
            f"min_peers {rule.min_peers}, judged on {', '.join(rule.metrics or [])} over {rule.days} days",
            table(rows, COLUMNS),
            "hv@F: mean hypervolume of the feasible front after F of the budget's epochs; epochs_to_tpe: "
            "median epochs to reach full-budget TPE's mean final hypervolume (inf: not reached by half "
            "the seeds); reach: share of seeds that reached it; of_budget: epochs_to_tpe / budget "
            "(target <= 0.5 for tpe+halving)",
        ]
    )
    return rows, text


def format_correlations(rows: Sequence[dict[str, Any]]) -> str:
    return table(rows, list(rows[0]))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--budget", type=int, default=1200, help="training epochs per search (default 60 x 20)")
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--eta", type=float, default=Halving().eta)
    p.add_argument("--min-epoch", type=int, help="the first rung (default: the study file's default)")
    p.add_argument("--min-peers", type=int, default=Halving().min_peers)
    p.add_argument("--jobs", type=int, default=2, help="searches run side by side (default 2)")
    p.add_argument("--cache", type=Path, default=CURVES_PATH)
    p.add_argument("--correlations", action="store_true", help="how well each epoch predicts the end")
    p.add_argument("--build-cache", action="store_true", help="train every point and write the cache")
    p.add_argument("--points", type=int, default=240, help="cached points with --build-cache")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    if args.build_cache:
        print(f"building {args.cache}: {args.points} real trials, one process", flush=True)
        print(f"written {build_cache(args.points, args.cache)}")
        return
    if args.correlations:
        _quiet()
        _, curves = load_curves(args.cache)
        definition = halving_definition(eta=args.eta)
        rows = correlations(definition, curves)
        print(
            f"rank correlation (Spearman) of each rung metric after each epoch with its value after "
            f"{curves[0].epochs} epochs, over {len(curves)} cached trials (all; healthy: those the "
            "collapse rule lets finish); front kept: share of the final feasible front in the rule's "
            f"top 1/{args.eta:g} at that epoch"
        )
        print(format_correlations(rows))
        write_json(args.json, {"rows": rows})
        return
    rows, text = run_halving(
        seeds=args.seeds,
        budget=args.budget,
        workers=args.workers,
        methods=args.methods,
        eta=args.eta,
        min_epoch=args.min_epoch,
        min_peers=args.min_peers,
        jobs=args.jobs,
        cache=args.cache,
    )
    print(text)
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
