"""The objective: trial -> config -> train -> metrics -> objective values.

Collapse-aware early stopping lives here too. Optuna's pruners do not support
multi-objective studies, and a PRUNED trial teaches a multi-objective sampler nothing, so a
collapsed trial is stopped early, evaluated, and COMPLETED with its measured values and the
``collapse`` constraint violated: the sampler learns where collapse lies.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

from model.checkpoint import read_checkpoint
from model.config import Config, ConfigError, config_to_dict
from model.data import Dataset, load_data
from model.downstream import DOWNSTREAM_FILES, DownstreamResult, run_downstream
from model.fused import FUSED_GROUP
from model.trainer import EpochReport, TrainingDiverged, TrainResult, train
from search.definition import Collapse, Param, StudyDefinition
from search.halving import HALVED_CONSTRAINT, HalvingWatcher, halved
from search.storage import json_safe, set_trial_attrs
from search.study import BASELINE_ATTR, DOWNSTREAM_ATTR

__all__ = [
    "PEAK_GPU_MEMORY_ATTR",
    "RUNTIME_ATTR",
    "CollapseWatcher",
    "TrainedTrial",
    "TrialFailed",
    "TrialJob",
    "TrialObjective",
    "TrialOutcome",
    "constraint_values",
    "suggest",
    "suggest_space",
]

_log = logging.getLogger(__name__)

COLLAPSE_CONSTRAINT = "collapse"
RUNTIME_ATTR = "runtime"
PEAK_GPU_MEMORY_ATTR = "peak_gpu_memory_bytes"
"""Key in the ``runtime`` user attribute; present only for trials trained on a GPU."""


class TrialFailed(Exception):
    """The trial cannot produce values; ``retry`` says whether the same parameters may work."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


def suggest(trial: optuna.Trial, name: str, p: Param) -> Any:
    """Ask the trial for one searched field."""
    if p.type == "categorical":
        assert p.choices is not None
        return trial.suggest_categorical(name, p.choices)
    assert p.low is not None and p.high is not None
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)


def suggest_space(trial: optuna.Trial, space: Mapping[str, Param]) -> dict[str, Any]:
    """Ask the trial for every field of ``space`` whose condition the fields before it meet."""
    params: dict[str, Any] = {}
    for name, p in space.items():
        if p.active(params):
            params[name] = suggest(trial, name, p)
    return params


class CollapseWatcher:
    """Stops training once, after the warm-up, the samples show posterior collapse.

    Judged by the samples' spread and the decoder's use of z, not by the KL or active units,
    which free bits hold up artificially.
    """

    def __init__(self, rule: Collapse) -> None:
        self.rule = rule

    def __call__(self, report: EpochReport) -> str | None:
        if report.epoch < self.rule.after_epoch:
            return None
        probe = report.probe()
        low = [
            f"{name}={probe[name]:.4g} < {floor:g}"
            for name, floor in (
                ("spread_norm", self.rule.min_spread_norm),
                ("z_usage", self.rule.min_z_usage),
            )
            if not probe[name] >= floor
        ]
        return f"collapsed at epoch {report.epoch}: " + ", ".join(low) if low else None


def constraint_values(
    definition: StudyDefinition, metrics: Mapping[str, float], stopped: str | None
) -> dict[str, float]:
    """Optuna constraint values (feasible when <= 0), one per bound, plus ``collapse`` and
    ``halved`` where the study has those rules."""
    out: dict[str, float] = {}
    for c in definition.constraints:
        v = metrics.get(c.metric, math.nan)
        v = abs(v) if c.abs else v
        label = f"|{c.metric}|" if c.abs else c.metric
        # A metric that could not be computed violates its constraint, never satisfies it.
        if c.min is not None:
            out[f"{label}>={c.min:g}"] = c.min - v if math.isfinite(v) else 1e6
        if c.max is not None:
            out[f"{label}<={c.max:g}"] = v - c.max if math.isfinite(v) else 1e6
    if definition.collapse is not None and halved(stopped):
        # It passed every collapse check it reached; its spread before the end of training is
        # no evidence of collapse, and counted, it would look worse to the sampler than a
        # trial that did collapse.
        out[COLLAPSE_CONSTRAINT] = 0.0
    elif definition.collapse is not None:
        rule = definition.collapse
        graded = sum(
            _shortfall(metrics.get(name, math.nan), floor)
            for name, floor in (("spread_norm", rule.min_spread_norm), ("z_usage", rule.min_z_usage))
        )
        out[COLLAPSE_CONSTRAINT] = graded + (1.0 if stopped and stopped.startswith("collapsed") else 0.0)
    if definition.halving is not None:
        out[HALVED_CONSTRAINT] = 1.0 if halved(stopped) else 0.0
    return out


