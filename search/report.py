"""The study report: Pareto front, hypervolume history, parameter importances and a trial table.

Everything is judged in the way :func:`search.export.pick_trial` judges it: only trials that
satisfy every constraint make up the front, and hypervolume is that of the feasible front
against the definition's reference point. Figures are written with matplotlib (PNG) and
plotly (a self-contained HTML file that works offline).
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search.definition import StudyDefinition
from search.study import BASELINE_ATTR

__all__ = [
    "diagnosis",
    "dominates",
    "feasible",
    "format_table",
    "hypervolume_history",
    "pareto_layers",
    "pareto_table",
    "write_report",
]

_log = logging.getLogger(__name__)


def feasible(trial: FrozenTrial) -> bool:
    """Every constraint of ``trial`` holds (Optuna's rule: each value <= 0)."""
    return all(v <= 0 for v in trial.constraints.values())


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def _signs(definition: StudyDefinition) -> np.ndarray:
    """+1 for minimised, -1 for maximised objectives: multiplying gives minimisation orientation."""
    return np.array([-1.0 if d == "maximize" else 1.0 for d in definition.directions])


def _dominates(p: np.ndarray, q: np.ndarray) -> bool:
    """In minimisation orientation: ``p`` is no worse than ``q`` anywhere and better somewhere."""
    return bool(np.all(p <= q) and np.any(p < q))


def dominates(definition: StudyDefinition, a: FrozenTrial, b: FrozenTrial) -> bool:
    """Trial ``a`` is at least as good as ``b`` on every objective and better on one."""
    signs = _signs(definition)
    return _dominates(signs * np.asarray(a.values), signs * np.asarray(b.values))


def pareto_layers(
    definition: StudyDefinition, trials: Sequence[FrozenTrial], depth: int
) -> list[list[FrozenTrial]]:
    """The first ``depth`` non-domination layers of ``trials`` (layer 0 is the Pareto front)."""
    signs = _signs(definition)
    rest = [(t, signs * np.asarray(t.values)) for t in trials]
    layers: list[list[FrozenTrial]] = []
    while rest and len(layers) < depth:
        layers.append([t for t, p in rest if not any(_dominates(q, p) for _, q in rest)])
        kept = {t.number for t in layers[-1]}
        rest = [(t, p) for t, p in rest if t.number not in kept]
    return layers


def hypervolume_history(study: optuna.Study, definition: StudyDefinition) -> list[tuple[int, float]]:
    """Hypervolume of the feasible front after each complete trial, in trial-number order.

    Computed in minimisation orientation against ``definition.reference_point``; points that
    do not dominate the reference point add nothing.
    """
    # Optuna's exact hypervolume routine (WFG, with 2-D and 3-D fast paths); it has no public home.
    from optuna._hypervolume import compute_hypervolume

    signs = _signs(definition)
    reference = signs * np.asarray(definition.reference_point, dtype=float)
    points: list[np.ndarray] = []
    history: list[tuple[int, float]] = []
    for trial in _complete(study):
        point = signs * np.asarray(trial.values, dtype=float)
        if feasible(trial) and np.all(point <= reference):
            points.append(point)
        hv = compute_hypervolume(np.array(points), reference) if points else 0.0
        history.append((trial.number, float(hv)))
    return history


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def diagnosis(trial: FrozenTrial) -> str:
    """Why ``trial`` failed, stopped early or is infeasible, in one line (empty when none applies)."""
    parts = []
    if trial.state != TrialState.COMPLETE:
        reason = trial.user_attrs.get("fail_reason")
        parts.append(trial.state.name.lower() + (f": {reason}" if reason else ""))
    if trial.user_attrs.get("stopped"):
        parts.append(str(trial.user_attrs["stopped"]))
    violated = [k for k, v in trial.constraints.items() if not v <= 0]
    if violated:
        parts.append("violates " + ", ".join(violated))
    return "; ".join(parts)


def pareto_table(
    study: optuna.Study, definition: StudyDefinition, picked: int | None = None
) -> list[dict[str, Any]]:
    """The rows that tell a study's story: its baselines, its feasible front and the layer behind it.

    Baselines come first (in the definition's order, each by its latest complete run, else
    its latest attempt), then the front and then the second layer of feasible trials, each
    sorted best-first on the first objective.

    Args:
        study: The study.
        definition: Its definition.
        picked: The number of the trial chosen for export, marked in its row.

    Returns:
        Dicts with keys ``picked``, ``trial``, ``source`` (baseline name or ``search``), one
        per objective metric, ``feasible``, ``front`` (``front``, ``near`` or ``-``) and ``note``
        (why a trial stopped early, failed or is infeasible).
    """
    complete = _complete(study)
    layers = pareto_layers(definition, [t for t in complete if feasible(t)], depth=2)
    where = {t.number: name for name, layer in zip(("front", "near"), layers, strict=False) for t in layer}

    def row(t: FrozenTrial) -> dict[str, Any]:
        values = t.values if t.values is not None else [None] * len(definition.objectives)
        return {
            "picked": t.number == picked,
            "trial": t.number,
            "source": t.user_attrs.get(BASELINE_ATTR) or "search",
            **dict(zip(definition.metric_names, values, strict=True)),
            "feasible": feasible(t) if t.state == TrialState.COMPLETE else None,
            "front": where.get(t.number, "-"),
            "note": diagnosis(t),
        }

    first = definition.objectives[0]
    sign = -1.0 if first.direction == "maximize" else 1.0
    rows = []
    by_baseline: dict[str, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get(BASELINE_ATTR)
        if name is not None and t.state.is_finished():
            by_baseline.setdefault(name, []).append(t)
    for name in [*definition.baselines, *sorted(set(by_baseline) - set(definition.baselines))]:
        runs = by_baseline.get(name, [])
        done = [t for t in runs if t.state == TrialState.COMPLETE]
        if done or runs:
            rows.append(row(max(done or runs, key=lambda t: t.number)))
    shown = {r["trial"] for r in rows}
    for layer in layers:
        for t in sorted(layer, key=lambda t: (sign * t.values[0], t.number)):
            if t.number not in shown:
                rows.append(row(t))
    if picked is not None and picked not in {r["trial"] for r in rows}:
        rows.extend(row(t) for t in study.get_trials(deepcopy=False) if t.number == picked)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` of :func:`pareto_table` as aligned text, the picked trial marked with ``*``."""
    if not rows:
        return "no complete trials yet"
    fixed = {"picked", "trial", "source", "feasible", "front", "note"}
    metrics = [k for k in rows[0] if k not in fixed]
    header = ["", "trial", "source", *metrics, "feasible", "front", "note"]
    body = [
        [
            "*" if r["picked"] else "",
            f"#{r['trial']}",
            r["source"] if r["source"] == "search" else f"baseline {r['source']}",
            *(_fmt(r[m]) for m in metrics),
            _fmt(r["feasible"]),
            r["front"],
            r["note"],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    legend = "front: on the feasible Pareto front; near: the next feasible layer"
    if any(r["picked"] for r in rows):
        legend = "* picked for export; " + legend
    return "\n".join([*lines, legend])


# --- files -----------------------------------------------------------------------------------


def _trial_rows(study: optuna.Study, definition: StudyDefinition) -> tuple[list[str], list[dict[str, Any]]]:
    trials = study.get_trials(deepcopy=False)
    metrics = sorted({k for t in trials for k in (t.user_attrs.get("metrics") or {})})
    constraints = sorted({k for t in trials for k in t.constraints})
    timings = sorted({k for t in trials for k in (t.user_attrs.get("timings") or {})})
    columns = [
        "number",
        "state",
        "baseline",
        "feasible",
        "stopped",
        "fail_reason",
        "datetime_start",
        "datetime_complete",
        "duration_s",
        *(f"value:{m}" for m in definition.metric_names),
        *(f"param:{p}" for p in definition.space),
        *(f"metric:{m}" for m in metrics),
        *(f"constraint:{c}" for c in constraints),
        *(f"timing:{k}" for k in timings),
    ]
    rows = []
    for t in trials:
        values = t.values or []
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "baseline": t.user_attrs.get(BASELINE_ATTR),
            "feasible": feasible(t) if t.state == TrialState.COMPLETE else None,
            "stopped": t.user_attrs.get("stopped"),
            "fail_reason": t.user_attrs.get("fail_reason"),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            **{f"value:{m}": v for m, v in zip(definition.metric_names, values, strict=False)},
            **{f"param:{p}": t.params.get(p) for p in definition.space},
            **{f"metric:{m}": v for m, v in (t.user_attrs.get("metrics") or {}).items()},
            **{f"constraint:{c}": v for c, v in t.constraints.items()},
            **{f"timing:{k}": v for k, v in (t.user_attrs.get("timings") or {}).items()},
        }
        rows.append(row)
    return columns, rows


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def _axis_label(definition: StudyDefinition, i: int) -> str:
    o = definition.objectives[i]
    return f"{o.metric} ({'higher' if o.direction == 'maximize' else 'lower'} is better)"


def _pareto_png(study: optuna.Study, definition: StudyDefinition, path: Path, picked: int | None) -> Path:
    from matplotlib.figure import Figure

    complete = _complete(study)
    front = pareto_layers(definition, [t for t in complete if feasible(t)], depth=1)
    on_front = {t.number for t in (front[0] if front else [])}
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()

    def xy(trials: Sequence[FrozenTrial]) -> tuple[list[float], list[float]]:
        return [t.values[0] for t in trials], [t.values[1] for t in trials]

    infeasible = [t for t in complete if not feasible(t)]
    dominated = [t for t in complete if feasible(t) and t.number not in on_front]
    best = sorted((t for t in complete if t.number in on_front), key=lambda t: t.values[0])
    ax.scatter(*xy(infeasible), c="0.7", marker="x", label=f"infeasible ({len(infeasible)})")
    ax.scatter(*xy(dominated), c="tab:blue", alpha=0.5, label=f"feasible ({len(dominated)})")
    front_style = "-o" if len(definition.objectives) == 2 else "o"
    if best:
        ax.plot(*xy(best), front_style, c="tab:red", label=f"feasible Pareto front ({len(best)})")
    for t in complete:
        name = t.user_attrs.get(BASELINE_ATTR)
        if name is not None or t.number == picked:
            label = name if name is not None else f"picked #{t.number}"
            ax.scatter(*xy([t]), s=160, facecolors="none", edgecolors="k", marker="*" if name else "o")
            ax.annotate(
                label, (t.values[0], t.values[1]), xytext=(6, 6), textcoords="offset points", fontsize=9
            )
    ax.set_xlabel(_axis_label(definition, 0))
    ax.set_ylabel(_axis_label(definition, 1))
    # An arrow pointing at the corner where both objectives are best.
    corner = tuple(0.95 if o.direction == "maximize" else 0.05 for o in definition.objectives[:2])
    start = tuple(c + (-0.12 if c > 0.5 else 0.12) for c in corner)
    ax.annotate(
        "better",
        xy=corner,
        xytext=start,
        xycoords="axes fraction",
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "0.3"},
        color="0.3",
        ha="center",
        va="center",
    )
    title = f"{definition.name}: {len(complete)} complete trials"
    if len(definition.objectives) > 2:
        title += f" (first two of {len(definition.objectives)} objectives)"
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _pareto_html(study: optuna.Study, definition: StudyDefinition, path: Path) -> Path:
    # plot_pareto_front reads each trial's constraints itself and draws infeasible trials grey.
    fig = optuna.visualization.plot_pareto_front(study, target_names=definition.metric_names)
    fig.write_html(path, include_plotlyjs=True)
    return path


def _hypervolume_files(history: list[tuple[int, float]], out: Path) -> tuple[Path, Path]:
    from matplotlib.figure import Figure

    csv_path = _write_csv(
        out / "hypervolume.csv",
        ["trial", "hypervolume"],
        [{"trial": n, "hypervolume": hv} for n, hv in history],
    )
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    if history:
        ax.step([n for n, _ in history], [hv for _, hv in history], where="post", marker=".")
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume of the feasible front")
    ax.set_title("hypervolume history")
    png = out / "hypervolume.png"
    fig.savefig(png, dpi=120)
    return csv_path, png


def _importances(study: optuna.Study, definition: StudyDefinition) -> dict[str, dict[str, float]] | str:
    complete = _complete(study)
    if not definition.space:
        return "skipped: the study searches no parameters"
    if len(complete) < 2:
        return f"skipped: importances need at least 2 complete trials, the study has {len(complete)}"
    # PED-ANOVA ranks a conditional parameter over the trials where it was searched, but
    # refuses one that no complete trial has searched yet: that one is left out (NaN).
    params = [p for p in definition.space if any(p in t.params for t in complete)]
    targets: dict[str, Callable[[FrozenTrial], float] | None] = {}
    if len(definition.objectives) > 1:
        targets["pareto"] = None
    for i, (name, sign) in enumerate(zip(definition.metric_names, _signs(definition), strict=True)):
        targets[name] = lambda t, i=i, sign=float(sign): sign * t.values[i]
    result = {}
    for name, target in targets.items():
        with warnings.catch_warnings():
            # PED-ANOVA warns that it treats lower targets as better: the sign above sees to that.
            warnings.simplefilter("ignore")
            try:
                result[name] = optuna.importance.get_param_importances(study, target=target, params=params)
            except (ValueError, RuntimeError) as e:
                _log.warning("parameter importances for %s could not be computed: %s", name, e)
                return f"skipped: {name}: {e}"
    return result


def _importance_files(
    importances: dict[str, dict[str, float]], params: list[str], out: Path
) -> tuple[Path, Path]:
    from matplotlib.figure import Figure

    targets = list(importances)
    rows = [{"param": p, **{t: importances[t].get(p, math.nan) for t in targets}} for p in params]
    csv_path = _write_csv(out / "importances.csv", ["param", *targets], rows)
    fig = Figure(figsize=(7, 1.5 + 0.45 * len(params) * max(1, len(targets)) / 2), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(targets)
    for k, t in enumerate(targets):
        ax.barh(
            [i + k * height for i in range(len(params))],
            [importances[t].get(p, 0.0) for p in params],
            height=height,
            label=t,
        )
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(params))], params)
    ax.invert_yaxis()
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    ax.legend(title="target", fontsize=8)
    png = out / "importances.png"
    fig.savefig(png, dpi=120)
    return csv_path, png


def write_report(
    study: optuna.Study, definition: StudyDefinition, out_dir: Path, *, picked: int | None = None
) -> dict[str, Path | str]:
    """Write the study's report files into ``out_dir``.

    Files: ``pareto.html`` (interactive), ``pareto.png``, ``hypervolume.csv`` and ``.png``,
    ``importances.csv`` and ``.png`` and ``trials.csv`` (one row per trial).

    Args:
        study: The study.
        definition: Its definition (objective names and directions, reference point, space).
        out_dir: Folder for the files; created if missing.
        picked: A trial number to mark in ``pareto.png``.

    Returns:
        Each written file by name (``"pareto.png"``); an output that could not be made
        maps to a string saying why (``"importances": "skipped: ..."``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | str] = {}
    columns, rows = _trial_rows(study, definition)
    written["trials.csv"] = _write_csv(out / "trials.csv", columns, rows)
    n_objectives = len(definition.objectives)
    if n_objectives >= 2:
        written["pareto.png"] = _pareto_png(study, definition, out / "pareto.png", picked)
    else:
        written["pareto.png"] = "skipped: a Pareto front needs at least 2 objectives"
    if n_objectives in (2, 3):
        written["pareto.html"] = _pareto_html(study, definition, out / "pareto.html")
    else:
        written["pareto.html"] = f"skipped: the interactive front shows 2 or 3 objectives, not {n_objectives}"
    hv_csv, hv_png = _hypervolume_files(hypervolume_history(study, definition), out)
    written["hypervolume.csv"], written["hypervolume.png"] = hv_csv, hv_png
    importances = _importances(study, definition)
    if isinstance(importances, str):
        written["importances"] = importances
    else:
        written["importances.csv"], written["importances.png"] = _importance_files(
            importances, list(definition.space), out
        )
    _log.info("report for %s written to %s", definition.name, out)
    return written
