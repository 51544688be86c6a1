"""Picking a trial from the feasible Pareto front and exporting it as a training config.

Only the feasible front (``study.best_trials``, which leaves out every trial that violates a
constraint) is ever picked from. Pick rules:

``knee`` (the default)
    Each objective is scaled to [0, 1] over the front, oriented so that 0 is best (maximised
    objectives are negated first); the trial closest (Euclidean) to the ideal point
    (0, ..., 0) wins. Ties go to the lowest trial number.
``max:<metric>`` / ``min:<metric>``
    The front's best trial on one objective (or any metric recorded with the trials, e.g.
    ``max:diversity``, or a gain recorded by ``cvae-search downstream``, e.g.
    ``max:downstream_csi_p99_gain``). Ties go to the lowest trial number.
``max:<metric>@<other><=<bound>`` (also ``>=``, and ``min:`` alike)
    As above, among the front's trials whose ``<other>`` (an objective or any recorded
    metric) lies within the bound, e.g. ``max:diversity@ks_stat<=0.1``.

The export is a YAML config in the training schema plus a ``provenance`` block saying where
it came from (with the trial's downstream table and gains, when it has them). It sets
``train.threads`` to the CPU threads the trial trained with and records what else its values
depend on (``provenance.reproduction``, :mod:`search.reproduce`), so that
``cvae-search train`` of the export reproduces the trial's objective values on the CPU.
:func:`verify_trial` retrains it with other seeds, so a lucky point is seen before production
training.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from model.config import Config, Normalization, save_config
from search.definition import StudyDefinition
from search.downstream_stage import downstream_gains, downstream_records
from search.reproduce import reproduction_record, trial_threads
from search.storage import redact
from search.study import BASELINE_ATTR

__all__ = [
    "EXPORTED_ATTR",
    "PICK_RULES_HELP",
    "NoFeasibleTrial",
    "VerifyResult",
    "export_trial",
    "knee_order",
    "pick_trial",
    "trial_config",
    "verify_trial",
]

_log = logging.getLogger(__name__)

PICK_RULES_HELP = (
    "knee (default): the front's trial closest to the ideal point after scaling each objective "
    "to [0, 1] over the front; max:METRIC / min:METRIC: the front's best on one objective or "
    "recorded metric; max:METRIC@OTHER<=BOUND (or >=, or min:): the same among the front's "
    "trials with OTHER within the bound, e.g. max:diversity@ks_stat<=0.1"
)

EXPORTED_ATTR = "cvae_search:exported"
"""Study system attribute naming the latest exported trial, which the dashboard's front circles."""

_RULE = re.compile(
    r"^(?P<sense>max|min):(?P<metric>[A-Za-z_]\w*)"
    r"(?:@(?P<other>[A-Za-z_]\w*)(?P<op><=|>=)(?P<bound>[^<>=@\s]+))?$"
)


class NoFeasibleTrial(LookupError):
    """The study has no feasible complete trial, or none on its front satisfies the pick rule."""


