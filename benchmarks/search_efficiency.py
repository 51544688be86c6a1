"""Search efficiency: hypervolume against trial count for each sampler, with 1 and 4 workers.

The study is ``studies/tiny.yaml`` (its eight-parameter space, objectives diversity up and
ks_stat down, the ``|mass_bias| <= 0.15`` and collapse constraints, reference point [0, 1])
with training shrunk to CPU size. Running the real objective for every sampler, worker
count, seed and budget would take hours on two cores, so the objective is a cached
surrogate: the real :class:`search.objective.TrialObjective` was run once on a Latin
hypercube sample of the space (``--build-cache``, stored with how it was produced in
``benchmarks/results/efficiency_cache.json``), and a sampler's proposal gets the measured
result of the nearest cached point (same categorical choices; nearest in the unit cube,
log-scaled where the parameter is).

Each worker has its own sampler (seed offset by its slot, as the service does) on one
shared study; with several workers, trials are in flight together and finish in the order
their measured training times give, so constant liar and its absence both show. The
baseline is random search in the same run.

    python -m benchmarks.search_efficiency --budget 60 --seeds 4
    python -m benchmarks.search_efficiency --build-cache --points 240
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import heapq
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from benchmarks.common import table, write_json
from model.config import DownstreamConfig, with_overrides
from search.definition import Param, StudyDefinition, load_definition
from search.objective import COLLAPSE_CONSTRAINT, TrialObjective, suggest_space
from search.report import hypervolume_history
from search.samplers import make_sampler

__all__ = [
    "CACHE_PATH",
    "CPU_SIZE",
    "CachedPoint",
    "Surrogate",
    "SearchRun",
    "build_cache",
    "efficiency_definition",
    "load_cache",
    "main",
    "run_efficiency",
    "run_search",
]

_log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE_PATH = REPO / "benchmarks" / "results" / "efficiency_cache.json"
SAMPLERS = ("tpe", "nsga2", "gp", "random")
COLUMNS_FIXED = [
    "sampler",
    "workers",
    "runs",
    "final_hv",
    "hv_sd",
    "vs_random",
    "collapsed",
    "feasible",
    "sampler_ms",
]

CPU_SIZE: dict[str, Any] = {
    "data.synthetic.n_days": 384,
    "data.synthetic.height": 16,
    "data.synthetic.width": 16,
    "data.upscale_factor": 4,
    "model.latent_dim": 8,
    "model.channels": 8,
    "train.epochs": 20,
    "train.device": "cpu",
    "train.save_checkpoint": False,
    "eval.max_days": 32,
    "eval.n_samples": 4,
    "eval.plot_days": 0,
}
"""Training of studies/tiny.yaml shrunk to a few seconds a trial on one CPU core; at 20 epochs
some settings still keep z in use, so the collapse constraint separates the space."""
COLLAPSE_AFTER_EPOCH = 15
"""tiny.yaml checks collapse after epoch 15 of 30; here after 15 of 20, with its floors unchanged."""
CATEGORICAL_MISMATCH = 100.0
"""Distance added per differing categorical choice: larger than any unit-cube distance."""


def efficiency_definition() -> StudyDefinition:
    """studies/tiny.yaml with CPU-size training, no baselines and no downstream stage."""
    tiny = load_definition(REPO / "studies" / "tiny.yaml")
    assert tiny.collapse is not None
    base = dataclasses.replace(tiny.base, downstream=DownstreamConfig())
    return dataclasses.replace(
        tiny,
        name="efficiency",
        base=with_overrides(base, CPU_SIZE, "benchmarks/search_efficiency.py: CPU_SIZE"),
        collapse=dataclasses.replace(tiny.collapse, after_epoch=COLLAPSE_AFTER_EPOCH),
        baselines={},
        save_checkpoints=False,
    )


# --- the unit cube --------------------------------------------------------------------------------


def from_unit(u: Sequence[float], space: Mapping[str, Param]) -> dict[str, Any]:
    """Parameters at a point of the unit cube (one coordinate per searched field)."""
    params: dict[str, Any] = {}
    for (name, p), x in zip(space.items(), u, strict=True):
        if p.type == "categorical":
            assert p.choices is not None
            params[name] = p.choices[min(int(x * len(p.choices)), len(p.choices) - 1)]
            continue
        assert p.low is not None and p.high is not None
        if p.log:
            value = math.exp(math.log(p.low) + x * (math.log(p.high) - math.log(p.low)))
        else:
            value = p.low + x * (p.high - p.low)
        params[name] = int(round(value)) if p.type == "int" else float(value)
    return params


def to_unit(params: Mapping[str, Any], space: Mapping[str, Param]) -> tuple[np.ndarray, tuple[Any, ...]]:
    """The numeric parameters' unit-cube coordinates, and the categorical choices."""
    coords: list[float] = []
    choices: list[Any] = []
    for name, p in space.items():
        value = params[name]
        if p.type == "categorical":
            choices.append(value)
            continue
        assert p.low is not None and p.high is not None
        if p.high == p.low:
            coords.append(0.0)
        elif p.log:
            coords.append((math.log(value) - math.log(p.low)) / (math.log(p.high) - math.log(p.low)))
        else:
            coords.append((value - p.low) / (p.high - p.low))
    return np.array(coords), tuple(choices)