def _shortfall(value: float, floor: float) -> float:
    """How far ``value`` falls below ``floor``, from 0 (at or above) to 1 (zero, or unmeasured)."""
    if floor <= 0:
        return 0.0
    # A signal that could not be measured counts as collapsed: max(0, 1 - nan) would be 0.
    if not math.isfinite(value):
        return 1.0
    return max(0.0, 1.0 - value / floor)


@dataclass
class TrialOutcome:
    """What a trained trial is to record (its attributes) and tell (its values)."""

    values: list[float]
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    constraints: dict[str, float]
    """Optuna constraint values by name: feasible when every one is <= 0."""
    stopped: str | None
    epochs_run: int
    epochs: int

    @property
    def violated(self) -> list[str]:
        """The constraints the trial breaks."""
        return [name for name, v in self.constraints.items() if not v <= 0]

    def checked_values(self, objectives: list[str]) -> list[float]:
        """The values, or :class:`TrialFailed` naming the ``objectives`` that are not finite."""
        bad = [name for name, v in zip(objectives, self.values, strict=True) if not math.isfinite(v)]
        if bad:
            raise TrialFailed(f"objective metric(s) not finite: {', '.join(bad)}", retry=False)
        return self.values


@dataclass
class TrialJob:
    """A trial asked and prepared: its config and its epoch callbacks, ready to train."""

    trial: optuna.Trial
    cfg: Config
    callbacks: list[Callable[[EpochReport], str | None]]


@dataclass
class TrainedTrial:
    """A trained trial's result, its metrics (downstream gains included) and user attributes."""

    result: TrainResult
    metrics: dict[str, float]
    user_attrs: dict[str, Any]


