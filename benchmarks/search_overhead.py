"""Search overhead: per-trial time outside training and evaluation, our worker against raw Optuna.

Our side is the real worker loop (:func:`search.worker.run_worker`: stale-trial reaping,
budget-guarded ask under the study lock, heartbeat, constraints, grouped user attributes,
artifact upload, tell) with training replaced by :class:`StandInTrainer`, which returns a
realistic :class:`~model.trainer.TrainResult` (every registry metric, a 30-epoch history)
and writes ``samples.png``, ``metrics.json`` and ``config.yaml`` as the trainer does. The
baseline, in the same run, on the same PostgreSQL server and with the same sampler, is raw
``study.optimize`` with an objective that only suggests the same eight parameters.

Overhead per trial is the loop's wall time minus the stand-in's (and the one data load),
divided by the trials; for raw Optuna it is its whole wall time per trial. The split
attributes it to ask, sampling (suggest), constraints, attributes, artifacts, tell, the
loop's reaping and counting, and the rest (mostly the heartbeat thread's start and stop).

``search.objective.TrialObjective`` calls ``search.objective.train``; the stand-in is put in
its place by :func:`stand_in_training` (there is no injection argument), which the scale-out
benchmark uses too.

Each benchmark creates its own database (``bench_<random>``) on ``$CVAE_SEARCH_BENCH_PG``
(default ``postgresql://postgres@127.0.0.1:5432/postgres``) and drops it at the end, and
measures only once the machine is quiet (:func:`wait_for_quiet`).

    python -m benchmarks.search_overhead --trials 100 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import optuna.artifacts
from optuna.artifacts import FileSystemArtifactStore

import search.objective
import search.worker
from benchmarks.common import table, write_json
from model.checkpoint import versions
from model.config import Config, config_from_dict, get_field, save_config
from model.metrics import METRICS
from model.trainer import LOSS_TERMS, TrainResult
from search.definition import SamplerSpec, StudyDefinition, load_definition
from search.objective import TrialObjective, constraint_values, suggest_space
from search.storage import SearchStorage, open_storage
from search.study import create_study

__all__ = [
    "DEFAULT_TRIAL_S",
    "StandInTrainer",
    "bench_database",
    "bench_definition",
    "main",
    "measure_ours",
    "measure_raw",
    "quiet_optuna",
    "run_overhead",
    "samples_png",
    "stand_in_training",
    "synthetic_metrics",
    "wait_for_quiet",
]

_log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PG_SERVER_ENV = "CVAE_SEARCH_BENCH_PG"
PG_SERVER_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_TRIAL_S = 40.0
"""A default trial on an H100: 30 epochs of ~2,800 training fields at ~3,600 samples/s, plus
evaluation and start-up (benchmarks/RESULTS.md)."""
QUIET_LOAD = 0.7
PHASES = (
    "reap",
    "count",
    "ask",
    "sample",
    "config",
    "heartbeat",
    "constraints",
    "attrs",
    "artifacts",
    "records",
    "tell",
)

TINY_DATA: dict[str, Any] = {
    "data": {
        "source": "synthetic",
        "synthetic": {"n_days": 96, "height": 16, "width": 16},
        "upscale_factor": 4,
    },
    "model": {"latent_dim": 8, "channels": 8, "n_res_blocks": 1},
    "train": {"epochs": 30, "batch_size": 16, "device": "cpu"},
    "eval": {"n_samples": 4, "max_days": 16, "plot_days": 1},
}
"""The stand-in trains nothing; a small data set keeps the worker's one data load short."""


# --- the machine and the database -------------------------------------------------------------


