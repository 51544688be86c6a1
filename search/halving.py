"""Multi-objective successive halving: dominated trials stop at a rung instead of training on.

Optuna's pruners take one objective, so, as with collapse, a trial stopped here is evaluated
and COMPLETED with the ``halved`` constraint violated: it never enters the feasible front or
an export, and the sampler learns from it.

**The rule.** At each rung (an epoch of ``halving.rungs``) a trial evaluates the rung
metrics on the first ``halving.days`` validation days, records them in the storage and is
ranked among every trial that reached the same rung before it (asynchronously, as in ASHA:
nobody waits for a rung to fill), itself included. The order, best first:

1. feasible before infeasible, where feasible means that each study constraint whose metric
   is judged at the rung holds on the rung metrics;
2. feasible trials by Pareto layer (non-dominated sorting of the judged objectives, layer 1
   being the front), infeasible ones by their total violation (sum of the bounds' excess),
   equal violations by their Pareto layer among the infeasible;
3. within a layer, by crowding distance (NSGA-II's: the two ends of each objective's range
   count as infinitely far), the more isolated first, which keeps the front's spread;
4. remaining ties by trial number, the earlier first.

Of ``n`` trials at the rung, the trial goes on if its place ``p`` (0 for the best) satisfies
``p < n / eta``: it is in the top ``1/eta``. Nothing is stopped while fewer than
``halving.min_peers`` other trials have reached the rung, and a baseline is never stopped
(it is ranked and recorded all the same, and counts as a peer).

**Records.** Each trial keeps its rungs in its user attribute ``halving``, ``{"<epoch>":
{"metrics", "peers", "place", "reached", "keep", "decision", "trial"}}``, written through the
storage API, so several workers on one PostgreSQL study, or behind the gRPC proxy, see one
another's rungs. A trial writes its metrics before it reads its peers, so of two trials
reaching a rung at once at least one sees the other; on a storage with a study lock (the
database directly) the record, the read and the decision happen under it, so the rung's
arrivals are judged in one order. Failed trials are not peers: a trial failed by a lost worker
and retried hands its records to the retry (Optuna's retry copies user attributes), which
takes its decision at those rungs without measuring again, so rung records survive a worker
restart and are never counted twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from model.trainer import EpochReport
from search.definition import Halving, StudyDefinition
from search.storage import search_storage
from search.study import BASELINE_ATTR

__all__ = [
    "HALVED_CONSTRAINT",
    "HALVING_ATTR",
    "Decision",
    "HalvingWatcher",
    "RungBook",
    "RungEntry",
    "halved",
    "halving_summary",
    "judge",
    "rung_entry",
    "rung_order",
]

_log = logging.getLogger(__name__)

HALVED_CONSTRAINT = "halved"
HALVING_ATTR = "halving"
HALVED_PREFIX = "halved at epoch"
UNMEASURED_VIOLATION = 1e6
"""A constraint whose metric could not be computed counts as violated by this much."""


@dataclass(frozen=True)
class RungEntry:
    """One trial at a rung, as the rule sees it."""

    trial: int
    values: tuple[float, ...]
    """The judged objectives, each oriented so that lower is better (NaN as +inf)."""
    violation: float
    """Total excess over the judged constraints' bounds; 0 when feasible."""

    @property
    def feasible(self) -> bool:
        return self.violation <= 0


def rung_entry(definition: StudyDefinition, trial: int, metrics: Mapping[str, float]) -> RungEntry:
    """A trial's rung metrics as the rule ranks them."""
    rule = _rule(definition)
    assert rule.metrics is not None
    values = []
    for o in definition.objectives:
        if o.metric in rule.metrics:
            v = _number(metrics.get(o.metric))
            v = -v if o.direction == "maximize" else v
            values.append(v if math.isfinite(v) else math.inf)
    violation = 0.0
    for c in definition.constraints:
        if c.metric not in rule.metrics:
            continue
        v = _number(metrics.get(c.metric))
        v = abs(v) if c.abs else v
        if not math.isfinite(v):
            violation += UNMEASURED_VIOLATION
            continue
        if c.min is not None:
            violation += max(0.0, c.min - v)
        if c.max is not None:
            violation += max(0.0, v - c.max)
    return RungEntry(trial, tuple(values), violation)


def _number(value: Any) -> float:
    # Stored as JSON, where a NaN was written as null.
    return float(value) if isinstance(value, (int, float)) else math.nan


def _dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    return all(a <= b for a, b in zip(p, q, strict=True)) and any(a < b for a, b in zip(p, q, strict=True))


