"""Smoke test of the V3/V4 benchmark at its tiny size, one epoch per setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.v3_v4 import COLUMNS, run_v3_v4, settings


def test_tiny_settings_come_from_the_study_and_the_configs() -> None:
    configs = settings("tiny", epochs=1)
    assert list(configs) == ["v3", "v4", "v4 + grid encoder"]
    v3, v4, grid = configs.values()
    for cfg in configs.values():
        assert (cfg.data.synthetic.height, cfg.data.upscale_factor, cfg.model.latent_dim) == (32, 8, 16)
        assert cfg.train.epochs == 1
    assert (v3.loss.kl_mode, v3.loss.beta_kl) == ("plain", 0.01)
    assert (v4.loss.kl_mode, v4.loss.beta_kl, v4.loss.free_bits) == ("free_bits_sample", 0.05, 0.5)
    assert (v4.model.encoder_pool, grid.model.encoder_pool) == ("global", "grid")
    assert settings("production")["v4"].data.synthetic.height == 128


def test_prints_a_row_per_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVAE_SEARCH_CACHE", str(tmp_path))
    rows, text = run_v3_v4("tiny", epochs=1)

    assert [r["setting"] for r in rows] == ["v3", "v4", "v4 + grid encoder"]
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == COLUMNS)
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    printed = [re.split(r"\s{2,}", line.strip()) for line in lines[header + 2 :]]
    assert [p[0] for p in printed] == ["v3", "v4", "v4 + grid encoder"]
    assert all(len(p) == len(COLUMNS) for p in printed)
    # Free bits clamp V4's training KL at 0.5 nats per dimension, 16 dimensions: at least 8.
    assert rows[1]["train_kl"] >= 8.0 > rows[0]["train_kl"]
