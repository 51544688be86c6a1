"""The figures ``cvae-search downstream`` leaves: one heavy day as SRDRN sees it without and with
augmentation, and both arms' training curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["plot_curves", "plot_heavy_day"]

_LOSSES = (("train_loss", "training loss"), ("val_loss", "validation loss"))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _heavy_day_figure(
    obs_mm: torch.Tensor, without_mm: torch.Tensor, with_mm: torch.Tensor, mask: torch.Tensor, day: str
) -> Figure:
    m = mask.detach().cpu().numpy()
    fields = [np.where(m, f.detach().cpu().double().numpy(), np.nan) for f in (obs_mm, without_mm, with_mm)]
    finite = [f[np.isfinite(f)] for f in fields]
    # The day is shown for its extremes, so the scale reaches the largest value, not a percentile.
    vmax = max((float(f.max()) for f in finite if f.size), default=1.0)
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.8), squeeze=False)
    image = None
    for ax, field, title in zip(axes[0], fields, ("observed", "SRDRN without", "SRDRN with"), strict=True):
        image = ax.imshow(field, cmap="Blues", vmin=0.0, vmax=max(vmax, 1e-3), origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{day}: observed vs SRDRN without and with augmentation (mm/day)", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="mm/day")
    return fig


def plot_heavy_day(
    obs_mm: torch.Tensor,
    without_mm: torch.Tensor,
    with_mm: torch.Tensor,
    mask: torch.Tensor,
    *,
    day: str,
    path: Path,
) -> Path:
    """One held-out day: the observed field, SRDRN without and with augmentation, one colour scale.

    Args:
        obs_mm: [H, W] observed, mm/day.
        without_mm: [H, W] SRDRN trained on real pairs only, mm/day.
        with_mm: [H, W] SRDRN trained with generated pairs too, mm/day.
        mask: [H, W] valid cells; invalid cells are left blank.
        day: The day's label, for the title.
        path: PNG to write.

    Raises:
        ValueError: The fields are not [H, W] of one shape.
    """
    shapes = {tuple(t.shape) for t in (obs_mm, without_mm, with_mm, mask)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"plot_heavy_day: expected four [H, W] fields of one shape, got {sorted(shapes)}")
    return _save(_heavy_day_figure(obs_mm, without_mm, with_mm, mask, day), path)


def _curves_figure(curves: dict[str, list[list[dict[str, float]]]]) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes[0], _LOSSES, strict=True):
        values: list[float] = []
        for i, (arm, seeds) in enumerate(curves.items()):
            for j, records in enumerate(seeds):
                # Validation is checked only now and then: plot the records that carry the loss.
                points = [(r["step"], r[key]) for r in records if math.isfinite(r.get(key, math.nan))]
                if not points:
                    continue
                steps, losses = zip(*points, strict=True)
                values += losses
                colour = colours[i % len(colours)]
                ax.plot(steps, losses, color=colour, lw=1.0, alpha=0.8, label=arm if j == 0 else None)
        if values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        if values:
            ax.legend(fontsize=7)
    fig.suptitle("SRDRN training curves, one line per seed", fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(curves: dict[str, list[list[dict[str, float]]]], path: Path) -> Path:
    """Training and validation loss against optimiser step, one colour per arm, one line per seed.

    Args:
        curves: Arm name (e.g. ``without``, ``with``) to one list per seed of records with
            ``step``, ``epoch``, ``train_loss`` and ``val_loss``; a record without a finite
            loss leaves that point out.
        path: PNG to write.
    """
    return _save(_curves_figure(curves), path)
