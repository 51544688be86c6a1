"""Scale-out: trials per hour and database connections against the number of worker processes.

N processes share one study on the local PostgreSQL with a fixed-duration objective (1 s).
Ours are the real worker loop (:func:`search.worker.run_worker`, heartbeat, stale-trial
reaping, budget-guarded ask, attributes, artifacts) with training replaced by
:class:`benchmarks.search_overhead.StandInTrainer` sleeping 1 s; the baseline, in the same
run, is N raw Optuna processes (``study.optimize`` with the same sampler and a 1 s objective
that suggests the same eight parameters).

Each run starts N processes on a fresh study, waits until every process has begun its first
trial, lets them run a short while, and then counts the trials completed in a window of
``--window`` seconds (from their completion times, so quantisation does not bias a single
worker's rate). The rate is compared with N times the one-process rate of the same kind and
sampler. A thread polls ``pg_stat_activity`` for the benchmark database all along (start-up
included) and keeps the maximum; ours must stay within N x 3 (pool size 2 + overflow 1).

    python -m benchmarks.scale_out --processes 1 2 4 8 16 32 --samplers tpe random --window 15
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import table, write_json
from benchmarks.search_overhead import (
    StandInTrainer,
    bench_database,
    bench_definition,
    quiet_optuna,
    samples_png,
    stand_in_training,
    synthetic_metrics,
    wait_for_quiet,
)

__all__ = ["POOL_PER_PROCESS", "main", "run_scale_out"]

_log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
POOL_PER_PROCESS = 3
"""SearchStorage's pool: pool_size 2 + max_overflow 1."""
BUDGET = 1_000_000
"""The study's budget: never reached, the window decides when a run ends."""
COLUMNS = [
    "sampler",
    "kind",
    "processes",
    "trials_per_h",
    "ideal_per_h",
    "vs_ideal",
    "max_conn",
    "conn_bound",
    "cpu_busy",
    "trials_before",
]


# --- the worker processes ---------------------------------------------------------------------------


def _child_ours(study: str, url: str, seconds: float, ready: Path, artifacts: Path, figure: Path) -> None:
    from search.worker import run_worker

    quiet_optuna()
    with stand_in_training(StandInTrainer(seconds, ready_file=ready, figure=figure.read_bytes())):
        run_worker(study, storage_url=url, artifact_dir=artifacts)


def _child_raw(study: str, url: str, seconds: float, ready: Path, sampler: str, index: int) -> None:
    import optuna

    from search.objective import suggest_space

    quiet_optuna()
    definition = bench_definition(BUDGET, sampler, study)
    loaded = optuna.load_study(study_name=study, storage=url, sampler=definition.make_sampler(index))

    def objective(trial: optuna.Trial) -> list[float]:
        if not ready.exists():
            ready.touch()
        params = suggest_space(trial, definition.space)
        time.sleep(seconds)
        metrics = synthetic_metrics(params)
        return [metrics[o.metric] for o in definition.objectives]

    loaded.optimize(objective)


# --- one run ----------------------------------------------------------------------------------------


class _Connections:
    """Polls the benchmark database's connections (other than this process's own) until stopped."""

    def __init__(self, url: str, interval: float = 0.2) -> None:
        import psycopg2
        from sqlalchemy.engine import make_url

        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
        self._database = make_url(url).database
        self._interval = interval
        self.max = 0
        self._stop = threading.Event()
        self._conn = psycopg2.connect(self._dsn)
        self._conn.autocommit = True
        self._thread = threading.Thread(target=self._poll, name="pg-connections", daemon=True)

    def __enter__(self) -> _Connections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()

    def _poll(self) -> None:
        with self._conn.cursor() as cur:
            while not self._stop.wait(self._interval):
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self._database,),
                )
                self.max = max(self.max, int(cur.fetchone()[0]))