# --- the cache ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedPoint:
    """One real trial of the efficiency study."""

    params: dict[str, Any]
    state: str
    """COMPLETE or FAIL."""
    values: list[float] | None
    constraints: dict[str, float]
    stopped: str | None
    seconds: float
    """Wall time of the trial as it ran."""

    @property
    def collapsed(self) -> bool:
        return self.constraints.get(COLLAPSE_CONSTRAINT, 0.0) > 0

    @property
    def feasible(self) -> bool:
        return self.state == "COMPLETE" and all(v <= 0 for v in self.constraints.values())


_worker_objective: TrialObjective | None = None


def _init_cache_worker(definition: dict[str, Any], artifact_dir: str) -> None:
    global _worker_objective
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    _worker_objective = TrialObjective(StudyDefinition.from_dict(definition), artifact_dir=artifact_dir)


def _evaluate_point(params: dict[str, Any]) -> dict[str, Any]:
    """Run the real objective on ``params`` (an enqueued trial of an in-memory study)."""
    assert _worker_objective is not None
    definition = _worker_objective.definition
    study = optuna.create_study(directions=definition.directions)
    study.enqueue_trial(params)
    t0 = time.perf_counter()
    study.optimize(_worker_objective, n_trials=1, catch=(Exception,))
    trial = study.trials[-1]
    return {
        "params": trial.params,
        "state": trial.state.name,
        "values": trial.values,
        "constraints": trial.constraints,
        "stopped": trial.user_attrs.get("stopped"),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def build_cache(points: int, jobs: int, path: Path = CACHE_PATH, seed: int = 0) -> Path:
    """Run the real objective on a Latin hypercube sample of the space and store the results."""
    from scipy.stats import qmc

    definition = efficiency_definition()
    unit = qmc.LatinHypercube(d=len(definition.space), seed=seed).random(points)
    designs = [from_unit(u, definition.space) for u in unit]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="efficiency-artifacts-") as artifacts:
        with ProcessPoolExecutor(
            jobs, initializer=_init_cache_worker, initargs=(definition.to_dict(), artifacts)
        ) as pool:
            results = []
            for i, result in enumerate(pool.map(_evaluate_point, designs), 1):
                results.append(result)
                if i % 20 == 0:
                    print(f"  {i}/{points} points, {time.perf_counter() - t0:.0f} s", flush=True)
    from model.checkpoint import versions

    produced_by = {
        "command": f"python -m benchmarks.search_efficiency --build-cache --points {points} --jobs {jobs}",
        "how": (
            "search.objective.TrialObjective (real training and evaluation) on each point of a "
            f"Latin hypercube sample (scipy.stats.qmc, seed {seed}) of the study's space, one torch "
            f"thread per process, {jobs} processes"
        ),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "versions": {**versions(), "optuna": optuna.__version__},
        "digest": definition.digest(),
        "definition": definition.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"produced_by": produced_by, "points": results}, indent=1))
    return path


