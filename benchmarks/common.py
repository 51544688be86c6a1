"""Shared pieces of the benchmarks: the production-like config and a plain-text table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.config import Config, config_from_dict

__all__ = ["production_config", "table", "write_json"]


def production_config(days: int = 4000) -> Config:
    """128x128 fine grid, upscale factor 8, latent 128: the size the benchmarks report."""
    return config_from_dict(
        {
            "data": {
                "synthetic": {"n_days": days, "height": 128, "width": 128, "seed": 0},
                "upscale_factor": 8,
            },
            "model": {"latent_dim": 128, "channels": 32},
            "loss": {"beta_kl": 0.05, "kl_mode": "free_bits_batch", "free_bits": 0.5},
            "train": {"epochs": 30, "batch_size": 64, "save_checkpoint": False},
            "eval": {"n_samples": 8, "max_days": 256, "plot_days": 0},
        },
        "benchmarks/common.py",
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned plain-text table."""
    cells = [[c for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, payload: Any) -> None:
    """Write a benchmark's raw output to ``path`` (its ``--json``), if one was given."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
