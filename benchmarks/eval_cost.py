"""Evaluation cost: the metrics on the GPU against scipy and torch on the CPU, and the share
of a default trial's wall time that evaluation takes (target: at most 5%).

    python -m benchmarks.eval_cost --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import replace

import scipy.stats
import torch

from benchmarks.common import production_config, table, write_json
from model.config import with_overrides
from model.data import load_data
from model.evaluate import evaluate
from model.metrics import EvalData, compute_metrics
from model.trainer import build_model, train


def _timed(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu(value: object) -> object:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--days", type=int, default=256, help="evaluation days (the default eval.max_days)")
    p.add_argument("--k", type=int, default=8, help="samples per day")
    p.add_argument("--json")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    cfg = with_overrides(
        production_config(), {"train.device": "cuda", "eval.max_days": args.days, "eval.n_samples": args.k}
    )
    data = load_data(cfg.data).to("cuda")
    model = build_model(cfg, data).cuda()

    ev = evaluate(model, data, cfg.eval, bf16=True).data
    gpu = _timed(lambda: compute_metrics(ev))
    cpu_data = EvalData(**{f.name: _cpu(getattr(ev, f.name)) for f in dataclasses.fields(ev) if f.init})
    cpu = _timed(lambda: compute_metrics(cpu_data), repeat=1)
    obs = ev.obs[ev.mask].cpu().numpy()
    gen = ev.samples.permute(1, 0, 2, 3)[:, ev.mask].cpu().numpy().ravel()
    wo, wg = obs[obs > cfg.eval.wet_threshold], gen[gen > cfg.eval.wet_threshold]

    def scipy_pair() -> None:
        scipy.stats.ks_2samp(wg, wo)
        scipy.stats.wasserstein_distance(wg, wo)

    scipy_t = _timed(scipy_pair, repeat=1)
    full_eval = _timed(lambda: evaluate(model, data, cfg.eval, bf16=True), repeat=2)

    # A default trial: cfg.train.epochs epochs at the trainer's measured rate.
    short = train(replace(cfg, train=replace(cfg.train, epochs=2, compile=False)), data=data)
    rate = short.history[-1]["samples_per_s"]
    train_s = cfg.train.epochs * (len(data.train) // cfg.train.batch_size) * cfg.train.batch_size / rate
    rows = [
        {"what": "all metrics, torch on the GPU", "seconds": gpu, "vs_gpu": 1.0},
        {"what": "all metrics, torch on the CPU", "seconds": cpu, "vs_gpu": cpu / gpu},
        {"what": "KS + Wasserstein only, scipy on the CPU", "seconds": scipy_t, "vs_gpu": scipy_t / gpu},
        {"what": "evaluate(): sampling + metrics, GPU", "seconds": full_eval, "vs_gpu": full_eval / gpu},
        {
            "what": f"default trial training ({cfg.train.epochs} epochs)",
            "seconds": train_s,
            "vs_gpu": train_s / gpu,
        },
    ]
    share = full_eval / (full_eval + train_s)
    print(
        f"\nevaluation cost on {torch.cuda.get_device_name()}: {args.days} days x K={args.k} of 128x128, "
        f"{wg.size:,} generated and {wo.size:,} observed wet values"
    )
    print(table(rows, ["what", "seconds", "vs_gpu"]))
    print(f"evaluation share of a default trial: {share:.2%} (target <= 5%)")
    write_json(args.json, {"rows": rows, "eval_share": share, "pooled": [int(wg.size), int(wo.size)]})


if __name__ == "__main__":
    main()