def load_cache(path: Path = CACHE_PATH) -> tuple[StudyDefinition, list[CachedPoint]]:
    """The cached points and the definition they were produced with (which must be today's)."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no cache; build it with python -m benchmarks.search_efficiency --build-cache"
        )
    data = json.loads(path.read_text())
    definition = efficiency_definition()
    digest = data["produced_by"]["digest"]
    if digest != definition.digest():
        raise ValueError(
            f"{path}: produced for definition digest {digest}, but the efficiency study now has "
            f"{definition.digest()}; rebuild it with --build-cache"
        )
    points = [CachedPoint(**p) for p in data["points"]]
    return definition, points


class Surrogate:
    """Answers a proposal with the nearest cached point's measured result."""

    def __init__(self, space: Mapping[str, Param], points: Sequence[CachedPoint]) -> None:
        if not points:
            raise ValueError("surrogate: expected at least one cached point")
        self.space = dict(space)
        self.points = list(points)
        units = [to_unit(p.params, space) for p in points]
        self._coords = np.stack([u for u, _ in units])
        self._choices = [c for _, c in units]

    def nearest(self, params: Mapping[str, Any]) -> CachedPoint:
        coords, choices = to_unit(params, self.space)
        d2 = ((self._coords - coords) ** 2).sum(axis=1)
        mismatch = np.array([sum(a != b for a, b in zip(c, choices, strict=True)) for c in self._choices])
        return self.points[int(np.argmin(d2 + CATEGORICAL_MISMATCH * mismatch))]

    def front_hypervolume(self, definition: StudyDefinition) -> float:
        """Hypervolume of the feasible front of every cached point: the most any search can reach."""
        study = optuna.create_study(directions=definition.directions)
        for p in self.points:
            if p.state == "COMPLETE" and p.values is not None:
                trial = study.ask()
                for key, value in p.constraints.items():
                    trial.set_constraint(key, value)
                study.tell(trial, p.values)
        history = hypervolume_history(study, definition)
        return history[-1][1] if history else 0.0


# --- searching --------------------------------------------------------------------------------------


@dataclass
class SearchRun:
    sampler: str
    workers: int
    seed: int
    hypervolume: list[float]
    """After each complete trial, in trial-number order."""
    asked: int
    collapsed: int
    feasible: int
    sampler_s: float
    """Time in ask, suggest and tell: the sampler's and the in-memory storage's share."""


def run_search(
    surrogate: Surrogate, definition: StudyDefinition, sampler: str, workers: int, seed: int, budget: int
) -> SearchRun:
    """One search of ``budget`` trials by ``workers`` simulated workers, each with its own sampler."""
    storage = optuna.storages.InMemoryStorage()
    name = f"{sampler}-{workers}-{seed}"
    optuna.create_study(storage=storage, study_name=name, directions=definition.directions)
    views = [
        optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(sampler, 1000 * seed, {}, w))
        for w in range(workers)
    ]
    in_flight: list[tuple[float, int, int, optuna.Trial, CachedPoint]] = []
    run = SearchRun(sampler, workers, seed, [], 0, 0, 0, 0.0)

    def start(worker: int, now: float) -> None:
        t0 = time.perf_counter()
        trial = views[worker].ask()
        params = suggest_space(trial, definition.space)
        run.sampler_s += time.perf_counter() - t0
        point = surrogate.nearest(params)
        run.asked += 1
        run.collapsed += point.collapsed
        run.feasible += point.feasible
        heapq.heappush(in_flight, (now + point.seconds, trial.number, worker, trial, point))

    for w in range(min(workers, budget)):
        start(w, 0.0)
    while in_flight:
        now, _, worker, trial, point = heapq.heappop(in_flight)
        t0 = time.perf_counter()
        if point.state == "COMPLETE" and point.values is not None:
            for key, value in point.constraints.items():
                trial.set_constraint(key, value)
            views[worker].tell(trial, point.values)
        else:
            views[worker].tell(trial, state=optuna.trial.TrialState.FAIL)
        run.sampler_s += time.perf_counter() - t0
        if run.asked < budget:
            start(worker, now)
    run.hypervolume = [hv for _, hv in hypervolume_history(views[0], definition)]
    return run


def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")


def _run_one(args: tuple[Surrogate, StudyDefinition, str, int, int, int]) -> SearchRun:
    _quiet()
    import torch

    torch.set_num_threads(1)  # GPSampler's torch work, one core per run
    return run_search(*args)


def _hv_at(run: SearchRun, count: int) -> float:
    if not run.hypervolume:
        return 0.0
    return run.hypervolume[min(count, len(run.hypervolume)) - 1]


