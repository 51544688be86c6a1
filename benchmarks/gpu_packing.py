"""Trials per GPU: aggregate training samples/s of K concurrent trainer processes on one GPU.

A small cVAE cannot fill an H100; this measures what ``cvae-search worker --per-gpu K``
gains. Each process caps its share of GPU memory (as the worker does), trains the
production-like config, and reports its steady-state samples/s and peak memory. With
``--mps`` the same is measured under CUDA MPS, when the machine lets us start its daemon.

    python -m benchmarks.gpu_packing --k 1 2 4 --mps --json out.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from typing import Any

from benchmarks.common import production_config, table, write_json


def _worker(k: int, barrier: Any, queue: Any, batch: int, epochs: int, compile_: bool) -> None:
    import torch

    from model.config import with_overrides
    from model.data import load_data
    from model.trainer import train

    torch.cuda.set_per_process_memory_fraction(0.95 / k)
    cfg = with_overrides(
        production_config(),
        {"train.batch_size": batch, "train.device": "cuda", "train.compile": compile_, "eval.max_days": 16},
    )
    data = load_data(cfg.data).to("cuda")
    train(replace(cfg, train=replace(cfg.train, epochs=1)), data=data)  # warm-up: kernels, compile
    barrier.wait()
    torch.cuda.reset_peak_memory_stats()
    result = train(replace(cfg, train=replace(cfg.train, epochs=epochs)), data=data)
    rates = [h["samples_per_s"] for h in result.history]
    queue.put((sum(rates) / len(rates), torch.cuda.max_memory_allocated() / 2**30))


def measure(k: int, batch: int, epochs: int, compile_: bool) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(k, barrier, queue, batch, epochs, compile_)) for _ in range(k)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return sum(r[0] for r in results), max(r[1] for r in results)


def _start_mps() -> dict[str, str] | None:
    if shutil.which("nvidia-cuda-mps-control") is None:
        return None
    tmp = tempfile.mkdtemp(prefix="mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": f"{tmp}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{tmp}/log"}
    for d in env.values():
        os.makedirs(d)
    done = subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **env}, capture_output=True)
    if done.returncode != 0:
        return None
    time.sleep(1)
    return env


def _stop_mps(env: dict[str, str]) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env={**os.environ, **env}, check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--mps", action="store_true", help="also measure under CUDA MPS")
    p.add_argument("--json")
    args = p.parse_args()

    from model.data import load_data

    load_data(production_config().data)  # write the synthetic set once, before the processes race
    rows = []
    modes = [("no MPS", None)]
    for label, env in modes + ([("MPS", "start")] if args.mps else []):
        mps_env = _start_mps() if env == "start" else None
        if env == "start" and mps_env is None:
            rows.append(
                {"mode": "MPS", "k": "-", "aggregate_samples_per_s": float("nan"), "note": "unavailable"}
            )
            continue
        saved = {k: os.environ.get(k) for k in (mps_env or {})}
        os.environ.update(mps_env or {})
        try:
            base = None
            for k in args.k:
                rate, peak = measure(k, args.batch, args.epochs, args.compile)
                base = base or rate
                rows.append(
                    {
                        "mode": label,
                        "k": k,
                        "aggregate_samples_per_s": rate,
                        "vs_k1": rate / base,
                        "peak_gib_per_process": peak,
                    }
                )
        finally:
            if mps_env:
                _stop_mps(mps_env)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    print(
        f"\ntrials per GPU: batch {args.batch}, compile {args.compile}; target >= 1.5x aggregate over K = 1"
    )
    print(table(rows, ["mode", "k", "aggregate_samples_per_s", "vs_k1", "peak_gib_per_process", "note"]))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
