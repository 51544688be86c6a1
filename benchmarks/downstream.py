"""Benchmark 8, downstream: does the cVAE's generated data make SRDRN better, and how fast is it?

    python -m benchmarks.downstream [--pick EXPORT.yaml] [--steps N] [--seeds 0 1 2] [--json out.json]
    python -m benchmarks.downstream --speed [--size demo|production] [--json out.json]

Gain: the demo study's data with synthetic storms (``storm_days``: rare heavy rain that the
coarse input only hints at) and a small real training split (a quarter of the days, where
augmentation can matter). Two cVAEs train once each: the pick (an export's searched fields,
by default the demo's pick cached in benchmarks/results/demo_pick.yaml) and the seed's V4 at
the same size. For each, SRDRN trains without and with its generated pairs, under the
intensity-weighted MAE and under the pinball loss (quantiles 0.5, 0.9, 0.99), for each seed.
The unaugmented arm is the same runs for both cVAEs (same seeds, steps, batches; trained once),
so each gain is measured against one reference.

Speed: SRDRN training steps per second and test fields per second, fp32 eager as the baseline,
and on CUDA bf16 and bf16 + ``torch.compile`` against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import table, write_json
from model.checkpoint import read_checkpoint
from model.config import Config, get_field, load_config, read_yaml, with_overrides
from model.data import load_data
from model.downstream import DownstreamResult, run_downstream
from model.downstream_metrics import verdict
from model.srdrn import predict, train_srdrn
from model.trainer import resolve_device, train, use_bf16

__all__ = ["base_config", "cvae_setting", "run_gain", "run_speed"]

REPO = Path(__file__).resolve().parents[1]
DEMO_PICK = REPO / "benchmarks" / "results" / "demo_pick.yaml"
SEARCHED = ("loss", "model.encoder_pool", "model.output", "model.prior")
"""What a cVAE setting takes from its config; the rest is the benchmark's base."""
REPORTED = ("rmse", "csi_p95", "sedi_p95", "csi_p99", "sedi_p99", "q99_error", "q999_error", "ks_wet")
GAIN_COLUMNS = ["cvae", "loss", "head", "metric", "without", "with", "gain", "spread", "verdict"]
SPEED_COLUMNS = ["size", "precision", "compile", "steps_per_s", "fields_per_s", "ratio_vs_fp32"]


def base_config(steps: int, seeds: Sequence[int]) -> Config:
    """The demo study's sizes, with storms, a small training split and a small SRDRN."""
    overrides = read_yaml(REPO / "studies" / "tiny.yaml", "study file")["overrides"]
    overrides |= {
        "data.synthetic.storm_days": 0.05,
        "data.split.fractions": [0.25, 0.15, 0.6],
        "train.save_checkpoint": False,
        "eval.plot_days": 0,
        "downstream.channels": 16,
        "downstream.n_res_blocks": 4,
        "downstream.steps": steps,
        "downstream.seeds": list(seeds),
        "downstream.batch_size": 32,
        "downstream.lr": 1e-3,
        # Every 40 steps: SRDRN overfits 150 days within a few hundred steps, and the checks
        # must see where, or both arms are scored at the first check.
        "downstream.val_checks": 20,
    }
    return with_overrides(load_config(REPO / "configs" / "v4.yaml"), overrides, "benchmarks/downstream.py")


def cvae_setting(base: Config, source: Config) -> Config:
    """``base`` with the searched fields of ``source``."""
    fields = {}
    for dotted in SEARCHED:
        value = get_field(source, dotted)
        if dataclasses.is_dataclass(value):
            fields |= {f"{dotted}.{f.name}": getattr(value, f.name) for f in dataclasses.fields(value)}
        else:
            fields[dotted] = value
    return with_overrides(base, fields, "cvae setting")


def _rows(name: str, loss: str, result: DownstreamResult) -> list[dict[str, Any]]:
    per_seed = result.gains_per_seed()
    rows = []
    for head in result.settings["heads"] or [""]:
        if head == "q50":  # the median of a cell dry most days is 0: its skill says little
            continue
        for metric in REPORTED:
            key = f"{head}_{metric}" if head else metric
            v = verdict(per_seed[key])
            rows.append(
                {
                    "cvae": name,
                    "loss": loss,
                    "head": head or "-",
                    "metric": metric,
                    "without": float(np.mean(result.scores["without"][key])),
                    "with": float(np.mean(result.scores["with"][key])),
                    "gain": v.mean,
                    "spread": v.spread,
                    "verdict": v.verdict,
                }
            )
    return rows