def _cpu_busy(sample_s: float) -> float:
    """Busy cores, averaged over ``sample_s`` seconds (what the load average would settle to)."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = read()
    time.sleep(sample_s)
    busy1, total1 = read()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(*, max_wait_s: float = 300.0, instant: bool = False) -> float:
    """Wait until the machine is quiet; the 1-minute load average seen (or the busy cores).

    Quiet is a 1-minute load average under 0.7. With ``instant``, between the runs of one
    benchmark, it is under 0.7 busy cores over one second instead: the load average still
    holds the benchmark's own previous run for minutes after it ended.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        load = _cpu_busy(1.0) if instant else os.getloadavg()[0]
        if load < QUIET_LOAD:
            return load
        if time.monotonic() > deadline:
            _log.warning("machine not quiet after %.0f s (load %.2f); measuring anyway", max_wait_s, load)
            return load
        time.sleep(5.0)


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one benchmark run, as a SQLAlchemy URL; dropped afterwards."""
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    server = os.environ.get(PG_SERVER_ENV, PG_SERVER_DEFAULT)
    name = f"bench_{uuid.uuid4().hex[:12]}"

    def admin(statement: sql.Composable) -> None:
        try:
            conn = psycopg2.connect(server, connect_timeout=5)
        except psycopg2.OperationalError as e:
            raise ConnectionError(f"{PG_SERVER_ENV}={server}: PostgreSQL is unreachable ({e})") from e
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
        conn.close()

    admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(server).set(drivername="postgresql+psycopg2", database=name).render_as_string(False)
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def quiet_optuna() -> None:
    """Optuna's per-trial info logs and the experimental/heartbeat warnings would flood the table."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("search").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed", category=UserWarning)


# --- the stand-in for training ----------------------------------------------------------------------


def synthetic_metrics(params: Mapping[str, Any]) -> dict[str, float]:
    """Every registry metric, a smooth function of the tiny study's loss fields.

    Diversity falls with ``beta_kl`` and rises with free bits; KS distance is smallest near
    a loss scale of 10; mass bias follows ``lambda_mass``: a front, constraints that bind on
    part of the space, and values a sampler can learn from.
    """
    beta = float(params.get("loss.beta_kl", 0.05))
    free_bits = float(params.get("loss.free_bits", 0.5))
    scale = float(params.get("loss.scale", 20.0))
    lambda_grad = float(params.get("loss.lambda_grad", 0.0))
    lambda_mass = float(params.get("loss.lambda_mass", 0.005))
    diversity = (0.3 + 0.4 * free_bits) / (1.0 + 3.0 * beta)
    metrics = {name: 0.5 for name in METRICS}
    metrics.update(
        diversity=diversity,
        ks_stat=0.08 + 0.1 * abs(math.log10(scale) - 1.0) + 0.05 * lambda_grad + 0.05 * diversity,
        mass_bias=0.4 + 0.1 * math.log10(lambda_mass),
        spread_norm=0.05 + 0.2 * diversity,
        z_usage=0.1 * free_bits,
        spatial_correlation=0.55,
    )
    return metrics


def samples_png() -> bytes:
    """A figure of the size a production trial writes (3 days x (observed + 4 samples), 128x128)."""
    import torch

    from model.plots import plot_samples

    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(3, 128, 128, generator=gen) * 20
    samples = torch.rand(3, 4, 128, 128, generator=gen) * 20
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_samples(obs, samples, torch.ones(3, 128, 128, dtype=torch.bool), Path(tmp) / "s.png")
        return path.read_bytes()


