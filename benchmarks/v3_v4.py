"""The seed's V3 and V4 settings side by side on the synthetic set: V3's posterior collapse, what
V4's free bits change, and, for contrast, V4 with an encoder that keeps where rain lies.

    python -m benchmarks.v3_v4 [--size tiny|production] [--epochs N] [--json out.json]

``tiny`` applies the overrides of studies/tiny.yaml (a 32x32 grid, latent 16) to configs/v3.yaml
and configs/v4.yaml; ``production`` trains those configs as they are (128x128, latent 128). The
``train_kl`` column is the KL term the loss saw in the last epoch (clamped by free bits), ``kl_raw``
the unclamped KL on the evaluation days: free bits can hold the first up while the second says
the posterior has collapsed.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import table, write_json
from model.config import Config, load_config, read_yaml, with_overrides
from model.trainer import train

__all__ = ["COLUMNS", "run_v3_v4", "settings"]

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    "setting",
    "diversity",
    "spread_norm",
    "z_usage",
    "ks_stat",
    "kl_raw",
    "active_units",
    "train_kl",
    "mass_bias",
    "train_s",
]


def settings(size: str = "tiny", epochs: int | None = None) -> dict[str, Config]:
    """The three configs by name: ``v3``, ``v4`` and ``v4 + grid encoder``.

    Args:
        size: ``tiny`` (studies/tiny.yaml's overrides) or ``production`` (the configs as they are).
        epochs: Train this many epochs instead of the configured number.
    """
    if size not in ("tiny", "production"):
        raise ValueError(f"size: expected 'tiny' or 'production', got {size!r}")
    v3, v4 = load_config(REPO / "configs" / "v3.yaml"), load_config(REPO / "configs" / "v4.yaml")
    overrides: dict[str, Any] = {"train.save_checkpoint": False, "eval.plot_days": 0}
    if size == "tiny":
        study = REPO / "studies" / "tiny.yaml"
        overrides = {**read_yaml(study, "study file")["overrides"], **overrides}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    return {
        "v3": with_overrides(v3, overrides, "v3"),
        "v4": with_overrides(v4, overrides, "v4"),
        "v4 + grid encoder": with_overrides(v4, {**overrides, "model.encoder_pool": "grid"}, "v4 + grid"),
    }


def run_v3_v4(size: str = "tiny", epochs: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Train each setting once (seed 0) and evaluate it; the rows and the printed table."""
    configs = settings(size, epochs)
    rows = []
    device = ""
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        result = train(cfg)
        device = f"{result.device} ({result.precision})"
        rows.append(
            {
                "setting": name,
                **{c: result.metrics[c] for c in COLUMNS if c in result.metrics},
                "train_kl": result.history[-1]["kl"],
                "train_s": time.perf_counter() - t0,
                "epochs": result.epochs_run,
            }
        )
    cfg = configs["v4"]
    syn = cfg.data.synthetic
    header = (
        f"V3 vs V4, {size}: {syn.height}x{syn.width} synthetic grid, factor {cfg.data.upscale_factor}, "
        f"latent {cfg.model.latent_dim}, {rows[0]['epochs']} epochs on {device}"
    )
    return rows, f"{header}\n{table(rows, COLUMNS)}"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "production"], default="tiny")
    p.add_argument("--epochs", type=int, help="epochs per setting (default: the configured number)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    rows, text = run_v3_v4(args.size, args.epochs)
    print(text)
    write_json(args.json, {"size": args.size, "rows": rows})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