class TrialObjective:
    """Runs one trial end to end; a worker keeps one for all its trials (data stay cached).

    Args:
        definition: The study's definition.
        artifact_dir: Folder of the file-system artifact store.
        interruptible: Called with ``True`` when training starts and ``False`` when it ends.
        extra_callbacks: Epoch callbacks besides the collapse watcher.
        on_start: Called with the trial, its parameters and its baseline name (or ``None``)
            once they are known, before training.
    """

    def __init__(
        self,
        definition: StudyDefinition,
        *,
        artifact_dir: str | Path,
        interruptible: Callable[[bool], None] = lambda _: None,
        extra_callbacks: tuple[Callable[[EpochReport], str | None], ...] = (),
        on_start: Callable[[optuna.Trial, dict[str, Any], str | None], None] = lambda *_: None,
    ) -> None:
        self.definition = definition
        self.artifact_store = FileSystemArtifactStore(str(artifact_dir))
        Path(artifact_dir).mkdir(parents=True, exist_ok=True)
        self.interruptible = interruptible
        self._extra_callbacks = extra_callbacks
        self._on_start = on_start
        self._data_key: str | None = None
        self._data: Dataset | None = None

    def __call__(self, trial: optuna.Trial) -> list[float]:
        """Train, record the trial's attributes, and return its objective values."""
        outcome = self.run(trial)
        set_trial_attrs(trial, outcome.user_attrs, outcome.system_attrs)
        return outcome.checked_values(self.definition.metric_names)

    def run(self, trial: optuna.Trial) -> TrialOutcome:
        """Suggest, train and evaluate; what to record and tell, not yet written."""
        job = self.prepare(trial)
        with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-") as tmp:
            self.interruptible(True)
            try:
                data = self.dataset(job.cfg)
                result = train(job.cfg, out_dir=tmp, callbacks=job.callbacks, data=data)
                trained = self.trained(job, result, Path(tmp), data)
            except TrainingDiverged as e:
                raise TrialFailed(f"diverged: {e}", retry=False) from e
            finally:
                self.interruptible(False)
            return self.outcome(job, trained, Path(tmp))

    def prepare(self, trial: optuna.Trial) -> TrialJob:
        """Suggest the trial's parameters; its config and epoch callbacks.

        Raises:
            TrialFailed: The parameters make no valid config.
        """
        params = suggest_space(trial, self.definition.space)
        baseline = trial.user_attrs.get(BASELINE_ATTR)
        try:
            cfg = self.definition.config_for(params, baseline)
        except ConfigError as e:
            raise TrialFailed(f"invalid config: {e}", retry=False) from e
        self._on_start(trial, params, baseline)
        callbacks = list(self._extra_callbacks)
        if self.definition.collapse is not None:
            callbacks.append(CollapseWatcher(self.definition.collapse))
        if self.definition.halving is not None:
            callbacks.append(HalvingWatcher(self.definition, trial))
        if self.definition.downstream_metrics:  # SRDRN trains from the checkpoint
            cfg = replace(cfg, train=replace(cfg.train, save_checkpoint=True))
        return TrialJob(trial, cfg, callbacks)

    def trained(self, job: TrialJob, result: TrainResult, out: Path, data: Dataset) -> TrainedTrial:
        """The trained trial's attributes and metrics, with SRDRN trained on it where the
        study asks for downstream metrics (still interruptible)."""
        user_attrs = self.attrs(job.trial, result)
        metrics = dict(result.metrics)
        if self.definition.downstream_metrics:
            downstream = self._downstream(job.trial, out, data)
            metrics |= downstream.gains()
            user_attrs[DOWNSTREAM_ATTR] = json_safe(downstream.summary())
        return TrainedTrial(result, metrics, user_attrs)

    def outcome(self, job: TrialJob, trained: TrainedTrial, out: Path) -> TrialOutcome:
        """Constraints and the uploaded files of a trained trial: what to record and tell."""
        result = trained.result
        constraints = constraint_values(self.definition, trained.metrics, result.stopped)
        system_attrs = {f"{_CONSTRAINTS_KEY}:{key}": value for key, value in constraints.items()}
        system_attrs.update(self._upload(job.trial, out))
        return TrialOutcome(
            values=[trained.metrics.get(o.metric, math.nan) for o in self.definition.objectives],
            user_attrs=trained.user_attrs,
            system_attrs=system_attrs,
            constraints=constraints,
            stopped=result.stopped,
            epochs_run=result.epochs_run,
            epochs=job.cfg.train.epochs,
        )

    def _downstream(self, trial: optuna.Trial, out: Path, data: Dataset) -> DownstreamResult:
        """SRDRN without and with the trial's generated data; its files join the trial's."""
        ckpt = read_checkpoint(out / "checkpoint.pt")
        source = f"study {self.definition.name} trial {trial.number}"
        return run_downstream(ckpt.model, ckpt.config, data, source=source, out_dir=out)

    def dataset(self, cfg: Config) -> Dataset:
        """The dataset of ``cfg``, loaded once for all the trials that share it."""
        key = json.dumps(
            [config_to_dict(cfg)["data"], cfg.normalization and asdict(cfg.normalization)], sort_keys=True
        )
        if key != self._data_key:
            self._data, self._data_key = load_data(cfg.data, cfg.normalization), key
        assert self._data is not None
        return self._data

    @staticmethod
    def attrs(trial: optuna.Trial, result: TrainResult) -> dict[str, Any]:
        """The user attributes a trial records, grouped so that the dashboard shows a few."""
        losses = result.history[-1] if result.history else {}
        attrs: dict[str, Any] = {
            "metrics": result.metrics,
            "losses": {k: v for k, v in losses.items() if k not in ("epoch", "samples_per_s")},
            "timings": {**result.timings, "epochs_run": result.epochs_run},
            RUNTIME_ATTR: {
                "device": result.device,
                "precision": result.precision,
                "threads": result.threads,
                "cpu_capability": result.cpu_capability,
                "host": socket.gethostname(),
                "platform": platform.platform(terse=True),
                "versions": result.versions,
            },
            "stopped": result.stopped,
            "history": result.history,
            "normalization": asdict(result.config.normalization) if result.config.normalization else None,
        }
        if result.peak_gpu_memory_bytes is not None:
            attrs[RUNTIME_ATTR][PEAK_GPU_MEMORY_ATTR] = result.peak_gpu_memory_bytes
        if FUSED_GROUP in result.extra:  # trained in a stack of this many: its timings are the group's
            attrs[RUNTIME_ATTR][FUSED_GROUP] = result.extra[FUSED_GROUP]
        if "fail_reason" in trial.user_attrs:  # inherited from the failed attempt this retries
            attrs["fail_reason"] = None
        return {key: json_safe(value) for key, value in attrs.items()}

    def _upload(self, trial: optuna.Trial, out: Path) -> dict[str, Any]:
        """Store the trial's files; their entries, to be recorded with its other attributes."""
        entries = _ArtifactEntries(trial._trial_id)
        names = ["samples.png", "metrics.json", "config.yaml", *DOWNSTREAM_FILES]
        if self.definition.save_checkpoints:
            names.append("checkpoint.pt")
        for name in names:
            path = out / name
            if path.exists():
                upload_artifact(
                    artifact_store=self.artifact_store,
                    file_path=str(path),
                    study_or_trial=trial,
                    storage=entries,  # type: ignore[arg-type]
                )
        return entries.attrs


class _ArtifactEntries:
    """Takes the entry :func:`optuna.artifacts.upload_artifact` would write to the storage at
    once, so that it goes in with the trial's other attributes in one transaction."""

    def __init__(self, trial_id: int) -> None:
        self.trial_id = trial_id
        self.attrs: dict[str, Any] = {}

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        assert trial_id == self.trial_id
        self.attrs[key] = value
