"""What reproducing a trial depends on, recorded with its export and checked when it is trained.

On the CPU a trial's objective values come back bit for bit when its config is trained with
the same seed, the same number of CPU threads (float sums are split across threads, and
rounding follows the split), the same CPU kernels (``AVX2`` and ``AVX512`` round
differently), the same precision and the same library versions. The export sets
``train.threads`` to the trial's count and records the rest under ``provenance.reproduction``;
after ``cvae-search train`` of an export, :func:`compare_run` says whether the run matched the
trial, and if not, which of these differed. On CUDA runs are not bit for bit even on one
machine (cuDNN picks its algorithms per run, and some kernels add with atomics), so there
the values agree only within the spread ``export --verify`` measures across seeds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from model.config import Config, read_yaml
from model.trainer import TrainResult
from search.objective import RUNTIME_ATTR

__all__ = [
    "ENVIRONMENT_FIELDS",
    "compare_run",
    "read_provenance",
    "reproduction_record",
    "threads_note",
    "trial_threads",
]

ENVIRONMENT_FIELDS = frozenset({"train.threads", "train.device", "train.precision", "train.save_checkpoint"})
"""Config fields that change how a run computes, or what it writes, but not what it trains."""


def trial_threads(trial: FrozenTrial) -> int | None:
    """The CPU threads ``trial`` trained with; ``None`` for trials that did not record it."""
    threads = (trial.user_attrs.get(RUNTIME_ATTR) or {}).get("threads")
    return threads if isinstance(threads, int) and threads >= 1 else None


def reproduction_record(trial: FrozenTrial) -> dict[str, Any]:
    """What the trial's values depend on beyond its config: the export's ``reproduction`` block."""
    runtime = trial.user_attrs.get(RUNTIME_ATTR) or {}
    device = runtime.get("device")
    record: dict[str, Any] = {
        "device": device,
        "precision": runtime.get("precision"),
        "threads": trial_threads(trial),
        "cpu_capability": runtime.get("cpu_capability"),
        "host": runtime.get("host"),
        "versions": {k: str(v) for k, v in (runtime.get("versions") or {}).items()},
    }
    if device is None:
        record["exact"] = "unknown: the trial recorded no runtime"
    elif not str(device).startswith("cpu"):
        record["exact"] = (
            "no: CUDA runs are not bit for bit; expect values within the spread export --verify measures"
        )
    elif record["threads"] is None:
        record["exact"] = "unknown: the trial recorded no thread count"
    else:
        record["exact"] = "yes, on a CPU with the same kernels and versions (train.threads is the trial's)"
    return record


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The ``provenance`` block of an exported config, or ``None`` for a plain config."""
    provenance = read_yaml(Path(path)).get("provenance")
    return provenance if isinstance(provenance, dict) else None


def threads_note(provenance: Mapping[str, Any], cfg: Config) -> str | None:
    """A line for a run of an export that trains with fewer CPU threads than the machine has."""
    threads = (provenance.get("reproduction") or {}).get("threads")
    cores = os.cpu_count() or 1
    if threads is None or cfg.train.threads != threads or threads >= cores:
        return None
    return (
        f"train.threads={threads}, as trial {provenance.get('trial')} trained, so that its values come "
        f"back exactly; --set train.threads=null trains on all {cores} cores"
    )


def _differences(record: Mapping[str, Any], result: TrainResult) -> list[str]:
    now = {
        "device": result.device,
        "precision": result.precision,
        "threads": result.threads,
        "cpu_capability": result.cpu_capability,
    }
    out = [
        f"{key} {now[key]} (the trial's: {record.get(key)})"
        for key in now
        if record.get(key) is not None and record.get(key) != now[key]
    ]
    versions = record.get("versions") or {}
    out += [
        f"{name} {result.versions.get(name)} (the trial's: {version})"
        for name, version in versions.items()
        if name in result.versions and str(result.versions[name]) != str(version)
    ]
    return out


def compare_run(provenance: Mapping[str, Any], result: TrainResult, changed: list[str]) -> list[str]:
    """Lines saying whether ``result`` reproduced the exported trial's values, and if not, why.

    Args:
        provenance: The export's ``provenance`` block.
        result: The run of the exported config.
        changed: Dotted fields the command line overrode (``--set``).
    """
    trial = provenance.get("trial")
    values: Mapping[str, float] = provenance.get("values") or {}
    if not values:
        return []
    trained = [f for f in changed if f not in ENVIRONMENT_FIELDS]
    if trained:
        return [f"--set {', '.join(trained)} changed what is trained: trial {trial}'s values do not apply"]
    pairs = [(name, float(result.metrics.get(name, math.nan)), float(v)) for name, v in values.items()]
    shown = ", ".join(f"{name} {got:.6g} (trial {want:.6g})" for name, got, want in pairs)
    if all(got == want for _, got, want in pairs):
        return [f"reproduced trial {trial} exactly: {shown}"]
    lines = [f"differs from trial {trial}: {shown}"]
    differences = _differences(provenance.get("reproduction") or {}, result)
    if differences:
        lines.append("this run differs from the trial's in: " + "; ".join(differences))
    elif not str(result.device).startswith("cpu"):
        lines.append("CUDA runs are not bit for bit, even on one machine")
    verify = provenance.get("verify")
    if isinstance(verify, dict) and verify.get("std"):
        n = len(verify.get("seeds") or [])
        spread = ", ".join(
            f"{name} {verify['mean'][name]:.4g} +- {sd:.2g}" for name, sd in verify["std"].items()
        )
        lines.append(f"for scale, --verify over {n} seeds found: {spread}")
    else:
        lines.append("for scale, export --verify N measures how much the values vary across seeds")
    return lines