class StandInTrainer:
    """A constant-time replacement for :func:`model.trainer.train`.

    Sleeps ``seconds``, returns a :class:`TrainResult` with every registry metric (from
    :func:`synthetic_metrics`), a ``epochs``-long history and diagnostics, and writes the three
    files the trainer writes into ``out_dir``. It keeps the time spent inside it, so that a
    benchmark can take it off the wall time.

    Args:
        seconds: Sleep per call: the training time being stood in for.
        epochs: Length of the history recorded.
        ready_file: Created on the first call (the process has started its first trial).
        figure: The ``samples.png`` to write (default: one rendered at production size now).
    """

    def __init__(
        self,
        seconds: float = 0.0,
        *,
        epochs: int = 30,
        ready_file: Path | None = None,
        figure: bytes | None = None,
    ) -> None:
        self.seconds = seconds
        self.epochs = epochs
        self.ready_file = ready_file
        self.calls = 0
        self.spent_s = 0.0
        self._png = figure if figure is not None else samples_png()
        self._versions = versions()

    def __call__(
        self,
        cfg: Config,
        *,
        out_dir: str | Path | None = None,
        callbacks: Sequence[Callable[..., Any]] = (),
        data: object = None,
    ) -> TrainResult:
        t0 = time.perf_counter()
        if self.ready_file is not None and self.calls == 0:
            self.ready_file.touch()
        if self.seconds > 0:
            time.sleep(self.seconds)
        keys = ("loss.beta_kl", "loss.free_bits", "loss.scale", "loss.lambda_grad", "loss.lambda_mass")
        metrics = synthetic_metrics({k: get_field(cfg, k) for k in keys})
        history = [
            {
                "epoch": e,
                **{t: 1.0 / e for t in LOSS_TERMS},
                "beta": cfg.loss.beta_kl,
                "samples_per_s": 3600.0,
            }
            for e in range(1, self.epochs + 1)
        ]
        result = TrainResult(
            config=cfg,
            metrics=metrics,
            diagnostics={"rank_histogram": [1.0 / 9] * 9, "spectrum_ratio": [1.0] * 32},
            history=history,
            epochs_run=self.epochs,
            stopped=None,
            timings={"train_s": self.seconds, "eval_s": 0.0, "samples_per_s": 3600.0},
            device="cpu",
            precision="fp32",
            threads=1,
            cpu_capability="DEFAULT",
            versions=self._versions,
        )
        if out_dir is not None:
            out = Path(out_dir)
            (out / "samples.png").write_bytes(self._png)
            result.figure = out / "samples.png"
            result.metrics_file = out / "metrics.json"
            result.metrics_file.write_text(json.dumps({"metrics": metrics, "history": history}, indent=2))
            save_config(cfg, out / "config.yaml")
        result.timings["total_s"] = time.perf_counter() - t0
        self.calls += 1
        self.spent_s += time.perf_counter() - t0
        return result


@contextlib.contextmanager
def stand_in_training(trainer: StandInTrainer) -> Iterator[StandInTrainer]:
    """Put ``trainer`` in place of the training that :class:`search.objective.TrialObjective` runs."""
    original = search.objective.train
    search.objective.train = trainer  # type: ignore[assignment]
    try:
        yield trainer
    finally:
        search.objective.train = original


def bench_definition(n_trials: int, sampler: str = "tpe", name: str = "overhead") -> StudyDefinition:
    """studies/tiny.yaml's space, objectives and constraints on a small data set, no baselines."""
    tiny = load_definition(REPO / "studies" / "tiny.yaml")
    base = config_from_dict(TINY_DATA, "benchmarks/search_overhead.py: TINY_DATA")
    return dataclasses.replace(
        tiny,
        name=name,
        base=base,
        n_trials=n_trials,
        max_failures=n_trials,
        sampler=SamplerSpec(sampler, 0, {}),
        baselines={},
    )


# --- measuring ------------------------------------------------------------------------------------