def _layers(entries: Sequence[RungEntry]) -> list[list[RungEntry]]:
    rest = list(entries)
    layers: list[list[RungEntry]] = []
    while rest:
        layer = [e for e in rest if not any(_dominates(o.values, e.values) for o in rest)]
        layers.append(layer)
        rest = [e for e in rest if e not in layer]
    return layers


def _crowding(layer: Sequence[RungEntry]) -> dict[int, float]:
    distance = dict.fromkeys((e.trial for e in layer), 0.0)
    for m in range(len(layer[0].values)):
        ranked = sorted(layer, key=lambda e: (e.values[m], e.trial))
        low, high = ranked[0].values[m], ranked[-1].values[m]
        distance[ranked[0].trial] = distance[ranked[-1].trial] = math.inf
        span = high - low
        if not math.isfinite(span) or span <= 0:
            continue
        for before, e, after in zip(ranked, ranked[1:], ranked[2:], strict=False):
            distance[e.trial] += (after.values[m] - before.values[m]) / span
    return distance


def rung_order(entries: Sequence[RungEntry]) -> list[RungEntry]:
    """``entries`` best first, by the rule in the module docstring."""
    feasible = [e for e in entries if e.feasible]
    order: list[RungEntry] = []
    for layer in _layers(feasible):
        crowding = _crowding(layer)
        order.extend(sorted(layer, key=lambda e: (-crowding[e.trial], e.trial)))
    infeasible = [e for e in entries if not e.feasible]
    layer_of = {e.trial: i for i, layer in enumerate(_layers(infeasible)) for e in layer}
    order.extend(sorted(infeasible, key=lambda e: (e.violation, layer_of[e.trial], e.trial)))
    return order


@dataclass(frozen=True)
class Decision:
    """What the rule made of one trial at one rung."""

    epoch: int
    go_on: bool
    place: int
    """0-based, among the ``reached`` trials at the rung."""
    reached: int
    keep: int
    """How many of ``reached`` the rule lets go on (``ceil(reached / eta)``)."""
    peers: tuple[int, ...]
    """The other trials it was judged against."""
    why: str
    """``go on``, ``halved``, ``baseline`` or ``too few peers``."""
    detail: str = ""

    @property
    def reason(self) -> str:
        """One line for the log; for a stopped trial, its ``stopped`` reason."""
        head = f"{HALVED_PREFIX} {self.epoch}" if not self.go_on else f"rung {self.epoch}: {self.why}"
        return (
            f"{head}: ranked {self.place + 1} of {self.reached} trials at the rung"
            f"{f' ({self.detail})' if self.detail else ''}; the top {self.keep} go on"
        )

    def record(self) -> dict[str, Any]:
        return {
            "decision": self.why,
            "place": self.place,
            "reached": self.reached,
            "keep": self.keep,
            "peers": list(self.peers),
            "detail": self.detail,
        }

    @classmethod
    def from_record(cls, epoch: int, rec: Mapping[str, Any]) -> Decision:
        return cls(
            epoch=epoch,
            go_on=rec["decision"] != "halved",
            place=rec["place"],
            reached=rec["reached"],
            keep=rec["keep"],
            peers=tuple(rec["peers"]),
            why=rec["decision"],
            detail=rec.get("detail", ""),
        )


def judge(
    own: RungEntry, peers: Sequence[RungEntry], rule: Halving, epoch: int, *, baseline: bool = False
) -> Decision:
    """Whether ``own`` goes on past rung ``epoch``, ranked among ``peers`` (who reached it before)."""
    entries = [own, *(p for p in peers if p.trial != own.trial)]
    order = rung_order(entries)
    place = next(i for i, e in enumerate(order) if e.trial == own.trial)
    reached = len(entries)
    keep = math.ceil(reached / rule.eta)
    if baseline:
        why = "baseline"
    elif reached - 1 < rule.min_peers:
        why = "too few peers"
    else:
        why = "go on" if place < keep else "halved"
    if own.feasible:
        layer = next(i for i, layer in enumerate(_layers([e for e in entries if e.feasible])) if own in layer)
        detail = f"Pareto layer {layer + 1} of the feasible"
    else:
        detail = f"infeasible at the rung, violation {own.violation:.3g}"
    return Decision(
        epoch=epoch,
        go_on=why != "halved",
        place=place,
        reached=reached,
        keep=keep,
        peers=tuple(sorted(e.trial for e in entries if e.trial != own.trial)),
        why=why,
        detail=detail,
    )