@dataclass
class VerifyResult:
    """Objective values of a config retrained with several seeds."""

    seeds: list[int]
    values: dict[str, list[float]]
    """Per objective, one value per seed."""
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    """Sample standard deviation (0 with a single seed)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": list(self.seeds),
            "mean": dict(self.mean),
            "std": dict(self.std),
            "values": self.values,
        }


def _metric_value(
    definition: StudyDefinition, trial: FrozenTrial, name: str, gains: dict[int, dict[str, float]]
) -> float:
    """An objective's value, else a metric recorded with the trial, else a downstream gain
    recorded for it (``gains``, by trial number); NaN when none exists."""
    if name in definition.metric_names and trial.values is not None:
        return float(trial.values[definition.metric_names.index(name)])
    value = (trial.user_attrs.get("metrics") or {}).get(name, gains.get(trial.number, {}).get(name))
    return float(value) if isinstance(value, (int, float)) else math.nan


def _no_feasible_message(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        states = Counter(t.state.name.lower() for t in trials)
        seen = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no trials"
        return f"study {study.study_name!r} has no complete trial yet ({seen})"
    violated: Counter[str] = Counter()
    infeasible = 0
    for t in complete:
        bad = [k for k, v in t.constraints.items() if not v <= 0]
        infeasible += bool(bad)
        violated.update(bad)
    tally = ", ".join(f"{k} ({n} trial{'s' if n != 1 else ''})" for k, n in violated.most_common())
    return (
        f"study {study.study_name!r} has no feasible trial: {len(complete)} complete, "
        f"{infeasible} infeasible; constraints violated: {tally or 'none'}"
    )


def _front(study: optuna.Study) -> list[FrozenTrial]:
    front = sorted(study.best_trials, key=lambda t: t.number)
    if not front:
        raise NoFeasibleTrial(_no_feasible_message(study))
    return front


def knee_order(study: optuna.Study, definition: StudyDefinition) -> list[FrozenTrial]:
    """The feasible front, nearest the ideal point first (the ``knee`` rule's distance; ties by
    trial number).

    Raises:
        NoFeasibleTrial: The study has no feasible complete trial.
    """
    front = _front(study)
    signs = [-1.0 if d == "maximize" else 1.0 for d in definition.directions]
    points = [[s * v for s, v in zip(signs, t.values, strict=True)] for t in front]
    lows = [min(col) for col in zip(*points, strict=True)]
    highs = [max(col) for col in zip(*points, strict=True)]

    def distance(p: list[float]) -> float:
        scaled = [(v - lo) / (hi - lo) if hi > lo else 0.0 for v, lo, hi in zip(p, lows, highs, strict=True)]
        return math.hypot(*scaled)

    ranked = sorted(zip(front, points, strict=True), key=lambda tp: (distance(tp[1]), tp[0].number))
    return [t for t, _ in ranked]


def _parse_rule(rule: str) -> re.Match[str]:
    match = _RULE.match(rule.strip())
    bound_ok = True
    if match is not None and match["bound"] is not None:
        try:
            float(match["bound"])
        except ValueError:
            bound_ok = False
    if match is None or not bound_ok:
        raise ValueError(f"pick rule {rule!r}: expected one of {PICK_RULES_HELP}")
    return match


def pick_trial(study: optuna.Study, definition: StudyDefinition, rule: str = "knee") -> FrozenTrial:
    """The trial a pick rule chooses from the study's feasible Pareto front.

    Args:
        study: A study created from ``definition``.
        definition: Its definition (objective names and directions).
        rule: ``knee``, ``max:METRIC``, ``min:METRIC`` or ``max:METRIC@OTHER<=BOUND``
            (module docstring).

    Raises:
        ValueError: ``rule`` is not one of the accepted forms, or names an unknown metric.
        NoFeasibleTrial: No complete trial satisfies every constraint, or no front trial
            satisfies the rule's bound.
    """
    if rule.strip() == "knee":
        return knee_order(study, definition)[0]
    match = _parse_rule(rule)
    front = _front(study)
    gains = {n: downstream_gains(r) for n, r in downstream_records(study).items()}

    def value_of(trial: FrozenTrial, name: str) -> float:
        return _metric_value(definition, trial, name, gains)

    metric, other = match["metric"], match["other"]
    for name in filter(None, (metric, other)):
        if all(math.isnan(value_of(t, name)) for t in front):
            known = sorted(
                set(definition.metric_names).union(
                    *((t.user_attrs.get("metrics") or {}) for t in front),
                    *(gains.get(t.number, {}) for t in front),
                )
            )
            raise ValueError(
                f"pick rule {rule!r}: no front trial has a value for {name!r} (known: {', '.join(known)})"
            )
    candidates = front
    if other is not None:
        bound = float(match["bound"])
        within = (lambda v: v <= bound) if match["op"] == "<=" else (lambda v: v >= bound)
        candidates = [t for t in front if within(value_of(t, other))]
        if not candidates:
            seen = sorted(value_of(t, other) for t in front)
            raise NoFeasibleTrial(
                f"pick rule {rule!r}: no trial on the feasible front has {other}{match['op']}{bound:g} "
                f"(the front's {other} ranges over {seen[0]:.4g}..{seen[-1]:.4g})"
            )
    sign = -1.0 if match["sense"] == "max" else 1.0
    scored = [(sign * value_of(t, metric), t.number, t) for t in candidates]
    finite = [s for s in scored if not math.isnan(s[0])]
    if not finite:
        raise NoFeasibleTrial(
            f"pick rule {rule!r}: no front trial within the bound has a value for {metric!r}"
        )
    return min(finite, key=lambda s: (s[0], s[1]))[2]


def trial_config(definition: StudyDefinition, trial: FrozenTrial) -> Config:
    """The config ``trial`` trained, with the normalisation statistics it fitted and the CPU
    threads it trained with (each when recorded)."""
    cfg = definition.config_for(trial.params, trial.user_attrs.get(BASELINE_ATTR))
    threads = trial_threads(trial)
    if threads is not None:
        cfg = replace(cfg, train=replace(cfg.train, threads=threads))
    stats = trial.user_attrs.get("normalization")
    if stats is None:
        _log.warning("trial %d recorded no normalization; training the export refits it", trial.number)
        return cfg
    return replace(cfg, normalization=Normalization(**stats))


def _versions() -> dict[str, str]:
    from model.checkpoint import versions

    # str(): torch reports its version as a str subclass, which YAML's safe dumper refuses.
    return {k: str(v) for k, v in {**versions(), "optuna": optuna.__version__}.items()}


def _provenance(
    study: optuna.Study,
    definition: StudyDefinition,
    trial: FrozenTrial,
    storage_url: str,
    rule: str | None,
    verify: VerifyResult | None,
) -> dict[str, Any]:
    values = dict(zip(definition.metric_names, trial.values or [], strict=False))
    constraints = dict(trial.constraints)
    provenance: dict[str, Any] = {
        "study": study.study_name,
        "definition_digest": definition.digest(),
        "trial": trial.number,
        "baseline": trial.user_attrs.get(BASELINE_ATTR),
        "pick": rule,
        "values": {k: float(v) for k, v in values.items()},
        "constraints": {k: float(v) for k, v in constraints.items()},
        "feasible": all(v <= 0 for v in constraints.values()),
        "metrics": dict(trial.user_attrs.get("metrics") or {}),
        "stopped": trial.user_attrs.get("stopped"),
        "reproduction": reproduction_record(trial),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "storage": redact(storage_url),
    }
    if verify is not None:
        provenance["verify"] = verify.to_dict()
    downstream = downstream_records(study).get(trial.number)
    if downstream is not None:
        provenance["downstream"] = downstream
    return provenance


def export_trial(
    study: optuna.Study,
    definition: StudyDefinition,
    trial: FrozenTrial,
    out: Path,
    *,
    storage_url: str,
    rule: str | None = None,
    verify: VerifyResult | None = None,
) -> Path:
    """Write ``trial``'s training config, with its provenance, to ``out``.

    The file loads with :func:`model.config.load_config` (which ignores ``provenance``) and
    trains as it is. The study records the export (:data:`EXPORTED_ATTR`).

    Args:
        study: The trial's study.
        definition: The study's definition.
        trial: A complete trial of ``study``.
        out: The YAML file to write; its folder is created.
        storage_url: The study's storage; recorded without its password.
        rule: The pick rule that chose the trial, recorded as it was given.
        verify: Seed-robustness results from :func:`verify_trial`.

    Returns:
        ``out``.
    """
    if trial.state != TrialState.COMPLETE:
        raise ValueError(f"trial {trial.number}: expected a complete trial, got {trial.state.name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = _provenance(study, definition, trial, storage_url, rule, verify)
    save_config(trial_config(definition, trial), out, provenance)
    study._storage.set_study_system_attr(
        study._study_id,
        EXPORTED_ATTR,
        {"trial": trial.number, "pick": rule, "file": str(out.resolve()), "at": provenance["exported_at"]},
    )
    _log.info("exported trial %d of %s to %s", trial.number, study.study_name, out)
    return out


def verify_trial(definition: StudyDefinition, trial: FrozenTrial, seeds: list[int]) -> VerifyResult:
    """Retrain ``trial``'s config once per ``train.seed`` in ``seeds`` and summarise its objectives."""
    from model.data import load_data
    from model.trainer import train

    if not seeds:
        raise ValueError("verify: expected at least one seed, got none")
    cfg = trial_config(definition, trial)
    data = load_data(cfg.data, cfg.normalization)
    values: dict[str, list[float]] = {m: [] for m in definition.metric_names}
    for seed in seeds:
        _log.info("verify trial %d: training with train.seed=%d", trial.number, seed)
        metrics = train(replace(cfg, train=replace(cfg.train, seed=seed)), data=data).metrics
        for name in values:
            values[name].append(float(metrics.get(name, math.nan)))
    return VerifyResult(
        seeds=list(seeds),
        values=values,
        mean={k: statistics.fmean(v) for k, v in values.items()},
        std={k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()},
    )