def run_gain(pick: Path, steps: int, seeds: Sequence[int]) -> tuple[dict[str, Any], str]:
    """Train the pick's and V4's cVAE, then SRDRN without and with each under both losses."""
    base = base_config(steps, seeds)
    settings = {"pick": cvae_setting(base, load_config(pick)), "v4": base}
    data = load_data(base.data)
    rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for name, cfg in settings.items():
        with tempfile.TemporaryDirectory() as tmp:
            trained = train(
                with_overrides(cfg, {"train.save_checkpoint": True}, name), out_dir=tmp, data=data
            )
            assert trained.checkpoint is not None
            cvae = read_checkpoint(trained.checkpoint).model
        for loss in ("weighted_mae", "pinball"):
            run_cfg = with_overrides(trained.config, {"downstream.loss": loss}, "benchmark")
            result = run_downstream(
                cvae, run_cfg, data, source=f"benchmark {name}", progress=lambda line: print(line, flush=True)
            )
            results[f"{name}/{loss}"] = result.to_dict()
            rows += _rows(name, loss, result)
    s = results["pick/weighted_mae"]["settings"]
    header = (
        f"downstream gain: {s['train_days']} training days "
        f"({s['augmented_days']} augmented, K={s['n_generated']}), "
        f"{s['test_days']} test days; SRDRN {s['channels']} filters x {s['n_res_blocks']} blocks, "
        f"{s['steps_per_arm']} steps per arm, seeds {list(seeds)}, on {s['device']}; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return {"rows": rows, "results": results}, f"{header}\n{table(rows, GAIN_COLUMNS)}"


def _speed_config(size: str, steps: int) -> Config:
    cfg = with_overrides(base_config(steps=steps, seeds=[0]), {"downstream.val_checks": 1}, "speed")
    if size == "production":
        cfg = with_overrides(
            cfg,
            {
                "data.synthetic.height": 128,
                "data.synthetic.width": 128,
                "data.synthetic.n_days": 1200,
                "downstream.channels": 64,
                "downstream.n_res_blocks": 16,
                "downstream.batch_size": 32,
            },
            "production",
        )
    return cfg


def run_speed(size: str, steps: int = 60) -> tuple[list[dict[str, Any]], str]:
    """SRDRN steps/s and fields/s per precision; ratios against fp32 eager in the same run."""
    cfg = _speed_config(size, steps)
    device = resolve_device(cfg.train.device)
    data = load_data(cfg.data).to(device)
    variants = [("fp32", False)]
    if device.type == "cuda":
        variants += [("bf16", False), ("bf16", True)]
    rows = []
    for precision, compile_ in variants:
        run = with_overrides(cfg, {"train.precision": precision, "train.compile": compile_}, "speed")
        bf16 = use_bf16(run, device)
        train_srdrn(run, data, seed=0, device=device, bf16=bf16, compile=compile_)  # warm-up, compile
        _sync(device)
        t0 = time.perf_counter()
        fit = train_srdrn(run, data, seed=0, device=device, bf16=bf16, compile=compile_)
        _sync(device)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict(fit.model, data, data.test, batch_size=run.downstream.batch_size_eval, bf16=bf16)
        _sync(device)
        rows.append(
            {
                "size": f"{data.height}x{data.width}",
                "precision": precision,
                "compile": compile_,
                "steps_per_s": fit.steps / train_s,
                "fields_per_s": len(data.test) / (time.perf_counter() - t0),
            }
        )
    for row in rows:
        row["ratio_vs_fp32"] = row["steps_per_s"] / rows[0]["steps_per_s"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = (
        f"SRDRN speed on {name}: {cfg.downstream.channels} filters x {cfg.downstream.n_res_blocks} blocks, "
        f"batch {cfg.downstream.batch_size}, {cfg.downstream.steps} steps and one validation check, "
        f"{torch.get_num_threads()} CPU threads"
    )
    return rows, f"{header}\n{table(rows, SPEED_COLUMNS)}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pick", type=Path, default=DEMO_PICK, help="an export whose searched fields are the pick"
    )
    p.add_argument("--steps", type=int, default=800, help="SRDRN optimiser steps per arm")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--speed", action="store_true", help="measure SRDRN's speed instead of the gain")
    p.add_argument("--size", choices=["demo", "production"], default="demo")
    p.add_argument("--json", help="also write the raw output to this file")
    args = p.parse_args(argv)
    if args.speed:
        rows, text = run_speed(args.size)
        payload: Any = {"rows": rows}
    else:
        payload, text = run_gain(args.pick, args.steps, args.seeds)
    print(text)
    write_json(args.json, payload)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
