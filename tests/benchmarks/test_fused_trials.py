"""Smoke test of the fused-trials benchmark at a tiny size: its rows, not its timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fused_trials import grouping, member_configs, run
from model.config import config_from_dict
from model.data import load_data
from model.fused import architecture_key
from tests.conftest import tiny_config_dict


def test_each_k_has_a_sequential_and_a_fused_row(cache: Path) -> None:
    base = config_from_dict(tiny_config_dict(2), "tiny")
    rows = run(base, [1, 2], load_data(base.data))
    assert [(r["k"], r["mode"]) for r in rows] == [
        (1, "sequential"),
        (1, "fused"),
        (2, "sequential"),
        (2, "fused"),
    ]
    assert rows[0]["vs_sequential"] == rows[0]["vs_one_trial"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["trials_per_h"] > 0 for r in rows)
    assert rows[3]["vs_sequential"] == pytest.approx(rows[3]["samples_per_s"] / rows[2]["samples_per_s"])


def test_members_share_the_architecture_and_differ_in_their_own_settings() -> None:
    cfgs = member_configs(config_from_dict(tiny_config_dict(2), "tiny"), 3)
    assert len({architecture_key(c) for c in cfgs}) == 1
    assert len({(c.loss.beta_kl, c.train.lr, c.train.seed) for c in cfgs}) == 3


def test_grouping_counts_every_trial_once() -> None:
    (row,) = grouping([4], budget=10, seeds=1)
    # Rounds of 4, 4 and 2 trials: at least 3 groups, each of at most 4.
    assert row["groups"] >= 3
    assert row["trials_per_group"] == pytest.approx(10 / row["groups"])
    assert 0.0 <= row["in_full_groups"] <= 0.8
