"""Smoke tests of the CPU benchmarks: each runs at a tiny size and prints a well-formed table.

Timings are not checked (they depend on the machine); the tables' columns and rows are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from benchmarks.downstream import DEMO_PICK, SPEED_COLUMNS, base_config, cvae_setting, run_speed
from benchmarks.scale_out import COLUMNS as SCALE_OUT_COLUMNS
from benchmarks.scale_out import run_scale_out
from benchmarks.search_efficiency import columns as efficiency_columns
from benchmarks.search_efficiency import run_efficiency
from benchmarks.search_overhead import PHASES, run_overhead
from model.config import load_config


def table_rows(text: str, columns: Sequence[str]) -> list[list[str]]:
    """The data rows of the table in ``text`` whose header is ``columns``; fails if there is none."""
    lines = text.splitlines()
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines]
    header = next((i for i, c in enumerate(cells) if c == list(columns)), None)
    assert header is not None, f"no table with columns {list(columns)} in:\n{text}"
    assert set(lines[header + 1].replace(" ", "")) == {"-"}, "no rule under the header"
    rows: list[list[str]] = []
    for row in cells[header + 2 :]:
        if len(row) != len(columns):
            break
        rows.append(row)
    return rows


@pytest.fixture
def synthetic_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CVAE_SEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.postgres
def test_search_overhead_prints_both_variants_with_every_phase(pg_url: str, synthetic_cache: Path) -> None:
    rows, text = run_overhead(trials=3, repeats=1, max_wait_s=0, url=pg_url)

    columns = ["variant", "trials", "ms_per_trial", "spread_ms", "vs_raw", "of_40s_trial", *PHASES, "other"]
    printed = table_rows(text, columns)
    assert [r["variant"] for r in rows] == [
        "raw optuna (suggest only)",
        "raw optuna + same records",
        "our worker loop",
    ]
    assert [r[0] for r in printed] == [r["variant"] for r in rows]
    assert all(r["trials"] == 3 for r in rows)
    assert rows[0]["vs_raw"] == pytest.approx(1.0)
    # The recording baseline sets constraints and attributes one call each; our loop writes
    # them in one transaction (records), and only it reaps and counts. The bare baseline
    # records nothing.
    raw, recording, ours = rows
    assert all(recording[p] > 0 for p in ("ask", "sample", "constraints", "attrs", "artifacts", "tell"))
    assert all(ours[p] > 0 for p in ("reap", "count", "ask", "sample", "artifacts", "records", "tell"))
    assert ours["constraints"] == ours["attrs"] == recording["records"] == recording["reap"] == 0
    assert raw["attrs"] == raw["artifacts"] == raw["constraints"] == raw["records"] == 0
    assert "target <= 1.5" in text and "target < 1%" in text


@pytest.mark.postgres
def test_scale_out_prints_a_row_per_kind_and_process_count(pg_url: str, synthetic_cache: Path) -> None:
    rows, text = run_scale_out(
        processes=[1, 2], samplers=["random"], seconds=0.2, window=1.5, settle=0.0, max_wait_s=0, url=pg_url
    )

    printed = table_rows(text, SCALE_OUT_COLUMNS)
    assert [(r[1], int(r[2])) for r in printed] == [("ours", 1), ("raw", 1), ("ours", 2), ("raw", 2)]
    for row in rows:
        assert row["trials_per_h"] > 0
        assert row["max_conn"] >= row["processes"]  # every process held a connection while it ran
        assert row["ideal_per_h"] == pytest.approx(
            row["processes"] * rows[row["kind"] == "raw"]["trials_per_h"]
        )
    assert "target >= 0.9" in text


def test_search_efficiency_prints_every_sampler_and_worker_count() -> None:
    rows, text = run_efficiency(budget=8, seeds=2, workers=[1, 2], checkpoints=[4], jobs=1)

    printed = table_rows(text, efficiency_columns([4, 8]))
    assert [(r[0], int(r[1])) for r in printed] == [
        (s, w) for w in (1, 2) for s in ("tpe", "nsga2", "gp", "random")
    ]
    for row in rows:
        assert row["runs"] == 2
        assert 0 <= row["hv@4"] <= row["final_hv"]
        assert 0 <= row["collapsed"] <= 1 and 0 <= row["feasible"] <= 1
    assert "recommended default sampler:" in text


def test_downstream_speed_prints_fp32_as_its_own_baseline(synthetic_cache: Path) -> None:
    rows, text = run_speed("demo", steps=4)
    assert [r["precision"] for r in rows] == ["fp32"]  # bf16 and compile rows need CUDA
    (row,) = table_rows(text, SPEED_COLUMNS)
    assert row[:3] == ["32x32", "fp32", "False"] and row[-1] == "1"
    assert rows[0]["steps_per_s"] > 0 and rows[0]["fields_per_s"] > 0


def test_downstream_gain_takes_the_picks_searched_fields_on_its_own_base() -> None:
    base = base_config(steps=10, seeds=[0, 1])
    pick = cvae_setting(base, load_config(DEMO_PICK))
    exported = load_config(DEMO_PICK)
    assert pick.loss == exported.loss and pick.model.output == exported.model.output
    assert pick.data == base.data and pick.data.synthetic.storm_days == 0.05
    assert pick.downstream.steps == 10 and pick.downstream.seeds == [0, 1]
    assert pick.model.latent_dim == base.model.latent_dim
