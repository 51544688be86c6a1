"""Smoke tests of the halving benchmark on its committed cache of learning curves (no training)."""

from __future__ import annotations

import math

from benchmarks.halving import (
    COLUMNS,
    _collapse_epoch,
    correlations,
    halving_definition,
    load_curves,
    run_halving,
)
from tests.benchmarks.test_benchmarks import table_rows


def test_the_cache_holds_full_curves_that_replay_the_collapse_rule() -> None:
    definition, curves = load_curves()
    whole = [c for c in curves if not c.diverged]
    assert len(curves) >= 200 and len(whole) >= 0.9 * len(curves)
    epochs = definition.base.train.epochs
    for c in whole:
        assert c.epochs == epochs and len(c.train_s) == epochs
        assert all(len(v) == epochs for table in (c.rung, c.probe, c.full) for v in table.values())
    # Some curves collapse under the study's rule (stopped at or after its warm-up), some do not.
    stops = [_collapse_epoch(definition, c) for c in whole]
    assert definition.collapse is not None
    assert all(s is None or s[0] >= definition.collapse.after_epoch for s in stops)
    assert 0 < sum(s is not None for s in stops) < len(whole)


def test_correlations_cover_every_epoch_and_metric() -> None:
    definition = halving_definition()
    _, curves = load_curves()
    rows = correlations(definition, curves)
    assert [r["epoch"] for r in rows] == list(range(1, definition.base.train.epochs))
    for row in rows:
        assert set(row) == {
            "epoch",
            "front kept",
            *(f"{m} {s}" for m in ("diversity", "ks_stat", "|mass_bias|") for s in ("all", "healthy")),
        }
        assert all(-1 <= v <= 1 for k, v in row.items() if k != "epoch" and not math.isnan(v))
    # Over every trial (broken settings against healthy ones) late epochs predict the end.
    assert all(rows[-1][f"{m} all"] > 0.8 for m in ("diversity", "ks_stat", "|mass_bias|"))


def test_the_search_prints_every_method_and_halving_saves_epochs() -> None:
    rows, text = run_halving(seeds=1, budget=200, jobs=1)
    printed = table_rows(text, COLUMNS)
    assert [r[0] for r in printed] == ["tpe", "tpe+halving", "random", "random+halving"]
    by = {r["method"]: r for r in rows}
    assert by["tpe"]["halved"] == by["random"]["halved"] == 0
    assert by["tpe+halving"]["halved"] > 0 and by["random+halving"]["halved"] > 0
    # For the same epochs, a halving search runs more trials.
    assert by["random+halving"]["trials"] > by["random"]["trials"]
    for r in rows:
        assert 0 <= r["hv@1/4"] <= r["hv@1/2"] <= r["hv@1"]