class _PhaseTimer:
    """Wraps functions so that the time spent in each is added to its phase.

    Only the outermost wrapped call of a thread counts (the first heartbeat inside ``ask``
    is part of ask), so the phases add up to no more than the wall time.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.first_call: dict[str, float] = {}
        self._undo: list[tuple[object, str, Any]] = []
        self._inside = threading.local()

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._inside, "active", False):
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            self.first_call.setdefault(phase, t0)
            self._inside.active = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.active = False
                self.seconds[phase] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


@dataclasses.dataclass
class Measurement:
    variant: str
    trials: int
    wall_s: float
    excluded_s: float
    """Stand-in training and data loading: not overhead."""
    phases: dict[str, float]

    @property
    def per_trial_s(self) -> float:
        return (self.wall_s - self.excluded_s) / self.trials


@contextlib.contextmanager
def _restored_signals() -> Iterator[None]:
    """run_worker installs its SIGTERM/SIGINT handlers for good; the benchmark wants Ctrl-C back."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def measure_ours(url: str, trials: int, sampler: str = "tpe", study: str = "ours") -> Measurement:
    """``trials`` trials of our worker loop with the stand-in, in this process."""
    definition = bench_definition(trials, sampler, study)
    storage = open_storage(url)
    create_study(definition, storage)
    storage.engine.dispose()  # type: ignore[attr-defined]
    timer = _PhaseTimer()
    for owner, attr, phase in (
        (search.worker, "reap_stale_trials", "reap"),
        (search.worker, "_counts", "count"),
        (optuna.study.Study, "ask", "ask"),
        (search.objective, "suggest", "sample"),
        (StudyDefinition, "config_for", "config"),
        (SearchStorage, "record_heartbeat", "heartbeat"),
        (optuna.trial.Trial, "set_constraint", "constraints"),
        (optuna.trial.Trial, "set_user_attr", "attrs"),
        (search.objective, "upload_artifact", "artifacts"),
        (search.worker, "record_trial_attrs", "records"),
        (search.worker, "_tell_with_warning", "tell"),
        (search.objective, "load_data", "data"),
    ):
        timer.wrap(owner, attr, phase)
    trainer = StandInTrainer(0.0)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="overhead-artifacts-") as artifacts,
            stand_in_training(trainer),
            _restored_signals(),
        ):
            summary = search.worker.run_worker(study, storage_url=url, artifact_dir=artifacts)
            end = time.perf_counter()
    finally:
        timer.restore()
    if summary.completed != trials:
        raise RuntimeError(f"our worker completed {summary.completed} of {trials} trials ({summary})")
    wall = end - timer.first_call["reap"]
    phases = {p: timer.seconds.get(p, 0.0) / trials for p in PHASES}
    excluded = trainer.spent_s + timer.seconds.get("data", 0.0)
    phases["other"] = (wall - excluded) / trials - sum(phases.values())
    return Measurement("ours", trials, wall, excluded, phases)


def measure_raw(
    url: str, trials: int, sampler: str = "tpe", study: str = "raw", *, record: bool = False
) -> Measurement:
    """``trials`` trials of raw ``study.optimize``, in this process.

    The objective suggests the eight parameters and returns the values; with ``record`` it
    also sets the same constraints, user attributes and artifacts as our objective does
    (files written by the stand-in, whose time is taken off), as a user of raw Optuna who
    keeps the same records would.
    """
    definition = bench_definition(trials, sampler, study)
    timer = _PhaseTimer()
    trainer = StandInTrainer(0.0)
    artifacts = tempfile.TemporaryDirectory(prefix="overhead-artifacts-")
    store = FileSystemArtifactStore(artifacts.name)

    def objective(trial: optuna.Trial) -> list[float]:
        t0 = time.perf_counter()
        params = suggest_space(trial, definition.space)
        timer.seconds["sample"] += time.perf_counter() - t0
        metrics = synthetic_metrics(params)
        if record:
            with tempfile.TemporaryDirectory() as out:
                result = trainer(definition.base, out_dir=out)
                result.metrics = metrics
                for key, value in constraint_values(definition, metrics, None).items():
                    trial.set_constraint(key, value)
                for key, value in TrialObjective.attrs(trial, result).items():
                    trial.set_user_attr(key, value)
                for name in ("samples.png", "metrics.json", "config.yaml"):
                    optuna.artifacts.upload_artifact(
                        artifact_store=store, file_path=str(Path(out) / name), study_or_trial=trial
                    )
        return [metrics[o.metric] for o in definition.objectives]

    storage = optuna.storages.RDBStorage(url)
    raw = optuna.create_study(
        study_name=study, storage=storage, directions=definition.directions, sampler=definition.make_sampler()
    )
    for owner, attr, phase in (
        (optuna.study.Study, "ask", "ask"),
        (optuna.study._optimize, "_tell_with_warning", "tell"),
        (optuna.trial.Trial, "set_constraint", "constraints"),
        (optuna.trial.Trial, "set_user_attr", "attrs"),
        (optuna.artifacts, "upload_artifact", "artifacts"),
    ):
        timer.wrap(owner, attr, phase)
    try:
        t0 = time.perf_counter()
        raw.optimize(objective, n_trials=trials)
        wall = time.perf_counter() - t0
    finally:
        timer.restore()
        storage.engine.dispose()
        artifacts.cleanup()
    phases = {p: timer.seconds.get(p, 0.0) / trials for p in PHASES}
    phases["other"] = (wall - trainer.spent_s) / trials - sum(phases.values())
    return Measurement("raw+records" if record else "raw", trials, wall, trainer.spent_s, phases)


