"""Fused trials: K trials of one architecture trained as one stacked model, against K trained one
after another, measured in the same run.

    python -m benchmarks.fused_trials [--processes]            # CPU size, K = 1 2 4
    python -m benchmarks.fused_trials --size production --k 1 2 4 8 --processes [--compile] [--json out.json]
    python -m benchmarks.fused_trials --grouping --k 2 4 8       # how full the groups are

Each member differs in what a member owns (``loss.beta_kl``, ``loss.free_bits``, ``train.lr``,
``train.seed``). Samples/s are training samples of all members per second of training, the
first epoch left out (warm-up, compilation); trials per hour count each trial's whole run,
evaluation included. The baseline is the same K configs trained alone by ``model.trainer.train``,
one after another in this process: one trial per device. With ``--processes`` the same K also
train as K processes at once (as ``worker --per-gpu K`` runs them), each timed from a common start
after loading its data and one warm-up epoch; their samples/s add up. ``vs_one_trial`` is against the first
K's first trial alone, the one-trial-per-GPU rate the 2.5x target is set against.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import optuna
import torch

from benchmarks.common import production_config, table, write_json
from benchmarks.search_efficiency import CACHE_PATH, CachedPoint, Surrogate, efficiency_definition
from model.config import Config, config_from_dict, with_overrides
from model.data import Dataset, load_data
from model.fused import architecture_key, train_fused
from model.trainer import TrainResult, train
from search.objective import suggest_space
from search.samplers import make_sampler

__all__ = ["grouping", "member_configs", "run"]

COLUMNS = ["k", "mode", "samples_per_s", "trials_per_h", "vs_sequential", "vs_one_trial"]


def cpu_config() -> Config:
    """A small grid the CPU trains in seconds: 32x32, factor 4, latent 16, 16 channels."""
    return config_from_dict(
        {
            "data": {"synthetic": {"n_days": 320, "height": 32, "width": 32, "seed": 0}, "upscale_factor": 4},
            "model": {"latent_dim": 16, "channels": 16, "n_res_blocks": 1},
            "train": {"epochs": 3, "batch_size": 32, "device": "cpu", "save_checkpoint": False},
            "eval": {"n_samples": 4, "max_days": 32, "plot_days": 0},
        },
        "benchmarks/fused_trials.py",
    )


def member_configs(base: Config, k: int) -> list[Config]:
    """``k`` members of ``base``'s architecture with their own loss weights, lr and seed."""
    return [
        with_overrides(
            base,
            {
                "loss.beta_kl": 0.05 * (1 + i),
                "loss.free_bits": 0.5 / (1 + i),
                "train.lr": 1e-3 * (0.5 + 0.25 * i),
                "train.seed": i,
            },
            "benchmarks/fused_trials.py",
        )
        for i in range(k)
    ]


def _timed_seconds(result: TrainResult, samples: int) -> float:
    """Seconds of the epochs after the first, from each epoch's rate of ``samples`` per epoch."""
    return sum(samples / h["samples_per_s"] for h in result.history[1:])


def run(base: Config, ks: Sequence[int], data: Dataset, *, processes: bool = False) -> list[dict[str, Any]]:
    """Rows per K: its K trials one after another, the same K fused, and with ``processes`` the
    same K as K processes at once, measured back to back (a shared machine's load then weighs on
    all alike), after one untimed warm-up run."""
    train(member_configs(base, 1)[0], data=data)
    batch = min(base.train.batch_size, len(data.train))
    samples = len(data.train) // batch * batch  # per epoch, as the trainer drops the ragged tail
    rows: list[dict[str, Any]] = []
    one = math.nan
    for k in ks:
        cfgs = member_configs(base, k)
        t0 = time.perf_counter()
        solo = [train(cfg, data=data) for cfg in cfgs]
        seq_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        fused = [r for r in train_fused(cfgs, data=data) if isinstance(r, TrainResult)]
        fused_total = time.perf_counter() - t0
        assert len(fused) == k, "a member diverged"
        seq = _aggregate(solo, samples)
        if math.isnan(one):
            one = _aggregate(solo[:1], samples)
        modes = [("sequential", seq, seq_total), ("fused", _aggregate_fused(fused, samples), fused_total)]
        if processes:
            results, wall = _in_processes(cfgs)
            modes.append(("processes", sum(_aggregate([r], samples) for r in results), wall))
        for mode, value, total in modes:
            rows.append(
                {
                    "k": k,
                    "mode": mode,
                    "samples_per_s": value,
                    "trials_per_h": k / total * 3600,
                    "vs_sequential": value / seq,
                    "vs_one_trial": value / one,
                }
            )
    return rows