def summarize(runs: Sequence[SearchRun], checkpoints: Sequence[int]) -> list[dict[str, Any]]:
    """One row per sampler and worker count: mean (and spread) of the hypervolume, rates."""
    rows: list[dict[str, Any]] = []
    keys = sorted({(r.sampler, r.workers) for r in runs}, key=lambda k: (k[1], SAMPLERS.index(k[0])))
    for sampler, workers in keys:
        group = [r for r in runs if r.sampler == sampler and r.workers == workers]
        finals = [_hv_at(r, r.asked) for r in group]
        asked = sum(r.asked for r in group)
        row: dict[str, Any] = {
            "sampler": sampler,
            "workers": workers,
            "runs": len(group),
            "final_hv": statistics.fmean(finals),
            "hv_sd": statistics.stdev(finals) if len(finals) > 1 else float("nan"),
            "collapsed": sum(r.collapsed for r in group) / asked,
            "feasible": sum(r.feasible for r in group) / asked,
            "sampler_ms": 1000 * sum(r.sampler_s for r in group) / asked,
        }
        for c in checkpoints:
            row[f"hv@{c}"] = statistics.fmean(_hv_at(r, c) for r in group)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["sampler"] == "random" and r["workers"] == row["workers"])
        row["vs_random"] = row["final_hv"] / base["final_hv"] if base["final_hv"] > 0 else float("nan")
    return rows


def columns(checkpoints: Sequence[int]) -> list[str]:
    """The table's columns for these checkpoints."""
    fixed = list(COLUMNS_FIXED)
    return fixed[:3] + [f"hv@{c}" for c in checkpoints] + fixed[3:]


def recommend(rows: Sequence[dict[str, Any]]) -> str:
    """The sampler with the best mean final hypervolume over every worker count."""
    samplers = sorted({r["sampler"] for r in rows})
    score = {s: statistics.fmean(r["final_hv"] for r in rows if r["sampler"] == s) for s in samplers}
    return max(samplers, key=lambda s: score[s])


def run_efficiency(
    *,
    budget: int,
    seeds: int,
    workers: Sequence[int] = (1, 4),
    samplers: Sequence[str] = SAMPLERS,
    checkpoints: Sequence[int] | None = None,
    jobs: int = 2,
    cache: Path = CACHE_PATH,
) -> tuple[list[dict[str, Any]], str]:
    """Every sampler x worker count x seed on the cached surrogate; the rows and the printed report."""
    if "random" not in samplers:
        raise ValueError("samplers: random search is the baseline; include it")
    _quiet()
    checkpoints = sorted(
        {c for c in (checkpoints or (budget // 4, budget // 2)) if 0 < c < budget} | {budget}
    )
    definition, points = load_cache(cache)
    surrogate = Surrogate(definition.space, points)
    tasks = [
        (surrogate, definition, s, w, seed, budget)
        for s in samplers
        for w in workers
        for seed in range(seeds)
    ]
    # The slowest sampler's runs go first so that the pool's two lanes end together.
    tasks.sort(key=lambda t: t[2] != "gp")
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            runs = list(pool.map(_run_one, tasks))
    else:
        runs = [run_search(*t) for t in tasks]
    rows = summarize(runs, checkpoints)
    best = surrogate.front_hypervolume(definition)
    collapsed = sum(p.collapsed for p in points) / len(points)
    text = "\n".join(
        [
            f"search efficiency: studies/tiny.yaml space at CPU size, cached surrogate of {len(points)} real "
            f"trials ({collapsed:.0%} of them collapsed); budget {budget}, {seeds} seed(s); "
            f"hypervolume of the feasible front against {definition.reference_point}; "
            f"every cached point together: {best:.4g}",
            table(rows, columns(checkpoints)),
            f"recommended default sampler: {recommend(rows)} "
            "(best mean final hypervolume over worker counts)",
        ]
    )
    return rows, text


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=60, help="trials per search (default 60, as v4_search)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--checkpoints", type=int, nargs="+", help="trial counts to report (default budget/4, /2)")
    p.add_argument("--jobs", type=int, default=2, help="searches run side by side (default 2)")
    p.add_argument("--cache", type=Path, default=CACHE_PATH)
    p.add_argument("--build-cache", action="store_true", help="run the real objective and write the cache")
    p.add_argument("--points", type=int, default=240, help="cached points with --build-cache")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    if args.build_cache:
        print(f"building {args.cache}: {args.points} real trials over {args.jobs} processes", flush=True)
        print(f"written {build_cache(args.points, args.jobs, args.cache)}")
        return
    rows, text = run_efficiency(
        budget=args.budget,
        seeds=args.seeds,
        workers=args.workers,
        samplers=args.samplers,
        checkpoints=args.checkpoints,
        jobs=args.jobs,
        cache=args.cache,
    )
    print(text)
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