def _completions(url: str, study: str) -> list[datetime.datetime]:
    import psycopg2
    from sqlalchemy.engine import make_url

    conn = psycopg2.connect(make_url(url).set(drivername="postgresql").render_as_string(False))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT t.datetime_complete FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE s.study_name = %s AND t.state = 'COMPLETE' ORDER BY 1",
                (study,),
            )
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def _cpu_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


@contextlib.contextmanager
def _processes(
    commands: Sequence[list[str]], env: dict[str, str], logs: Path
) -> Iterator[list[subprocess.Popen]]:
    """Start the commands; SIGTERM them at the end (SIGKILL what is left after 60 s)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, cmd in enumerate(commands):
            with open(logs / f"process-{i}.log", "wb") as out:
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _rate(stamps: Sequence[datetime.datetime], start: datetime.datetime, end: datetime.datetime) -> float:
    """Trials per second completed in [start, end]: from the first to the last completion in it."""
    inside = [s for s in stamps if start <= s <= end]
    if len(inside) < 2:
        return len(inside) / (end - start).total_seconds()
    return (len(inside) - 1) / (inside[-1] - inside[0]).total_seconds()


def _one_run(
    url: str, kind: str, sampler: str, n: int, *, seconds: float, window: float, settle: float, work: Path
) -> dict[str, Any]:
    import optuna

    from search.storage import open_storage
    from search.study import create_study

    study = f"{kind}-{sampler}-{n}-{uuid.uuid4().hex[:8]}"
    definition = bench_definition(BUDGET, sampler, study)
    if kind == "ours":
        storage = open_storage(url)
        create_study(definition, storage)
        storage.engine.dispose()  # type: ignore[attr-defined]
    else:
        raw = optuna.storages.RDBStorage(url)
        optuna.create_study(study_name=study, storage=raw, directions=definition.directions)
        raw.engine.dispose()
    ready = work / study / "ready"
    ready.mkdir(parents=True)
    child = [
        *(sys.executable, "-m", "benchmarks.scale_out", "--child", kind, "--study", study, "--storage", url),
        *("--seconds", str(seconds), "--sampler", sampler, "--artifact-dir", str(work / study / "artifacts")),
        *("--figure", str(work / "samples.png")),
    ]
    commands = [[*child, "--ready", str(ready / str(i)), "--index", str(i)] for i in range(n)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CVAE_SEARCH_THREADS": "1"}
    with _Connections(url) as connections, _processes(commands, env, work / study) as procs:
        deadline = time.monotonic() + 300
        while len(list(ready.iterdir())) < n:
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                log = (work / study / f"process-{procs.index(dead[0]) if dead else 0}.log").read_text()[
                    -2000:
                ]
                raise RuntimeError(f"{study}: a process ended or none started within 300 s; its log:\n{log}")
            time.sleep(0.2)
        time.sleep(settle)
        start, cpu0 = datetime.datetime.now(), _cpu_ticks()
        time.sleep(window)
        end, cpu1 = datetime.datetime.now(), _cpu_ticks()
    stamps = _completions(url, study)
    return {
        "sampler": sampler,
        "kind": kind,
        "processes": n,
        "trials_per_h": 3600 * _rate(stamps, start, end),
        "max_conn": connections.max,
        "conn_bound": n * POOL_PER_PROCESS if kind == "ours" else float("nan"),
        "cpu_busy": (os.cpu_count() or 1) * (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1),
        "trials_before": sum(s < start for s in stamps),
    }


def run_scale_out(
    *,
    processes: Sequence[int],
    samplers: Sequence[str] = ("tpe", "random"),
    kinds: Sequence[str] = ("ours", "raw"),
    seconds: float = 1.0,
    window: float = 15.0,
    settle: float = 3.0,
    max_wait_s: float = 300.0,
    url: str | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Every sampler x kind x process count; the rows and the printed report.

    Args:
        processes: Process counts N (1 must be among them: it is the baseline).
        samplers: Samplers of the registry (``search.samplers``).
        kinds: ``ours`` (the worker loop) and/or ``raw`` (Optuna's ``study.optimize``).
        seconds: The objective's duration.
        window: Seconds counted per run.
        settle: Seconds between every process having begun and the window.
        max_wait_s: How long to wait for a quiet machine before each run.
        url: A PostgreSQL database to use (default: a fresh one, dropped afterwards).
    """
    if 1 not in processes:
        raise ValueError("processes: the one-process rate is the baseline; include 1")
    quiet_optuna()
    rows: list[dict[str, Any]] = []
    loads = [wait_for_quiet(max_wait_s=max_wait_s)]
    database = contextlib.nullcontext(url) if url else bench_database()
    with database as url, tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        # Rendered once for all the stand-ins: each would otherwise spend a second of CPU at start-up.
        (Path(tmp) / "samples.png").write_bytes(samples_png())
        for sampler in samplers:
            for n in sorted(processes):
                for kind in kinds:
                    if rows:
                        loads.append(wait_for_quiet(max_wait_s=max_wait_s, instant=True))
                    row = _one_run(
                        url, kind, sampler, n, seconds=seconds, window=window, settle=settle, work=Path(tmp)
                    )
                    rows.append(row)
                    print(
                        f"  {sampler} {kind} N={n}: {row['trials_per_h']:,.0f} trials/h, "
                        f"{row['max_conn']} connections",
                        flush=True,
                    )
    for row in rows:
        one = next(
            r for r in rows if (r["sampler"], r["kind"], r["processes"]) == (row["sampler"], row["kind"], 1)
        )
        row["ideal_per_h"] = row["processes"] * one["trials_per_h"]
        row["vs_ideal"] = row["trials_per_h"] / row["ideal_per_h"]
    ours = [r for r in rows if r["kind"] == "ours"]
    worst = min(ours, key=lambda r: r["vs_ideal"]) if ours else None
    within = all(r["max_conn"] <= r["conn_bound"] for r in ours)
    lines = [
        f"scale-out: N worker processes, {seconds:g} s objective, local PostgreSQL, {os.cpu_count()} cores; "
        f"{window:g} s window after all N began; load average before {loads[0]:.2f}, busy cores between runs "
        f"<= {max(loads[1:], default=float('nan')):.2f}",
        table(rows, COLUMNS),
    ]
    if worst is not None:
        lines.append(
            f"ours: lowest vs_ideal {worst['vs_ideal']:.2f} at N={worst['processes']} ({worst['sampler']}) "
            f"(target >= 0.9); connections within N x {POOL_PER_PROCESS}: {'yes' if within else 'NO'}"
        )
    return rows, "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--samplers", nargs="+", default=["tpe", "random"], choices=["tpe", "random", "nsga2"])
    p.add_argument("--kinds", nargs="+", default=["ours", "raw"], choices=["ours", "raw"])
    p.add_argument("--seconds", type=float, default=1.0, help="objective duration (default 1 s)")
    p.add_argument("--window", type=float, default=15.0, help="measured seconds per run (default 15)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds between all started and the window")
    p.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine")
    p.add_argument("--json", help="write the rows here too")
    # One worker process of a run (started by the benchmark itself).
    p.add_argument("--child", choices=["ours", "raw"], help=argparse.SUPPRESS)
    p.add_argument("--study", help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    p.add_argument("--sampler", default="tpe", help=argparse.SUPPRESS)
    p.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--artifact-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--figure", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "ours":
        _child_ours(args.study, args.storage, args.seconds, args.ready, args.artifact_dir, args.figure)
        return
    if args.child == "raw":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _child_raw(args.study, args.storage, args.seconds, args.ready, args.sampler, args.index)
        return
    rows, text = run_scale_out(
        processes=args.processes,
        samplers=args.samplers,
        kinds=args.kinds,
        seconds=args.seconds,
        window=args.window,
        settle=args.settle,
        max_wait_s=args.max_wait,
    )
    print(text)
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
