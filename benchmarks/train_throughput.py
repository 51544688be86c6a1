"""Training throughput on a GPU: the project's trainer against the plain loop a user writes.

The baseline is measured in the same run: eager fp32, a DataLoader over host memory, one
``loss.item()`` per step, the default (non-fused) Adam. The trainer keeps the data on the
GPU, gathers batches there, never syncs inside the step, uses a fused optimiser, and adds
bf16 autocast and ``torch.compile`` as configured. Achieved TFLOP/s come from PyTorch's
FLOP counter on one training step.

    python -m benchmarks.train_throughput --batch 64 256 --json out.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import production_config, table, write_json
from model.config import Config, with_overrides
from model.data import Dataset, load_data
from model.losses import compute_losses
from model.trainer import LOSS_TERMS, StepLoss, build_model, train


def plain_loop(cfg: Config, data: Dataset, epochs: int) -> float:
    """Samples/s of the straightforward loop, after one warm-up epoch."""
    device = torch.device("cuda")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    split = data.train
    assert split.coarse_mass is not None
    ds = TensorDataset(split.fine.cpu(), split.mask.cpu(), split.coarse.cpu(), split.coarse_mass.cpu())
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    static = data.static.to(device)
    rate = 0.0
    for epoch in range(epochs + 1):
        t0 = time.perf_counter()
        n = 0
        for fine, mask, coarse, cmass in loader:
            fine, mask, coarse, cmass = fine.to(device), mask.to(device), coarse.to(device), cmass.to(device)
            out = model(fine, coarse, static)
            terms = compute_losses(
                out,
                fine,
                mask,
                cmass,
                cfg=cfg.loss,
                normalizer=data.normalizer,
                factor=data.factor,
                beta=cfg.loss.beta_kl,
            )
            opt.zero_grad()
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            terms.total.item()
            n += fine.shape[0]
        torch.cuda.synchronize()
        if epoch > 0:  # epoch 0 warms up
            rate += n / (time.perf_counter() - t0) / epochs
    return rate


def trainer_rate(cfg: Config, data: Dataset, epochs: int) -> tuple[float, float]:
    """Samples/s of ``model.trainer.train`` (mean of epochs after the first) and peak GiB."""
    torch.cuda.reset_peak_memory_stats()
    result = train(replace(cfg, train=replace(cfg.train, epochs=epochs + 1)), data=data)
    rates = [h["samples_per_s"] for h in result.history[1:]]
    return sum(rates) / len(rates), torch.cuda.max_memory_allocated() / 2**30


def flops_per_sample(cfg: Config, data: Dataset) -> float:
    """Forward plus backward FLOPs of one training sample."""
    model = build_model(cfg, data).cuda()
    step = StepLoss(model, cfg, data.to("cuda"))
    b = cfg.train.batch_size
    idx = torch.arange(b, device="cuda")
    eps = torch.randn(b, cfg.model.latent_dim, device="cuda")
    counter = FlopCounterMode(display=False)
    with counter:
        step(idx, eps, torch.tensor(cfg.loss.beta_kl, device="cuda"))[0].backward()
    return counter.get_total_flops() / b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per variant (after one warm-up)")
    p.add_argument("--days", type=int, default=4000)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    base = production_config(args.days)
    data = load_data(base.data).to("cuda")
    name = torch.cuda.get_device_name()
    rows = []
    for b in args.batch:
        cfg = with_overrides(base, {"train.batch_size": b, "train.device": "cuda"})
        fps = flops_per_sample(cfg, data)
        baseline = plain_loop(cfg, data, args.epochs)
        rows.append(
            {
                "batch": b,
                "variant": "plain loop (fp32, DataLoader, item())",
                "samples_per_s": baseline,
                "tflops": fps * baseline / 1e12,
                "vs_plain": 1.0,
                "peak_gib": float("nan"),
            }
        )
        for label, overrides in (
            ("trainer fp32", {"train.precision": "fp32", "train.compile": False}),
            ("trainer bf16", {"train.precision": "bf16", "train.compile": False}),
            ("trainer bf16 + compile", {"train.precision": "bf16", "train.compile": True}),
        ):
            rate, peak = trainer_rate(with_overrides(cfg, overrides), data, args.epochs)
            rows.append(
                {
                    "batch": b,
                    "variant": label,
                    "samples_per_s": rate,
                    "tflops": fps * rate / 1e12,
                    "vs_plain": rate / baseline,
                    "peak_gib": peak,
                }
            )
    print(
        f"\ntraining throughput on {name}: 128x128 fine grid, factor 8, latent 128, "
        f"{len(data.train)} training fields on the GPU; target >= 2x the plain loop"
    )
    print(table(rows, ["batch", "variant", "samples_per_s", "tflops", "vs_plain", "peak_gib"]))
    write_json(args.json, {"device": name, "terms": list(LOSS_TERMS), "rows": rows})


if __name__ == "__main__":
    main()
