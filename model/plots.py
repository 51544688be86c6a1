"""The figure every trial and training run leaves: observed fields beside prior samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["plot_samples"]


def plot_samples(
    obs: torch.Tensor,
    samples: torch.Tensor,
    mask: torch.Tensor,
    path: Path,
    *,
    times: Sequence[str] = (),
    title: str = "observed vs cVAE samples (mm/day)",
) -> Path:
    """One row per day: the observed field, then each sample, on one colour scale.

    Args:
        obs: [D, H, W] mm/day.
        samples: [D, K, H, W] mm/day.
        mask: [D, H, W] valid cells; invalid cells are left blank.
        path: PNG to write.
        times: Row labels.
        title: Figure title.
    """
    days, k = samples.shape[0], samples.shape[1]
    m = mask.numpy()
    fields = np.concatenate([obs.numpy()[:, None], samples.numpy()], axis=1)
    fields = np.where(m[:, None], fields, np.nan)
    vmax = float(np.nanpercentile(fields, 99.5)) if np.isfinite(fields).any() else 1.0
    fig, axes = plt.subplots(days, k + 1, figsize=(1.8 * (k + 1), 1.8 * days + 0.6), squeeze=False)
    image = None
    for d in range(days):
        for j in range(k + 1):
            ax = axes[d, j]
            image = ax.imshow(fields[d, j], cmap="Blues", vmin=0.0, vmax=max(vmax, 1e-3), origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if d == 0:
                ax.set_title("observed" if j == 0 else f"sample {j}", fontsize=8)
        if d < len(times):
            axes[d, 0].set_ylabel(times[d], fontsize=7)
    fig.suptitle(title, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="mm/day")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