VARIANTS: dict[str, Callable[[str, int, str, str], Measurement]] = {
    "raw": measure_raw,
    "raw+records": functools.partial(measure_raw, record=True),
    "ours": measure_ours,
}
LABELS = {
    "raw": "raw optuna (suggest only)",
    "raw+records": "raw optuna + same records",
    "ours": "our worker loop",
}


def run_overhead(
    *,
    trials: int,
    repeats: int = 1,
    sampler: str = "tpe",
    max_wait_s: float = 300.0,
    url: str | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Raw Optuna and our worker, alternately, ``repeats`` times each; the rows and the report.

    Args:
        trials: Trials per run.
        repeats: Runs of each variant.
        sampler: A sampler of the registry (``search.samplers``).
        max_wait_s: How long to wait for a quiet machine before each run.
        url: A PostgreSQL database to use (default: a fresh one, dropped afterwards).
    """
    quiet_optuna()
    loads: list[float] = []
    by_variant: dict[str, list[Measurement]] = defaultdict(list)
    loads.append(wait_for_quiet(max_wait_s=max_wait_s))
    tag = uuid.uuid4().hex[:8]
    with contextlib.nullcontext(url) if url else bench_database() as database:
        for r in range(repeats):
            for variant, measure in VARIANTS.items():
                if by_variant:
                    loads.append(wait_for_quiet(max_wait_s=max_wait_s, instant=True))
                by_variant[variant].append(measure(database, trials, sampler, f"{variant}-{r}-{tag}"))
    rows: list[dict[str, Any]] = []
    raw_ms = 1000 * statistics.fmean(m.per_trial_s for m in by_variant["raw"])
    for variant, label in LABELS.items():
        ms = [m.per_trial_s * 1000 for m in by_variant[variant]]
        row: dict[str, Any] = {
            "variant": label,
            "trials": trials * len(ms),
            "ms_per_trial": statistics.fmean(ms),
            "spread_ms": (max(ms) - min(ms)) if len(ms) > 1 else float("nan"),
            "vs_raw": statistics.fmean(ms) / raw_ms,
            "of_40s_trial": statistics.fmean(ms) / 1000 / DEFAULT_TRIAL_S,
        }
        for phase in (*PHASES, "other"):
            row[phase] = 1000 * statistics.fmean(m.phases[phase] for m in by_variant[variant])
        rows.append(row)
    ours, recording = rows[2], rows[1]
    n_params = len(bench_definition(trials, sampler).space)
    text = "\n".join(
        [
            f"search overhead per trial ({sampler} sampler, {n_params} parameters, {trials} trials per run, "
            f"{repeats} run(s) each, PostgreSQL at 127.0.0.1; load average before {loads[0]:.2f}, "
            f"busy cores between runs <= {max(loads[1:], default=float('nan')):.2f}); "
            "phase columns in ms per trial",
            table(
                rows,
                [
                    "variant",
                    "trials",
                    "ms_per_trial",
                    "spread_ms",
                    "vs_raw",
                    "of_40s_trial",
                    *PHASES,
                    "other",
                ],
            ),
            f"ours / raw = {ours['vs_raw']:.2f} (target <= 1.5); ours / raw keeping the same records = "
            f"{ours['ms_per_trial'] / recording['ms_per_trial']:.2f}; "
            f"ours / default {DEFAULT_TRIAL_S:.0f} s trial = {ours['of_40s_trial']:.2%} (target < 1%)",
        ]
    )
    return rows, text


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100, help="trials per run (default 100)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating (default 2)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random", "nsga2"])
    p.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    rows, text = run_overhead(
        trials=args.trials, repeats=args.repeats, sampler=args.sampler, max_wait_s=args.max_wait
    )
    print(text)
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