def _in_processes(cfgs: Sequence[Config]) -> tuple[list[TrainResult], float]:
    """Each config trained in a process of its own, all started together once each has loaded
    its data and warmed up; their results and the longest training's seconds."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, queue = ctx.Barrier(len(cfgs)), ctx.Queue()
    procs = [ctx.Process(target=_train_in_process, args=(cfg, barrier, queue)) for cfg in cfgs]
    for proc in procs:
        proc.start()
    done = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return [r for r, _ in done], max(s for _, s in done)


def _train_in_process(cfg: Config, barrier: Any, queue: Any) -> None:
    data = load_data(cfg.data)
    train(with_overrides(cfg, {"train.epochs": 1}), data=data)  # warm-up, as in the parent
    barrier.wait()
    t0 = time.perf_counter()
    result = train(cfg, data=data)
    queue.put((result, time.perf_counter() - t0))


def _aggregate(results: Sequence[TrainResult], samples: int) -> float:
    """Samples/s of runs one after another: all their timed samples over all their seconds."""
    n = sum(samples * (r.epochs_run - 1) for r in results)
    return n / sum(_timed_seconds(r, samples) for r in results)


def _aggregate_fused(results: Sequence[TrainResult], samples: int) -> float:
    """Samples/s of one fused group: its members share every epoch's seconds."""
    return len(results) * samples * (results[0].epochs_run - 1) / _timed_seconds(results[0], samples)


def grouping(ks: Sequence[int], budget: int, seeds: int) -> list[dict[str, Any]]:
    """How full ``worker --fuse K``'s groups are under TPE with the constant liar.

    On ``studies/tiny.yaml``'s space (its architecture: ``model.encoder_pool`` x ``model.output``),
    answered by benchmark 6's cached surrogate (each proposal gets the measured result of the
    nearest point trained for real): one fused worker asks K trials, all running while it asks
    (the constant liar sees them), groups them by :func:`model.fused.architecture_key`, and tells
    each its surrogate result, until ``budget`` trials, for each seed.
    """
    definition = efficiency_definition()
    # The points, not load_cache: its digest check also covers fields added to the definition
    # since the cache was built; the space the points were drawn from is checked instead.
    data = json.loads(CACHE_PATH.read_text())
    points = [CachedPoint(**p) for p in data["points"]]
    assert all(p.params.keys() == definition.space.keys() for p in points), "the cache's space changed"
    surrogate = Surrogate(definition.space, points)
    spec = definition.sampler
    rows = []
    for k in ks:
        sizes: list[int] = []
        for seed in range(seeds):
            sampler = make_sampler(spec.name, 1000 * seed, spec.options)
            study = optuna.create_study(directions=definition.directions, sampler=sampler)
            while len(study.trials) < budget:
                trials = [study.ask() for _ in range(min(k, budget - len(study.trials)))]
                params = [suggest_space(t, definition.space) for t in trials]
                sizes += Counter(architecture_key(definition.config_for(p)) for p in params).values()
                for trial, p in zip(trials, params, strict=True):
                    point = surrogate.nearest(p)
                    if point.state == "COMPLETE" and point.values is not None:
                        for key, value in point.constraints.items():
                            trial.set_constraint(key, value)
                        study.tell(trial, point.values)
                    else:
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        rows.append(
            {
                "k": k,
                "groups": len(sizes),
                "trials_per_group": sum(sizes) / len(sizes),
                "in_full_groups": sum(s for s in sizes if s == k) / sum(sizes),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["cpu", "production"], default="cpu")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial, the first a warm-up (>= 2)")
    p.add_argument("--days", type=int, default=4000, help="days of the production-size data")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (every mode)")
    p.add_argument("--processes", action="store_true", help="also K processes at once, one trial each")
    p.add_argument("--grouping", action="store_true", help="measure how full the groups are instead")
    p.add_argument("--budget", type=int, default=60, help="trials per search (--grouping)")
    p.add_argument("--seeds", type=int, default=4, help="searches per K (--grouping)")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    if args.grouping:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        rows = grouping(args.k, args.budget, args.seeds)
        print(
            f"\nfused groups under TPE with the constant liar: studies/tiny.yaml's space, benchmark 6's "
            f"surrogate, {args.budget} trials x {args.seeds} seeds per K"
        )
        print(table(rows, ["k", "groups", "trials_per_group", "in_full_groups"]))
        write_json(args.json, {"grouping": rows})
        return
    if args.epochs < 2:
        p.error("--epochs: expected >= 2 (the first is a warm-up)")
    if args.size == "production":
        assert torch.cuda.is_available(), "--size production needs a CUDA GPU"
        base = with_overrides(production_config(args.days), {"train.device": "cuda", "eval.max_days": 64})
    else:
        base = cpu_config()
    base = with_overrides(base, {"train.epochs": args.epochs, "train.compile": args.compile})
    data = load_data(base.data)
    device = (
        torch.cuda.get_device_name()
        if base.train.device == "cuda"
        else f"CPU, {torch.get_num_threads()} thread(s)"
    )
    rows = run(base, args.k, data, processes=args.processes)
    grid = f"{base.data.synthetic.height}x{base.data.synthetic.width}"
    print(
        f"\nfused trials on {device}: {grid} grid, factor {base.data.upscale_factor}, latent "
        f"{base.model.latent_dim}, batch {base.train.batch_size}, {len(data.train)} training days, "
        f"compile {'on' if args.compile else 'off'}"
    )
    print(table(rows, COLUMNS))
    best = max((r for r in rows if r["mode"] == "fused"), key=lambda r: r["vs_one_trial"])
    print(f"best: K={best['k']} fused, {best['vs_one_trial']:.2f}x one trial's samples/s")
    write_json(args.json, {"device": device, "size": args.size, "compile": args.compile, "rows": rows})


if __name__ == "__main__":
    main()