def _rule(definition: StudyDefinition) -> Halving:
    if definition.halving is None:
        raise ValueError(f"study {definition.name!r} has no halving rule")
    return definition.halving


def _records(trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    return dict(trial.user_attrs.get(HALVING_ATTR) or {})


class RungBook:
    """The rung records of one running trial, in its storage."""

    def __init__(self, definition: StudyDefinition, trial: optuna.Trial) -> None:
        self.definition = definition
        self.rule = _rule(definition)
        self.trial = trial
        self.baseline = trial.user_attrs.get(BASELINE_ATTR) is not None
        self._records = _records(trial)

    def recorded(self, epoch: int) -> Decision | None:
        """The decision at ``epoch`` this trial (or the failed attempt it retries) already took."""
        rec = self._records.get(str(epoch))
        return Decision.from_record(epoch, rec) if rec and "decision" in rec else None

    def arrive(self, epoch: int, metrics: Mapping[str, float]) -> Decision:
        """Record this trial's rung metrics at ``epoch`` and judge it against its peers there."""
        storage = search_storage(self.trial.storage)
        study_id = self.trial.study._study_id
        lock = storage.study_lock(study_id) if storage is not None else contextlib.nullcontext()
        key = str(epoch)
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        with lock:
            self._records[key] = {"trial": self.trial.number, "metrics": clean}
            self._write()
            own = rung_entry(self.definition, self.trial.number, metrics)
            decision = judge(own, self.peers(epoch), self.rule, epoch, baseline=self.baseline)
            self._records[key].update(decision.record())
            self._write()
        return decision

    def peers(self, epoch: int) -> list[RungEntry]:
        """Every other trial of the study, not failed, that recorded metrics at ``epoch``."""
        entries = []
        for t in self.trial.storage.get_all_trials(self.trial.study._study_id, deepcopy=False):
            if t._trial_id == self.trial._trial_id or t.state == TrialState.FAIL:
                continue
            rec = _records(t).get(str(epoch))
            if rec and "metrics" in rec:
                entries.append(rung_entry(self.definition, t.number, rec["metrics"]))
        return entries

    def _write(self) -> None:
        self.trial.storage.set_trial_user_attr(self.trial._trial_id, HALVING_ATTR, self._records)


class HalvingWatcher:
    """The per-epoch callback: at each rung, evaluate, record, judge; stop a halved trial."""

    def __init__(self, definition: StudyDefinition, trial: optuna.Trial) -> None:
        self.book = RungBook(definition, trial)
        self.rule = self.book.rule

    def __call__(self, report: EpochReport) -> str | None:
        if report.epoch not in (self.rule.rungs or []):
            return None
        decision = self.book.recorded(report.epoch)
        if decision is not None:
            _log.info(
                "trial %d %s (taken by the attempt it retries)", self.book.trial.number, decision.reason
            )
        else:
            if report.evaluate is None:
                raise RuntimeError("halving: this trainer's epoch reports cannot evaluate rung metrics")
            metrics = report.evaluate(self.rule.metrics, self.rule.days)
            decision = self.book.arrive(report.epoch, metrics)
            _log.info("trial %d %s", self.book.trial.number, decision.reason)
        return None if decision.go_on else decision.reason


def halved(stopped: str | None) -> bool:
    """Whether a trial's ``stopped`` reason says halving stopped it."""
    return bool(stopped) and str(stopped).startswith(HALVED_PREFIX)


def halving_summary(trials: Sequence[FrozenTrial], rungs: Sequence[int]) -> list[str]:
    """For ``status``: per rung, how many trials reached it and how many it stopped; the latest stops."""
    reached = dict.fromkeys(rungs, 0)
    stopped = dict.fromkeys(rungs, 0)
    latest: list[tuple[int, str]] = []
    for t in trials:
        if t.state == TrialState.FAIL:
            continue
        for key, rec in _records(t).items():
            epoch = int(key)
            reached[epoch] = reached.get(epoch, 0) + 1
            if rec.get("decision") == "halved":
                stopped[epoch] = stopped.get(epoch, 0) + 1
        if t.state == TrialState.COMPLETE and halved(t.user_attrs.get("stopped")):
            latest.append((t.number, str(t.user_attrs["stopped"])))
    lines = [
        "halving: "
        + "; ".join(f"rung {e}: {reached[e]} reached, {stopped[e]} halved" for e in sorted(reached))
    ]
    lines += [f"  #{n}  {reason}" for n, reason in sorted(latest)[-5:]]
    return lines
