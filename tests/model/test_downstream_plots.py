from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.downstream_plots import _curves_figure, _heavy_day_figure, plot_curves, plot_heavy_day

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _day() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(16, 24, generator=g) * 40
    mask = torch.rand(16, 24, generator=g) > 0.2
    without = torch.where(mask, obs * 0.5, torch.tensor(1e6))  # extreme invalid cells stay blank
    return obs, without, obs * 0.9, mask


def _curves() -> dict[str, list[list[dict[str, float]]]]:
    def seed(scale: float) -> list[dict[str, float]]:
        # Validation is checked every fifth step; the other records carry NaN.
        val = [scale / (s + 2) if s % 5 == 4 else math.nan for s in range(20)]
        return [
            {"step": s, "epoch": s // 5, "train_loss": scale / (s + 1), "val_loss": val[s]} for s in range(20)
        ]

    return {"without": [seed(1.0), seed(1.2), seed(0.9)], "with": [seed(0.8), seed(1.1), seed(0.7)]}


def test_heavy_day_writes_a_png(tmp_path: Path) -> None:
    path = plot_heavy_day(*_day(), day="2001-07-14", path=tmp_path / "sub" / "heavy.png")
    assert path == tmp_path / "sub" / "heavy.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_heavy_day_has_three_panels_on_one_scale_with_invalid_cells_blank() -> None:
    obs, without, with_, mask = _day()
    fig = _heavy_day_figure(obs, without, with_, mask, "2001-07-14")
    assert len(fig.axes) == 4  # observed, without, with, colour bar
    images = [ax.images[0] for ax in fig.axes[:3]]
    # One scale, up to the largest valid value of the three (the observed peak here).
    assert [im.get_clim() for im in images] == [(0.0, pytest.approx(float(obs[mask].max())))] * 3
    for im in images:
        shown = np.ma.masked_invalid(im.get_array())
        assert (np.ma.getmaskarray(shown) == ~mask.numpy()).all()


def test_heavy_day_rejects_fields_of_other_shapes(tmp_path: Path) -> None:
    obs, without, with_, mask = _day()
    with pytest.raises(ValueError, match=r"expected four \[H, W\] fields"):
        plot_heavy_day(obs, without[:8], with_, mask, day="d", path=tmp_path / "x.png")


def test_curves_write_a_png(tmp_path: Path) -> None:
    path = plot_curves(_curves(), tmp_path / "curves.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_curves_have_one_line_per_seed_and_one_colour_per_arm() -> None:
    fig = _curves_figure(_curves())
    assert len(fig.axes) == 2  # training loss, validation loss
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == 6
        colours = [line.get_color() for line in lines]
        assert len(set(colours[:3])) == 1 and len(set(colours[3:])) == 1 and colours[0] != colours[3]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["without", "with"]
    train, val = fig.axes
    assert list(train.get_lines()[0].get_xdata()) == list(range(20))
    assert list(val.get_lines()[0].get_xdata()) == [4, 9, 14, 19]  # validation checks only
